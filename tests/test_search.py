"""Photo search (ernievil2/search/, launch/search.py, bench/search.py): index, resume, queries,
identity check, faiss, HTML gallery, the README commands, and search vs the in-loop evaluator."""
from __future__ import annotations

import html.parser
import importlib.util
import json
import re
import shlex
import subprocess
import sys
import urllib.parse
from pathlib import Path

import cv2
import numpy as np
import paddle
import pytest
from PIL import Image

from ernievil2.data.preprocess import preprocess
from ernievil2.models import build_model, model_config
from ernievil2.search import (
    Encoder,
    IdentityMismatchError,
    SearchError,
    SearchHit,
    build_index,
    encoder_for_index,
    faiss_top_k,
    load_encoder,
    load_index,
    query_image,
    query_text,
    top_k,
    write_html,
)
from ernievil2.tokenizer import WordPieceTokenizer
from ernievil2.weights.save import save_checkpoint

NEEDS_FAISS = "needs faiss (the search extra: pip install -e '.[search]')"

REPO = Path(__file__).resolve().parents[1]
SEARCH_PY = REPO / "launch" / "search.py"
CAPTIONS = ["a red circle on the left", "两只猫在沙发上睡觉", "blue square and a star", "海边的日落",
            "一个大的红色圆形", "small green triangle"]
# name -> (height, width, writer); every image differs in content and size
GOOD = {
    "top.jpg": (60, 80, "cv2"), "holidays/beach.PNG": (90, 70, "cv2"), "holidays/2024/sunset.jpeg": (64, 64, "cv2"),
    "holidays/2024/deep/wave.webp": (100, 65, "cv2"), "misc/pic.bmp": (70, 90, "cv2"), "misc/anim.gif": (72, 72, "pil"),
}
CORRUPT = "misc/broken.jpg"
OTHER = "misc/notes.txt"

pytestmark = pytest.mark.timeout(120)


def _image(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth random colour field plus noise (distinct per seed)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)
    img = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR).astype(np.int16)
    return np.clip(img + rng.integers(-20, 21, (h, w, 3)), 0, 255).astype(np.uint8)


def write_photo(root: Path, rel: str, h: int, w: int, seed: int, writer: str = "cv2") -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    img = _image(h, w, seed)
    if writer == "pil":
        Image.fromarray(img).save(path)
    else:
        assert cv2.imwrite(str(path), img)
    return path


def make_photos(root: Path) -> Path:
    for seed, (rel, (h, w, writer)) in enumerate(GOOD.items()):
        write_photo(root, rel, h, w, seed, writer)
    (root / CORRUPT).write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    (root / OTHER).write_text("not an image", encoding="utf-8")
    return root


def _save_model(folder: Path, seed: int, vocab: Path | None) -> Path:
    """A random tiny model (300 word ids) saved as our checkpoint folder, with ``vocab.txt`` when given."""
    paddle.seed(seed)
    model = build_model(model_config("tiny", text={"vocab_size": 300}))
    return save_checkpoint(model, folder, files={"vocab.txt": vocab} if vocab else None)


@pytest.fixture(scope="module")
def vocab(tmp_path_factory) -> Path:
    paddle.set_device("cpu")
    return Path(WordPieceTokenizer.build_vocab(CAPTIONS * 3, tmp_path_factory.mktemp("vocab") / "vocab.txt", vocab_size=300))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, vocab) -> Path:
    return _save_model(tmp_path_factory.mktemp("ckpt") / "step_0000001", 0, vocab)


@pytest.fixture(scope="module")
def other_ckpt(tmp_path_factory, vocab) -> Path:
    return _save_model(tmp_path_factory.mktemp("other") / "step_0000001", 1, vocab)


@pytest.fixture(scope="module")
def encoder(ckpt) -> Encoder:
    return load_encoder(ckpt, device="cpu")


@pytest.fixture(scope="module")
def built(tmp_path_factory, encoder):
    """A photo folder and its index (built once, read by several tests)."""
    base = tmp_path_factory.mktemp("built")
    photos = make_photos(base / "photos")
    report = build_index(photos, base / "photos.index", encoder, batch_size=4, progress=False)
    return photos, base / "photos.index", report


def _direct(encoder: Encoder, path: Path) -> np.ndarray:
    pixels = preprocess(path.read_bytes(), profile="official", size=64, key=str(path))[None]
    with paddle.no_grad():
        return encoder.model.encode_image(paddle.to_tensor(pixels)).numpy()[0]


