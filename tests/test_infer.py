"""Inference on upstream evaluation files (launch/infer.py, launch/run_infer.sh), the embeddings file
(ernievil2.embeddings_file) and launch/eval_retri.py."""
from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import paddle
import pytest
from hydra import compose, initialize_config_dir

from ernievil2 import embeddings_file
from ernievil2.data.preprocess import preprocess
from ernievil2.inference import (
    BadLineError,
    InferError,
    build_inference_model,
    decode_base64,
    infer_main,
    run_inference,
    sidecar_paths,
)
from ernievil2.retrieval import format_seed_table, one_to_one_ranks, seed_table_from_metrics
from ernievil2.tokenizer import WordPieceTokenizer
from ernievil2.train.infer_config import register_infer_schema

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
CAPTIONS = [
    "穿着连衣裙的小女孩。", "a dog runs on the grass", "两只猫在沙发上睡觉", "red car parked near a tree",
    "一个男人在骑自行车", "children playing football", "海边的日落", "a bowl of noodles",
    "雪山下的小木屋", "two birds on a wire", "城市夜景", "a boat on the lake",
]


def run_eval_retri(*args: str) -> subprocess.CompletedProcess:
    """launch/eval_retri.py ARGS in a subprocess (the CLI under test)."""
    return subprocess.run([sys.executable, "launch/eval_retri.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def jpeg_b64(h: int, w: int, seed: int) -> str:
    img = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(".jpg", img)
    assert ok
    return base64.b64encode(buf.tobytes()).decode("ascii")


def seed_line(i: int, image_id: str | None = None) -> str:
    h, w = [(70, 90), (90, 70), (64, 64), (100, 65)][i % 4]
    return f"{CAPTIONS[i % len(CAPTIONS)]}\t{image_id or f'img{i}'}\t{jpeg_b64(h, w, i)}\n"


@pytest.fixture(scope="module")
def vocab(tmp_path_factory) -> Path:
    return WordPieceTokenizer.build_vocab(CAPTIONS * 3, tmp_path_factory.mktemp("vocab") / "vocab.txt", vocab_size=300)


@pytest.fixture(scope="module")
def seed_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("seed") / "test.tsv"
    path.write_text("".join(seed_line(i) for i in range(10)), encoding="utf-8")
    return path


def infer_cfg(**overrides):
    register_infer_schema()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("infer", overrides=[f"{k}={v}" for k, v in overrides.items()])


@pytest.fixture(scope="module")
def tiny(vocab):
    paddle.set_device("cpu")
    return build_inference_model(infer_cfg(**{"model": "tiny", "vocab_file": vocab, "seed": 0, "test_file": "-", "output_file": "-"}))


def read_output(path: Path):
    lines = path.read_text(encoding="utf-8").splitlines()
    cols = [line.split("\t") for line in lines]
    text = np.array([[float(x) for x in c[0].split(" ")] for c in cols], dtype=np.float32)
    image = np.array([[float(x) for x in c[1].split(" ")] for c in cols], dtype=np.float32)
    return cols, text, image


# --------------------------------------------------------------------------- inference
def test_infer_writes_seed_embeddings(tmp_path, seed_file, vocab):
    out = tmp_path / "sub" / "emb.out"
    cfg = infer_cfg(model="tiny", test_file=seed_file, output_file=out, vocab_file=vocab, batch_size=4,
                    write_npy="true", device="cpu")
    result = infer_main(cfg)
    assert result.n_written == 10 and len(result.report) == 0
    cols, text, image = read_output(out)
    assert len(cols) == 10
    assert all(len(c) == 3 and c[2] == "1" for c in cols)
    assert text.shape == image.shape == (10, 64)
    np.testing.assert_allclose(np.linalg.norm(text, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(image, axis=1), 1.0, atol=1e-5)
    side = sidecar_paths(out)
    assert side["ids"].read_text().split("\n")[:-1] == [f"img{i}" for i in range(10)]
    # .npy sidecars hold the very float32 values printed (9 significant digits round-trip)
    np.testing.assert_array_equal(np.load(side["text_npy"]), text)
    np.testing.assert_array_equal(np.load(side["image_npy"]), image)
    assert not side["skipped"].exists()
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]

    # the same numbers as embedding each line directly (order kept, batching irrelevant)
    paddle.seed(0)
    model, tok = build_inference_model(cfg)
    lines = seed_file.read_text(encoding="utf-8").splitlines()
    for i in (0, 5, 9):
        caption, _, b64 = lines[i].split("\t")
        pixels = preprocess(base64.b64decode(b64), "official", 64)[None]
        with paddle.no_grad():
            img_ref = model.encode_image(paddle.to_tensor(pixels)).numpy()[0]
            txt_ref = model.encode_text(paddle.to_tensor(tok([caption], 48))).numpy()[0]
        np.testing.assert_allclose(image[i], img_ref, atol=1e-5)
        np.testing.assert_allclose(text[i], txt_ref, atol=1e-5)


def test_same_seed_same_output(tmp_path, seed_file, vocab):
    outs = []
    for k in range(2):
        out = tmp_path / f"o{k}"
        infer_main(infer_cfg(model="tiny", test_file=seed_file, output_file=out, vocab_file=vocab, seed=3,
                             batch_size=3 + k, num_workers=k))
        outs.append(read_output(out))
    assert [c[2] for c in outs[0][0]] == ["1"] * 10
    np.testing.assert_allclose(outs[0][1], outs[1][1], atol=1e-6)
    np.testing.assert_allclose(outs[0][2], outs[1][2], atol=1e-6)


def test_missing_vocab_is_asked_for(tmp_path, seed_file, monkeypatch):
    monkeypatch.delenv("ERNIEVIL2_VOCAB", raising=False)
    with pytest.raises(InferError, match="vocab_file="):
        infer_main(infer_cfg(model="tiny", test_file=seed_file, output_file=tmp_path / "o"))


BAD_LINES = {
    "columns": "only two\tcolumns\n",
    "base64": "文本\tbad_b64\t@@@not base64@@@\n",
    "image": f"文本\tbad_img\t{base64.b64encode(b'this is not an image').decode()}\n",
    "text": f"   \tempty_text\t{jpeg_b64(64, 64, 99)}\n",
    "encoding": b"\xff\xfe broken utf-8\tbad_utf8\tAAAA\n",
}


def write_with_bad(path: Path, reasons, at=3) -> list[int]:
    """Good lines with the bad ones inserted from line ``at`` on; returns the bad line numbers."""
    chunks: list[bytes] = [seed_line(i).encode() for i in range(6)]
    bad_linenos = []
    for k, reason in enumerate(reasons):
        pos = at - 1 + 2 * k
        bad = BAD_LINES[reason]
        chunks.insert(pos, bad if isinstance(bad, bytes) else bad.encode())
        bad_linenos.append(pos + 1)
    path.write_bytes(b"".join(chunks))
    return bad_linenos


@pytest.mark.parametrize("reason", list(BAD_LINES))
def test_bad_line_stops_with_line_number(tmp_path, tiny, reason):
    model, tok = tiny
    test_file = tmp_path / "t.tsv"
    [lineno] = write_with_bad(test_file, [reason], at=4)
    out = tmp_path / "o.emb"
    out.write_text("previous result\n")
    with pytest.raises(BadLineError) as info:
        run_inference(model, tok, test_file, out, batch_size=2, progress=False)
    err = info.value
    assert err.lineno == lineno == 4 and err.reason == reason
    assert str(err).startswith("line 4")
    assert out.read_text() == "previous result\n"  # untouched: written atomically or not at all
    assert not sidecar_paths(out)["ids"].exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_skip_bad_lines_counts_and_lists(tmp_path, tiny):
    model, tok = tiny
    test_file = tmp_path / "t.tsv"
    reasons = list(BAD_LINES)
    linenos = write_with_bad(test_file, reasons, at=2)
    out = tmp_path / "o.emb"
    result = run_inference(model, tok, test_file, out, batch_size=3, skip_bad_lines=True, write_npy=True,
                           num_workers=2, progress=False)
    assert result.n_written == 6
    assert result.report.counts == {r: 1 for r in reasons}
    assert [e.lineno for e in result.report.skipped] == linenos
    assert [e.image_id for e in result.report.skipped] == ["columns", "bad_b64", "bad_img", "empty_text", None]
    summary = result.report.summary()
    for lineno in linenos:
        assert f"line {lineno}" in summary
    assert "bad_img" in summary and "undecodable image: 1" in summary
    side = sidecar_paths(out)
    assert side["ids"].read_text().split() == [f"img{i}" for i in range(6)]
    assert len(out.read_text().splitlines()) == 6 == len(np.load(side["text_npy"]))
    tsv = side["skipped"].read_text().splitlines()
    assert tsv[0] == "line\timage_id\treason\tdetail" and len(tsv) == 1 + len(reasons)
    assert tsv[2].split("\t")[:3] == [str(linenos[1]), "bad_b64", "base64"]


def test_all_lines_bad_is_an_error(tmp_path, tiny):
    model, tok = tiny
    test_file = tmp_path / "t.tsv"
    test_file.write_text(BAD_LINES["columns"] * 3)
    with pytest.raises(InferError, match="no line to embed"):
        run_inference(model, tok, test_file, tmp_path / "o", skip_bad_lines=True, progress=False)
    assert not (tmp_path / "o").exists()


def test_decode_base64_variants():
    raw = bytes(range(256))
    assert decode_base64(base64.b64encode(raw).decode()) == raw
    assert decode_base64(base64.urlsafe_b64encode(raw).decode()) == raw
    assert decode_base64(base64.b64encode(raw).decode().rstrip("=")) == raw
    for bad in ("", "abc!", "####"):
        with pytest.raises(ValueError):
            decode_base64(bad)


@pytest.mark.slow
def test_cli_bad_line_exit_code_and_wrapper(tmp_path, vocab):
    """launch/infer.py reports a bad line and exits 2; run_infer.sh reads key=value CONFIG files."""
    test_file = tmp_path / "t.tsv"
    write_with_bad(test_file, ["image"], at=3)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    base = ["model=tiny", f"vocab_file={vocab}", f"test_file={test_file}", "device=cpu"]
    proc = subprocess.run([sys.executable, "launch/infer.py", *base, f"output_file={tmp_path / 'o1'}"],
                          cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "line 3" in proc.stderr and "undecodable image" in proc.stderr

    config = tmp_path / "infer.conf"
    config.write_text(
        "# upstream-style run config\n\n"
        + "\n".join(base[:3]) + "\n"
        + f"  output_file={tmp_path / 'o2'}   # trailing comment\n"
        + "skip_bad_lines=true\r\n"
    )
    proc = subprocess.run(["bash", "launch/run_infer.sh", "", str(config), "batch_size=2"], cwd=REPO,
                          capture_output=True, text=True, env={**env, "PYTHON": sys.executable}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len((tmp_path / "o2").read_text().splitlines()) == 6
    assert "skipped 1 bad line" in proc.stdout + proc.stderr


# --------------------------------------------------------------------------- eval_retri
def reference_official(path: Path) -> tuple[list[float], list[float]]:
    """The original per-line algorithm: float() parse, one N×N score matrix, a rank per row."""
    text, image = [], []
    with open(path) as f:
        for line in f:
            t, i, _ = line.strip("\n").split("\t")
            text.append([float(x) for x in t.split(" ")])
            image.append([float(x) for x in i.split(" ")])
    text = np.array(text, dtype=np.float32)
    image = np.array(image, dtype=np.float32)
    score = text @ image.T

    def recalls(s):
        ranks = [int((s[i] > s[i, i]).sum()) for i in range(len(s))]
        n = float(len(ranks))
        r = [sum(r < k for r in ranks) / n for k in (1, 5, 10)]
        return r + [sum(r) / 3.0]

    return recalls(score), recalls(score.T)


def reference_table(t2i, i2t) -> str:
    rows = [["Text2Image"] + t2i, ["Image2Text"] + i2t, ["MeanRecall"] + [(a + b) / 2 for a, b in zip(t2i, i2t)]]
    return "\n".join(" ".join(f"{round(v * 100, 2):.2f}" for v in r[1:]) for r in rows)


def table_numbers(table: str) -> str:
    return "\n".join(" ".join(c.strip() for c in line.strip("|").split("|")[1:]) for line in table.splitlines()[2:])


def write_embeddings(path: Path, text: np.ndarray, image: np.ndarray) -> None:
    from ernievil2.embeddings_file import format_embedding_lines

    path.write_text(format_embedding_lines(text, image), encoding="utf-8")


def unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("chunk", [1024, 16, 7])
def test_eval_retri_equals_per_line_reference(tmp_path, chunk):
    rng = np.random.default_rng(chunk)
    n, d = 203, 24
    text = unit(rng, n, d)
    image = 0.3 * text + unit(rng, n, d)  # correlated, so recalls are neither 0 nor 100
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    path = tmp_path / "emb"
    write_embeddings(path, text, image)
    table, info = embeddings_file.evaluate_embeddings_file(path, "official", chunk=chunk)
    t2i, i2t = reference_official(path)
    assert info["t2i"] == pytest.approx(t2i, abs=0) and info["i2t"] == pytest.approx(i2t, abs=0)
    assert table_numbers(table) == reference_table(t2i, i2t)
    assert 0 < info["t2i"][0] < 1


def test_eval_retri_ties_are_strict(tmp_path):
    """Quantised vectors: scores are exact in float32, so many ties; duplicated embeddings too."""
    rng = np.random.default_rng(5)
    n, d = 60, 8
    text = rng.integers(-1, 2, (n, d)).astype(np.float32) / 2
    image = rng.integers(-1, 2, (n, d)).astype(np.float32) / 2
    image[10:20] = image[0]  # ten identical images
    text[30:40] = text[25]  # ten identical texts
    image[45:50] = text[45:50]
    path = tmp_path / "emb"
    write_embeddings(path, text, image)
    ranks_t2i, ranks_i2t = one_to_one_ranks(*embeddings_file.read_embeddings(path), chunk=16)
    s = text @ image.T
    assert (s[np.arange(n)[:, None], np.arange(n)] == s[np.arange(n), np.arange(n)][:, None]).sum() > 2 * n
    assert list(ranks_t2i) == [int((s[i] > s[i, i]).sum()) for i in range(n)]
    assert list(ranks_i2t) == [int((s[:, j] > s[j, j]).sum()) for j in range(n)]
    table, info = embeddings_file.evaluate_embeddings_file(path, "official", chunk=16)
    t2i, i2t = reference_official(path)
    assert info["t2i"] == t2i and info["i2t"] == i2t
    assert table_numbers(table) == reference_table(t2i, i2t)


def test_seed_table_layout():
    """tabulate(..., headers=[Name, R@1, R@5, R@10, meanRecall], tablefmt="github", floatfmt=".2f")."""
    t2i = [0.659, 0.901, 0.961, (0.659 + 0.901 + 0.961) / 3]
    i2t = [0.665, 0.916, 1.0, (0.665 + 0.916 + 1.0) / 3]
    assert format_seed_table(t2i, i2t) == (
        "| Name       |   R@1 |   R@5 |   R@10 |   meanRecall |\n"
        "|------------|-------|-------|--------|--------------|\n"
        "| Text2Image | 65.90 | 90.10 |  96.10 |        84.03 |\n"
        "| Image2Text | 66.50 | 91.60 | 100.00 |        86.03 |\n"
        "| MeanRecall | 66.20 | 90.85 |  98.05 |        85.03 |"
    )


def test_reader_parallel_and_errors(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    text, image = unit(rng, 50, 12), unit(rng, 50, 12)
    path = tmp_path / "emb"
    write_embeddings(path, text, image)
    monkeypatch.setattr(embeddings_file, "PARALLEL_MIN_BYTES", 0)
    for workers in (1, 2, 3):
        t, i = embeddings_file.read_embeddings(path, workers=workers)
        np.testing.assert_array_equal(t, text)
        np.testing.assert_array_equal(i, image)
    lines = path.read_text().splitlines()
    cases = {
        "columns": lines[:7] + ["1 2 3\t1\t2\t1"] + lines[8:],
        "values": lines[:7] + [lines[7].replace(" ", " x", 1)] + lines[8:],
        "count": lines[:7] + [lines[7].split("\t")[0] + " 0.5\t" + lines[7].split("\t")[1] + "\t1"] + lines[8:],
        "shift": lines[:7] + [lines[7].split("\t")[0] + " 0.5\t" + lines[7].split("\t")[1].rsplit(" ", 1)[0] + "\t1"] + lines[8:],
    }
    for name, content in cases.items():
        path.write_text("\n".join(content) + "\n")
        for workers in (1, 2):
            with pytest.raises(embeddings_file.EmbeddingsFormatError, match="line 8"):
                embeddings_file.read_embeddings(path, workers=workers)
    for bad_at in (1, 26, 40, 50):  # in the first, a middle and the last parser's range
        content = lines[: bad_at - 1] + ["0.1 0.2\t0.3\t1"] + lines[bad_at:]
        path.write_text("\n".join(content) + "\n")
        for workers in (1, 2, 3):
            with pytest.raises(embeddings_file.EmbeddingsFormatError, match=f"line {bad_at}:"):
                embeddings_file.read_embeddings(path, workers=workers)
    path.write_text("\n".join(lines[:3]).replace("\n", "\r\n") + "\r\n")  # CRLF accepted
    assert embeddings_file.read_embeddings(path)[0].shape == (3, 12)
    path.write_bytes(b"\xef\xbb\xbf" + ("\n".join(lines) + "\n").encode())  # so is a BOM
    for workers in (1, 2):
        np.testing.assert_array_equal(embeddings_file.read_embeddings(path, workers=workers)[1], image)
    path.write_text("\n".join(lines))  # no newline at the end
    np.testing.assert_array_equal(embeddings_file.read_embeddings(path, workers=2)[0], text)
    monkeypatch.setattr(embeddings_file, "BLOCK_BYTES", 100)  # lines longer than a block
    np.testing.assert_array_equal(embeddings_file.read_embeddings(path, workers=2)[0], text)


def reference_multi(text, image, ids):
    """Brute force: unique images (first embedding per id); a query scores at K when any ground truth
    is in its top K; strict > ties."""
    uniq = list(dict.fromkeys(ids))
    first = [ids.index(u) for u in uniq]
    img = image[first]
    owner = np.array([uniq.index(i) for i in ids])
    s = text @ img.T
    t2i = [int((s[t] > s[t, owner[t]]).sum()) for t in range(len(text))]
    i2t = []
    for j in range(len(img)):
        own = owner == j
        best = s[own, j].max()
        i2t.append(int(((s[:, j] > best) & ~own).sum()))

    def pct(r):
        return [100.0 * np.mean(np.array(r) < k) for k in (1, 5, 10)]

    return pct(t2i), pct(i2t), len(uniq)


def test_multi_protocol_groups_by_image_id(tmp_path):
    rng = np.random.default_rng(2)
    n_img, n_txt, d = 15, 48, 16
    base = unit(rng, n_img, d)
    owner = np.concatenate([np.arange(n_img), rng.integers(0, n_img, n_txt - n_img)])
    rng.shuffle(owner)
    ids = [f"coco_{k}" for k in owner]
    text = base[owner] + 0.7 * unit(rng, n_txt, d)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    image = base[owner] + 0.05 * unit(rng, n_txt, d)  # each line carries its own copy of the image
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    path = tmp_path / "emb"
    write_embeddings(path, text, image)
    text, image = embeddings_file.read_embeddings(path)
    t2i, i2t, n_unique = reference_multi(text, image, ids)
    _, info = embeddings_file.evaluate_embeddings_file(path, "multi", ids, chunk=5)
    assert info["images"] == n_unique == n_img and info["texts"] == n_txt
    assert [info[f"t2i_r{k}"] for k in (1, 5, 10)] == pytest.approx(t2i)
    assert [info[f"i2t_r{k}"] for k in (1, 5, 10)] == pytest.approx(i2t)

    # ids from the sidecar, from --ids, from --test-file
    Path(f"{path}.ids.txt").write_text("\n".join(ids) + "\n")
    proc = run_eval_retri(str(path), "--protocol", "multi")
    assert proc.returncode == 0, proc.stderr
    out_sidecar = proc.stdout
    assert f"multi-caption protocol: {n_txt} texts, {n_img} images" in out_sidecar
    assert out_sidecar.split("\n", 1)[1] == seed_table_from_metrics(info) + "\n"
    ids_file = tmp_path / "ids"
    ids_file.write_text("\n".join(ids) + "\n")
    assert run_eval_retri(str(path), "--protocol", "multi", "--ids", str(ids_file)).stdout == out_sidecar
    test_file = tmp_path / "test.tsv"
    test_file.write_text("".join(f"caption {k}\t{i}\tAAAA\n" for k, i in enumerate(ids)))
    assert run_eval_retri(str(path), "--protocol", "multi", "--test-file", str(test_file)).stdout == out_sidecar
    # a wrong id count is refused with a hint
    ids_file.write_text("\n".join(ids[:-1]) + "\n")
    proc = run_eval_retri(str(path), "--protocol", "multi", "--ids", str(ids_file))
    assert proc.returncode == 2 and "O.ids.txt" in proc.stderr and not proc.stdout
    # ids from nowhere, or from two places: a usage error
    Path(f"{path}.ids.txt").unlink()
    proc = run_eval_retri(str(path), "--protocol", "multi")
    assert proc.returncode == 2 and "needs image ids" in proc.stderr
    proc = run_eval_retri(str(path), "--protocol", "multi", "--ids", str(ids_file), "--test-file", str(test_file))
    assert proc.returncode == 2 and "not both" in proc.stderr


def test_infer_then_eval_retri_cli(tmp_path, seed_file, vocab):
    out = tmp_path / "emb.out"
    infer_main(infer_cfg(model="tiny", test_file=seed_file, output_file=out, vocab_file=vocab))
    proc = run_eval_retri(str(out))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    # infer.py wrote the .npy sidecars too (the default), and eval_retri read them after verifying.
    assert lines[0] == "official 1:1 protocol: 10 texts, 10 images (read from the verified .npy sidecars)"
    assert lines[1].startswith("| Name ") and [ln.split("|")[1].strip() for ln in lines[3:]] == [
        "Text2Image", "Image2Text", "MeanRecall"]
    t2i, i2t = reference_official(out)
    assert table_numbers("\n".join(lines[1:])) == reference_table(t2i, i2t)


# --------------------------------------------------------------------------- end to end, base model
@pytest.mark.slow
def test_seed_sample_base_model_end_to_end(tmp_path, seed_sample, released_vocab):
    sample = seed_sample
    out = tmp_path / "sample.emb"
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "launch/infer.py", f"test_file={sample}", f"output_file={out}",
         f"vocab_file={released_vocab}", "seed=0", "device=cpu"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    infer_s = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run([sys.executable, "launch/eval_retri.py", str(out)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    total_s = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    n_lines = sum(1 for _ in open(sample, encoding="utf-8"))
    cols, text, image = read_output(out)
    assert len(cols) == n_lines and text.shape == (n_lines, 768)
    np.testing.assert_allclose(np.linalg.norm(image, axis=1), 1.0, atol=1e-5)
    assert "| Text2Image |" in proc.stdout
    print(f"\nbase model, {n_lines} lines: infer.py {infer_s:.1f} s, infer + eval_retri {total_s:.1f} s")
    assert total_s < 180


def test_fixed_width_fast_path_is_exact(tmp_path):
    """Files written by infer.py (``%+.8e``) take the vectorised parser: same float32 as float()."""
    rng = np.random.default_rng(7)
    n, d = 300, 16
    text = (rng.standard_normal((n, d)) * 10.0 ** rng.integers(-9, 13, (n, d))).astype(np.float32)
    image = rng.standard_normal((n, d)).astype(np.float32)
    text[0, :4] = [0.0, -0.0, 1.0, -1.0]
    image[1, :3] = [9.99999999e-1, 1e-13, 123456.789]
    path = tmp_path / "emb"
    write_embeddings(path, text, image)
    assert embeddings_file._parse_fixed_block(path.read_bytes(), d) is not None  # really the fast path
    t, i = embeddings_file.read_embeddings(path, workers=1)
    ref_t = np.array([[float(x) for x in line.split("\t")[0].split()] for line in path.read_text().splitlines()])
    np.testing.assert_array_equal(t, ref_t.astype(np.float32))
    np.testing.assert_array_equal(t, text)
    np.testing.assert_array_equal(i, image)
    assert np.signbit(t[0, 1]) and not np.signbit(t[0, 0])
    # values the fast path leaves to the general parser: whole block falls back, same result
    text[5, 5], image[7, 2] = np.float32(3e38), np.float32(1e-45)
    write_embeddings(path, text, image)
    assert embeddings_file._parse_fixed_block(path.read_bytes(), d) is None
    t, i = embeddings_file.read_embeddings(path, workers=1)
    np.testing.assert_array_equal(t, text)
    np.testing.assert_array_equal(i, image)
    # the upstream run_infer.py's writer (str of float32, variable width) goes through the general parser
    seed_style = "".join(" ".join(str(v) for v in a) + "\t" + " ".join(str(v) for v in b) + "\t1\n"
                         for a, b in zip(text, image))
    path.write_text(seed_style)
    t, i = embeddings_file.read_embeddings(path, workers=1)
    np.testing.assert_array_equal(t, text)
    np.testing.assert_array_equal(i, image)