# --------------------------------------------------------------------------- index
def test_index_nested_folder_skips_corrupt_and_ignores_other_files(built, encoder):
    photos, folder, report = built
    assert report.found == len(GOOD) + 1 and report.before == 0 and report.added == len(GOOD)
    assert report.ignored == 1
    assert [s.path for s in report.skipped] == [CORRUPT] and "undecodable" in report.skipped[0].reason
    assert sorted(p.name for p in folder.iterdir()) == ["index.json", "paths.json", "vectors.npy"]
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temporary left
    paths = json.loads((folder / "paths.json").read_text(encoding="utf-8"))
    assert paths == sorted(GOOD)  # relative POSIX paths, sorted
    vectors = np.load(folder / "vectors.npy")
    assert vectors.dtype == np.float32 and vectors.shape == (len(GOOD), 64)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    for row in (0, 3, 5):  # the same numbers as preprocess + encode_image of the file
        np.testing.assert_allclose(vectors[row], _direct(encoder, photos / paths[row]), atol=1e-5)
    meta = json.loads((folder / "index.json").read_text(encoding="utf-8"))
    assert meta["root"] == str(photos.resolve()) and meta["count"] == len(GOOD) and meta["ignored"] == 1
    assert meta["skipped"] == [{"path": CORRUPT, "reason": report.skipped[0].reason}]
    assert meta["identity"] == encoder.identity.to_json()
    assert meta["identity"]["image_size"] == 64 and meta["identity"]["profile"] == "official"
    assert meta["checkpoint"] == encoder.checkpoint and Path(meta["vocab_file"]).name == "vocab.txt"
    assert f"{CORRUPT}: undecodable" in report.summary()


def test_resume_embeds_only_new_files(tmp_path, encoder, monkeypatch):
    photos = tmp_path / "photos"
    for seed, rel in enumerate(["a.jpg", "sub/b.png", "sub/deeper/c.jpg"]):
        write_photo(photos, rel, 64, 80, seed + 10)
    folder = tmp_path / "idx"
    first = build_index(photos, folder, encoder, batch_size=2, progress=False)
    old = load_index(folder)
    assert first.added == 3 and old.paths == ["a.jpg", "sub/b.png", "sub/deeper/c.jpg"]

    write_photo(photos, "sub/new1.JPG", 80, 64, 20)
    write_photo(photos, "0-first.webp", 70, 70, 21)  # sorts before the indexed ones
    embedded = []
    real = Encoder.encode_pixels

    def counting(self, pixels):
        embedded.append(len(pixels))
        return real(self, pixels)

    monkeypatch.setattr(Encoder, "encode_pixels", counting)
    second = build_index(photos, folder, encoder, batch_size=2, progress=False)
    assert (second.found, second.before, second.added) == (5, 3, 2) and sum(embedded) == 2
    new = load_index(folder)
    assert new.paths[:3] == old.paths and new.paths[3:] == ["0-first.webp", "sub/new1.JPG"]
    np.testing.assert_array_equal(new.vectors[:3], old.vectors)  # untouched, byte for byte
    np.testing.assert_allclose(new.vectors[4], _direct(encoder, photos / "sub/new1.JPG"), atol=1e-5)

    embedded.clear()
    third = build_index(photos, folder, encoder, batch_size=2, progress=False)
    assert (third.added, sum(embedded)) == (0, 0) and load_index(folder).paths == new.paths


def test_interrupted_build_keeps_finished_batches_and_resumes(tmp_path, encoder, monkeypatch):
    photos = tmp_path / "photos"
    for i in range(5):
        write_photo(photos, f"p{i}.jpg", 64, 64 + i, 30 + i)
    real = Encoder.encode_pixels
    calls = []

    def failing(self, pixels):
        calls.append(len(pixels))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, pixels)

    monkeypatch.setattr(Encoder, "encode_pixels", failing)
    folder = tmp_path / "idx"
    with pytest.raises(KeyboardInterrupt):
        build_index(photos, folder, encoder, batch_size=2, progress=False, save_every_s=3600)
    partial = load_index(folder)
    assert partial.paths == ["p0.jpg", "p1.jpg"] and partial.vectors.shape == (2, 64)
    monkeypatch.setattr(Encoder, "encode_pixels", real)
    report = build_index(photos, folder, encoder, batch_size=2, progress=False)
    assert report.before == 2 and report.added == 3
    clean = build_index(photos, tmp_path / "clean", encoder, batch_size=5, progress=False).index
    assert load_index(folder).paths == clean.paths
    np.testing.assert_allclose(load_index(folder).vectors, clean.vectors, atol=1e-5)


def test_failed_save_leaves_the_previous_index(tmp_path, encoder, monkeypatch):
    photos = tmp_path / "photos"
    write_photo(photos, "a.jpg", 64, 64, 97)
    folder = tmp_path / "idx"
    build_index(photos, folder, encoder, progress=False)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    write_photo(tmp_path / "more", "x.jpg", 64, 64, 99)
    with pytest.raises(SearchError, match="covers"):  # another root is refused before any work
        build_index(tmp_path / "more", folder, encoder, progress=False)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "save", disk_full)
    write_photo(photos, "b.jpg", 64, 64, 98)
    with pytest.raises(OSError, match="No space"):
        build_index(photos, folder, encoder, progress=False)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx", "more", "photos"]  # no temporary left


def test_refuses_to_replace_a_folder_that_is_not_an_index(tmp_path, encoder, built):
    photos = built[0]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(SearchError, match="not a search index"):
        build_index(photos, tmp_path / "mine", encoder, progress=False)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"
    with pytest.raises(SearchError, match="no image files"):
        build_index(tmp_path / "mine", tmp_path / "idx", encoder, progress=False)


# --------------------------------------------------------------------------- queries
def test_query_by_image_finds_itself_first(built, encoder):
    photos, folder, _ = built
    index = load_index(folder)
    for row, rel in enumerate(index.paths):
        hits = query_image(index, encoder, photos / rel, k=3)
        assert all(isinstance(h, SearchHit) for h in hits)
        path, score, at = hits[0]
        assert path == str(photos.resolve() / rel) and at == row and score == hits[0].score
        assert hits[0].score == pytest.approx(1.0, abs=1e-5)
        assert hits[0].score > hits[1].score >= hits[2].score
    with pytest.raises(SearchError, match="query image"):
        query_image(index, encoder, photos / CORRUPT)


def test_query_by_text_ranks_by_cosine(built, encoder):
    photos, folder, _ = built
    index = load_index(folder)
    for text in CAPTIONS[:3]:
        hits = query_text(index, encoder, text, k=4)
        q = encoder.encode_texts([text])[0]
        scores = index.vectors @ q
        expected = np.lexsort((np.arange(len(scores)), -scores))[:4]
        assert [h.index for h in hits] == expected.tolist()
        assert [h.path for h in hits] == [str(photos.resolve() / index.paths[i]) for i in expected]
        np.testing.assert_allclose([h.score for h in hits], scores[expected], atol=1e-6)
    assert len(query_text(index, encoder, "海边", k=100)) == len(GOOD)  # k larger than the index
    with pytest.raises(SearchError, match="empty query"):
        query_text(index, encoder, "   ")


def test_top_k_exact_with_ties_in_index_order():
    rng = np.random.default_rng(0)
    vectors = rng.integers(-2, 3, (1000, 8)).astype(np.float32)  # many exactly equal scores
    queries = rng.integers(-2, 3, (7, 8)).astype(np.float32)
    for chunk in (1 << 24, 100, 7):  # one chunk; many chunks; chunks smaller than k
        values, rows = top_k(vectors, queries, 25, chunk_elements=chunk)
        for q in range(7):
            scores = vectors @ queries[q]
            expected = np.lexsort((np.arange(1000), -scores))[:25]
            assert rows[q].tolist() == expected.tolist()
            np.testing.assert_array_equal(values[q], scores[expected])
    with pytest.raises(SearchError, match="k must be"):
        top_k(vectors, queries, 0)


def test_faiss_matches_exact(built, encoder):
    pytest.importorskip("faiss", reason=NEEDS_FAISS)
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((500, 64)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = vectors[[3, 77, 499]] + 0.1 * rng.standard_normal((3, 64)).astype(np.float32)
    ev, er = top_k(vectors, queries, 10)
    fv, fr = faiss_top_k(vectors, queries, 10)
    np.testing.assert_array_equal(fr, er)
    np.testing.assert_allclose(fv, ev, atol=1e-5)
    assert er[:, 0].tolist() == [3, 77, 499]
    index = load_index(built[1])
    for text in CAPTIONS:
        exact = query_text(index, encoder, text, k=5)
        fast = query_text(index, encoder, text, k=5, backend="faiss")
        assert [h.path for h in fast] == [h.path for h in exact]
        np.testing.assert_allclose([h.score for h in fast], [h.score for h in exact], atol=1e-5)


def test_faiss_missing_is_a_clear_error(built, encoder, monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss -> ImportError
    index = load_index(built[1])
    with pytest.raises(SearchError, match=r"faiss-cpu.*\.\[search\]"):
        query_text(index, encoder, "海边的日落", backend="faiss")
    with pytest.raises(SearchError, match="unknown backend"):
        index.search(encoder.encode_texts(["x"]), backend="annoy")


# --------------------------------------------------------------------------- identity
def test_identity_mismatch_is_refused(built, encoder, other_ckpt, ckpt, tmp_path):
    photos, folder, _ = built
    index = load_index(folder)
    other = load_encoder(other_ckpt, device="cpu")
    with pytest.raises(IdentityMismatchError) as err:
        query_text(index, other, "海边的日落")
    message = str(err.value)
    assert index.identity.model_sha256[:12] in message and other.identity.model_sha256[:12] in message
    assert "differ: model_sha256" in message and str(other_ckpt) in message
    with pytest.raises(IdentityMismatchError):
        encoder_for_index(index, other_ckpt, device="cpu")
    with pytest.raises(IdentityMismatchError):  # resuming with another model
        build_index(photos, folder, other, progress=False)
    # the same weights with another vocab, or another preprocessing profile
    vocab2 = WordPieceTokenizer.build_vocab(["完全不同的词表", "another vocabulary"], tmp_path / "v2.txt", vocab_size=100)
    with pytest.raises(IdentityMismatchError, match="differ: vocab_sha256"):
        encoder_for_index(index, ckpt, vocab2, device="cpu")
    pnlp = load_encoder(ckpt, profile="paddlenlp", device="cpu")
    with pytest.raises(IdentityMismatchError, match="differ: profile"):
        build_index(photos, folder, pnlp, progress=False)
    # the index's own checkpoint passes (recorded, or given explicitly)
    assert encoder_for_index(index, device="cpu").identity == index.identity
    assert encoder_for_index(index, ckpt, device="cpu").identity == index.identity


# --------------------------------------------------------------------------- HTML
class _Page(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.tags, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.imgs.append(dict(attrs))

    def handle_data(self, data):
        self.text.append(data)


def test_html_gallery_lists_every_result(tmp_path, encoder):
    photos = tmp_path / "photos"
    odd = write_photo(photos, 'odd <name> & "quotes" 红.jpg', 64, 64, 3)
    write_photo(photos, "sub dir/plain.png", 64, 80, 4)
    build_index(photos, tmp_path / "idx", encoder, progress=False)
    index = load_index(tmp_path / "idx")
    query = '<script>alert("x")</script> 红色'
    hits = query_text(index, encoder, query, k=10)
    page_path = write_html(hits, tmp_path / "out" / "results.html", query=query, query_image=odd)
    page = _Page()
    page.feed(page_path.read_text(encoding="utf-8"))
    assert "script" not in page.tags  # the query is text, not markup
    text = "".join(page.text)
    assert query in text
    result_imgs = [i for i in page.imgs if "loading" in i]
    assert len(result_imgs) == len(hits) == 2
    for hit, img in zip(hits, result_imgs):
        assert hit.path in text and img["alt"] == hit.path
        assert not img["src"].startswith(("/", "file:"))  # relative to the page
        assert (page_path.parent / urllib.parse.unquote(img["src"])).resolve() == Path(hit.path).resolve()
    assert all(f"{hit.score:.4f}" in text for hit in hits)
    absolute = write_html(hits, tmp_path / "abs.html", query="x", relative=False)
    page = _Page()
    page.feed(absolute.read_text(encoding="utf-8"))
    assert [i["src"] for i in page.imgs] == [Path(h.path).as_uri() for h in hits]


# --------------------------------------------------------------------------- CLI
def _cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SEARCH_PY), *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def _readme_search_commands() -> list[list[str]]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Search your photos", 1)[1].split("\n## ", 1)[0]
    lines = [ln for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", section, flags=re.S)
             for ln in block.replace("\\\n", " ").splitlines()]
    return [shlex.split(ln, comments=True) for ln in lines if "launch/search.py" in ln]


@pytest.mark.slow
def test_readme_commands_run(tmp_path, ckpt):
    photos = make_photos(tmp_path / "Pictures")
    index, page = tmp_path / "photos.index", tmp_path / "results.html"
    subst = {"~/Pictures": str(photos), "~/Pictures/cat.jpg": str(photos / "top.jpg"),
             "outputs/demo/RUN/checkpoints/step_0000480": str(ckpt), "photos.index": str(index),
             "results.html": str(page)}
    commands = _readme_search_commands()
    assert [c[2] for c in commands] == ["index", "query", "query", "index", "query"]
    assert "--ann" in commands[3] and "--exact" in commands[4]
    has_faiss = importlib.util.find_spec("faiss") is not None
    assert any("--html" in c for c in commands) and any("--image" in c for c in commands)
    outputs = []
    for words in commands:
        assert words[:2] == ["python", "launch/search.py"]
        args = [subst.get(w, w) for w in words[2:]]
        if "--faiss" in args and not has_faiss:
            args.remove("--faiss")  # the optional extra is not installed: the rest of the line still runs
        if "--ann" in args and not has_faiss:
            args[args.index("--ann") + 1] = "auto"  # likewise: exact search, with a note
        proc = _cli(*args)
        assert proc.returncode == 0, (words, proc.stderr[-3000:])
        outputs.append(proc.stdout)
    assert f"{len(GOOD)} added" in outputs[0] and "1 skipped" in outputs[0] and CORRUPT in outputs[0]
    rows = [ln.split("\t") for ln in outputs[1].splitlines() if ln[:1].isdigit()]
    assert [r[0] for r in rows] == [str(i) for i in range(1, len(rows) + 1)] and len(rows) == len(GOOD)
    assert [float(r[1]) for r in rows] == sorted((float(r[1]) for r in rows), reverse=True)
    assert page.is_file() and all(r[2] in page.read_text(encoding="utf-8") for r in rows)
    first = [ln.split("\t") for ln in outputs[2].splitlines()][0]
    assert first[0] == "1" and first[2] == str(photos.resolve() / "top.jpg") and float(first[1]) == pytest.approx(1.0, abs=1e-3)
    if has_faiss:  # the approximate index over the same photos (nothing embedded again), recall printed
        assert "0 added" in outputs[3] and "approximate search: IVF-Flat" in outputs[3] and "recall@10" in outputs[3]
        assert (index / "ann.faiss").is_file()
    assert [ln.split("\t")[2] for ln in outputs[4].splitlines() if ln[:1].isdigit()] == [r[2] for r in rows]
    # running the index command again adds nothing
    again = _cli(*[subst.get(w, w) for w in commands[0][2:]])
    assert again.returncode == 0 and "0 added" in again.stdout


def _one_error_line(proc: subprocess.CompletedProcess, pattern: str) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("search.py: error: "), proc.stderr[-3000:]
    assert re.search(pattern, lines[0]), lines[0]


@pytest.mark.slow
def test_cli_user_errors(tmp_path, built, other_ckpt):
    photos, folder, _ = built
    _one_error_line(_cli("index", "--images", str(tmp_path / "missing"), "--ckpt", str(other_ckpt),
                         "--out", str(tmp_path / "i")), "image folder not found")
    _one_error_line(_cli("query", str(folder), "海边的日落", "--ckpt", str(other_ckpt)),
                    r"was built with \[model sha256 \w{12}.*\] .* but this run uses \[model sha256 \w{12}")
    bare = _save_model(tmp_path / "bare", 2, None)
    _one_error_line(_cli("index", "--images", str(photos), "--ckpt", str(bare), "--out", str(tmp_path / "j")),
                    "no WordPiece vocab.*--vocab")


@pytest.mark.slow
def test_bench_quick(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "search.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["quick"] is True
    (build,) = result["index_build"]
    assert (build["preset"], build["images"], build["image_size"], build["dim"]) == ("tiny", 8, 64, 64)
    assert build["images_per_s"] == pytest.approx(build["images"] / build["seconds"], rel=1e-9)
    # the printed table reports the numbers of the JSON file, one row per measurement
    assert (f"| tiny | 8 | 64 | 64 | {build['seconds']:.2f} | {build['images_per_s']:.1f} |"
            in proc.stdout.splitlines()), proc.stdout
    backends = ["numpy", "faiss", "ivf"] if importlib.util.find_spec("faiss") else ["numpy"]
    assert [(r["n"], r["backend"]) for r in result["query"]] == [(n, b) for n in (2000, 5000) for b in backends]
    for r in result["query"]:
        assert (r["dim"], r["k"]) == (768, 10), r
        assert 0 < r["random_pair_cos"] < r["top10_cos"] <= r["top1_cos"] < 1, r  # clustered, not isotropic
        if r["backend"] == "ivf":
            assert r["build_recall_at_10"] >= 0.95 and r["recall_at_10"] >= 0.9 and 1 <= r["nprobe"] <= r["nlist"], r
            probe, recall = f"{r['nprobe']} / {r['nlist']}", f"{r['build_recall_at_10']:.3f}"
        else:
            assert r["recall_at_10"] == 1.0
            probe, recall = "exact", "1"
        assert (f"| {r['n']:,} | 768 | {r['backend']} | {r['build_s']:.2f} | {probe} | {recall} | "
                f"{r['recall_at_10']:.3f} | {r['median_ms']:.2f} |" in proc.stdout.splitlines()), (r, proc.stdout)


# --------------------------------------------------------------------------- acceptance
@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The tiny demo model after a brief training run (clip-only loss, 60 steps), 100 val images."""
    from hydra import compose, initialize_config_dir

    from ernievil2.data.demo import DemoDataSpec, demo_path
    from ernievil2.train.config import register_schemas, validate
    from ernievil2.train.run import run_training

    register_schemas()
    base = tmp_path_factory.mktemp("demo")
    overrides = ["data.demo.n_train=400", "data.demo.n_val=100", "data.demo.samples_per_shard=200",
                 f"data.demo.cache_dir={base / 'cache'}", "data.batch_size=32", "data.num_workers=0",
                 "data.shuffle_buffer=200", "trainer.device=cpu", "logger.backend=none", "loss=clip_only",
                 "trainer.max_steps=60", "eval=none", "optim.lr=3e-3", "optim.warmup_steps=15", "logger.log_every=10"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    run_training(cfg, base / "run")
    demo = validate(cfg).data.demo  # the cached demo data the run trained on
    spec = DemoDataSpec(**{name: getattr(demo, name) for name in DemoDataSpec.__dataclass_fields__})
    return base / "run" / "checkpoints" / "step_0000060", demo_path(demo.cache_dir, spec, "val"), \
        int(cfg.model.text_max_length)


@pytest.mark.slow
def test_search_recall_at_5_matches_the_evaluator(demo_run, tmp_path):
    from ernievil2.evaluators.retrieval import EvalSetSpec, RetrievalEvaluator, embed, items_to_set, read_items

    ckpt, val_shards, max_length = demo_run
    items = read_items(EvalSetSpec(name="demo_val", format="shards", path=val_shards))
    assert len(items) == 100
    photos = tmp_path / "val"
    photos.mkdir()
    for item in items:
        (photos / f"{item.key}.jpg").write_bytes(item.load_image())
    encoder = load_encoder(ckpt, device="cpu", text_max_length=max_length)
    index = build_index(photos, tmp_path / "val.index", encoder, batch_size=50, progress=False).index
    row = {p: i for i, p in enumerate(index.paths)}
    captions = [c for item in items for c in item.captions]
    target = np.array([row[f"{item.key}.jpg"] for item in items for _ in item.captions])
    hits = index.search(encoder.encode_texts(captions), k=5)
    share = 100.0 * np.mean([t in {h.index for h in hs} for t, hs in zip(target, hits)])

    data = items_to_set(items, encoder.image_size, encoder.tokenizer, max_length)
    record = RetrievalEvaluator("demo_val", data, "multi")(encoder.model, 60)[0]
    image_emb, _ = embed(encoder.model, data)
    order = [row[f"{item.key}.jpg"] for item in items]
    # the index holds the evaluator's image embeddings: the same preprocessing and model
    np.testing.assert_allclose(index.vectors[order], image_emb, atol=1e-5)
    assert record["t2i_r5"] > 5.0 * 2  # trained: well above chance (5 of 100 images)
    assert share >= record["t2i_r5"] - 1e-9, (share, record["t2i_r5"])
