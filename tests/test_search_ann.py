"""The approximate IVF index of the photo search (ernievil2/search/ann.py): built above a size
threshold with its recall@10 against exact search measured and recorded, nprobe the smallest
reaching the target, queries through it, atomic saves, version-1 folders, and life without faiss."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from test_search import CAPTIONS, GOOD, REPO, _save_model, make_photos, write_photo

from ernievil2.search import (
    ANN_FILE,
    DEFAULT_MIN_ANN_SIZE,
    Encoder,
    ModelIdentity,
    SearchError,
    SearchIndex,
    ann,
    build_index,
    build_ivf,
    choose_nlist,
    load_encoder,
    load_index,
    query_text,
    top_k,
    topk,
)
from ernievil2.tokenizer import WordPieceTokenizer

pytest.importorskip("faiss", reason="needs faiss (the search extra: pip install -e '.[search]')")
pytestmark = pytest.mark.timeout(120)


def clustered(n: int, dim: int = 48, clusters: int = 60, latent: int = 12, spread: float = 0.6,
              seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` unit vectors from a mixture of Gaussian clusters in a ``latent``-dim subspace (plus a
    little isotropic noise), and 100 more drawn the same way (held out, for queries)."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((dim, latent)))[0].T
    centres = rng.standard_normal((clusters, latent))
    labels = rng.integers(0, clusters, n + 100)
    x = (centres[labels] + spread * rng.standard_normal((n + 100, latent))) @ basis
    x += 0.1 * rng.standard_normal(x.shape) / np.sqrt(dim)
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return x[:n], x[n:]


def identity(dim: int) -> ModelIdentity:
    return ModelIdentity(model_sha256="0" * 64, vocab_sha256="1" * 64, image_size=64, profile="official", dim=dim)


def vector_index(folder: Path, vectors: np.ndarray) -> SearchIndex:
    paths = [f"img{i:05d}.jpg" for i in range(len(vectors))]
    return SearchIndex(folder, folder.parent / "photos", paths, vectors, identity(vectors.shape[1]))


def same_hits(got: list, expected: list) -> None:
    """The same rows and paths in the same order, scores equal up to float rounding (faiss's kernels)."""
    assert [(h.path, h.index) for h in got] == [(h.path, h.index) for h in expected]
    np.testing.assert_allclose([h.score for h in got], [h.score for h in expected], atol=1e-5)


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Encoder:
    base = tmp_path_factory.mktemp("ckpt")
    vocab = WordPieceTokenizer.build_vocab(CAPTIONS * 3, base / "vocab.txt", vocab_size=300)
    return load_encoder(_save_model(base / "step_0000001", 0, Path(vocab)), device="cpu")


# --------------------------------------------------------------------------- the index itself
def test_ivf_reaches_the_target_recall_with_the_smallest_nprobe():
    vectors, held_out = clustered(6000, spread=0.9)
    index, info = build_ivf(vectors, sample_queries=200)
    assert (info.kind, info.count, info.nlist) == ("ivf-flat", 6000, choose_nlist(6000)) == ("ivf-flat", 6000, 64)
    assert info.recall_at_10 >= info.target_recall == 0.95 and 1 <= info.nprobe <= info.nlist
    assert info.sample_queries == 200 and "held-out" in info.sample and info.train_rows == 64 * 64
    rows, queries = ann._held_out_queries(vectors, 200, 1)  # build_ivf's sample (seed 0 + 1)
    truth = ann._drop_rows(top_k(vectors, queries, 11)[1], rows, 10)

    def recall(nprobe: int) -> float:
        return ann._recall(ann._drop_rows(ann.ivf_top_k(index, queries, 11, nprobe)[1], rows, 10), truth)

    assert recall(info.nprobe) == pytest.approx(info.recall_at_10, abs=1e-4)
    assert info.nprobe > 1 and recall(info.nprobe - 1) < 0.95  # the smallest that reaches it
    # queries the build never saw, drawn like the collection: about as good
    _, exact = top_k(vectors, held_out, 10)
    _, approx = ann.ivf_top_k(index, held_out, 10, info.nprobe)
    assert np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact)]) >= 0.9


def test_nlist_and_the_decision():
    assert [choose_nlist(n) for n in (1, 6, 100, 10_000, 100_000, 1_000_000)] == [1, 1, 2, 128, 256, 1024]
    assert ann.ann_decision("auto", 99, 100) == (False, "exact search (99 vectors < --min-ann-size 100)")
    assert ann.ann_decision("auto", 100, 100) == (True, "")
    assert ann.ann_decision("ivf", 5, 100) == (True, "") and ann.ann_decision("off", 10**6, 1)[0] is False
    with pytest.raises(SearchError, match="unknown --ann mode"):
        ann.ann_decision("hnsw", 10, 1)


def test_ivf_results_equal_exact_on_easy_data(tmp_path):
    vectors, held_out = clustered(3000, clusters=30, spread=0.2, seed=1)  # tight clusters far apart
    index = vector_index(tmp_path / "idx", vectors)
    info = index.build_ann(sample_queries=100, target_recall=1.0)  # nprobe: every sample query exact
    assert info.recall_at_10 == 1.0 and info.nprobe < info.nlist
    index.save()
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == [ANN_FILE, "index.json", "paths.json", "vectors.npy"]
    meta = json.loads((tmp_path / "idx" / "index.json").read_text(encoding="utf-8"))
    assert meta["version"] == 2 and meta["ann"] == info.to_json()
    loaded = load_index(tmp_path / "idx")
    assert loaded.ann == info and loaded.backend_for() == ("ivf", "") and loaded.backend_for("numpy") == ("numpy", "")
    approx, exact = loaded.search(held_out, k=10), loaded.search(held_out, k=10, backend="numpy")
    assert [[h.index for h in hs] for hs in approx] == [[h.index for h in hs] for hs in exact]
    np.testing.assert_allclose([[h.score for h in hs] for hs in approx], [[h.score for h in hs] for hs in exact],
                               atol=1e-5)
    assert all(h.path == str(tmp_path / "photos" / f"img{h.index:05d}.jpg") for h in approx[0])


def test_ivf_ties_come_in_row_order(tmp_path):
    base, _ = clustered(400, clusters=4, spread=0.3, seed=2)
    vectors = np.concatenate([base, base, base])  # every score three times
    index = vector_index(tmp_path / "idx", vectors)
    index.build_ann(sample_queries=50, nlist=4)
    for q in base[:5]:
        (hits,) = index.search(q, k=9)
        assert [(-h.score, h.index) for h in hits] == sorted((-h.score, h.index) for h in hits)
        assert {h.index % 400 for h in hits[:3]} == {hits[0].index} and hits[0].index < 400


# --------------------------------------------------------------------------- build_index
def test_build_index_builds_it_above_the_threshold_only(tmp_path, encoder, monkeypatch):
    photos, folder = make_photos(tmp_path / "photos"), tmp_path / "idx"
    below = build_index(photos, folder, encoder, progress=False, min_ann_size=len(GOOD) + 1)
    assert not (folder / ANN_FILE).exists() and load_index(folder).ann is None
    assert json.loads((folder / "index.json").read_text(encoding="utf-8"))["ann"] is None
    assert f"exact search ({len(GOOD)} vectors < --min-ann-size {len(GOOD) + 1})" in below.summary()

    embedded = []
    real = Encoder.encode_pixels
    monkeypatch.setattr(Encoder, "encode_pixels", lambda self, pixels: embedded.append(len(pixels)) or real(self, pixels))
    above = build_index(photos, folder, encoder, progress=False, min_ann_size=len(GOOD))  # no new photo: no embedding
    assert (above.added, embedded) == (0, [])
    info = load_index(folder).ann
    assert info is not None and info.count == len(GOOD) and info.recall_at_10 == 1.0 and (folder / ANN_FILE).is_file()
    assert json.loads((folder / "index.json").read_text(encoding="utf-8"))["ann"]["recall_at_10"] == 1.0
    assert "approximate search: IVF-Flat (nlist 1, nprobe 1): recall@10 1.000" in above.summary()
    index = load_index(folder)
    for text in CAPTIONS:
        same_hits(query_text(index, encoder, text, k=4), query_text(index, encoder, text, k=4, backend="numpy"))

    same = files(folder)
    again = build_index(photos, folder, encoder, progress=False, min_ann_size=len(GOOD))
    assert files(folder) == same and "recall@10 1.000" in again.summary()  # nothing to do: not rewritten
    write_photo(photos, "new.jpg", 64, 64, 77)
    grown = build_index(photos, folder, encoder, progress=False, min_ann_size=len(GOOD))
    assert grown.added == 1 and load_index(folder).ann.count == len(GOOD) + 1
    off = build_index(photos, folder, encoder, progress=False, ann="off")
    assert load_index(folder).ann is None and not (folder / ANN_FILE).exists() and "--ann off" in off.summary()


def test_the_periodic_saves_leave_it_out_and_a_save_failure_leaves_the_previous_index(tmp_path, encoder, monkeypatch):
    photos, folder = make_photos(tmp_path / "photos"), tmp_path / "idx"
    build_index(photos, folder, encoder, progress=False, ann="ivf")
    before = files(folder)
    assert ANN_FILE in before

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    write_photo(photos, "more.jpg", 64, 64, 78)
    monkeypatch.setattr(ann, "write_ivf", disk_full)
    with pytest.raises(OSError, match="No space"):
        build_index(photos, folder, encoder, progress=False, ann="ivf", save_every_s=3600)
    assert files(folder) == before  # the previous index, with its approximate index
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx", "photos"]  # no temporary left
    monkeypatch.undo()

    # a save that keeps the rows keeps the approximate index, byte for byte
    index = load_index(folder)
    index.ignored += 1
    index.save()
    assert files(folder)[ANN_FILE] == before[ANN_FILE] and load_index(folder).ann == index.ann
    # an interrupted run saves the rows it embedded without the approximate index (it covers
    # other rows); the next run builds it again
    real, calls = Encoder.encode_pixels, []

    def interrupted(self, pixels):
        calls.append(len(pixels))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, pixels)

    monkeypatch.setattr(Encoder, "encode_pixels", interrupted)
    write_photo(photos, "later1.jpg", 64, 64, 79)
    write_photo(photos, "later2.jpg", 64, 64, 80)
    with pytest.raises(KeyboardInterrupt):
        build_index(photos, folder, encoder, progress=False, ann="ivf", batch_size=1, save_every_s=3600)
    partial = load_index(folder)
    assert len(partial) == len(GOOD) + 1 and partial.ann is None and not (folder / ANN_FILE).exists()
    monkeypatch.undo()
    resumed = build_index(photos, folder, encoder, progress=False, ann="ivf")
    assert resumed.added == 2 and load_index(folder).ann.count == len(GOOD) + 3


def test_a_version_1_index_loads_and_is_searched_exactly(tmp_path, encoder):
    photos, folder = make_photos(tmp_path / "photos"), tmp_path / "idx"
    build_index(photos, folder, encoder, progress=False, ann="off")
    meta = json.loads((folder / "index.json").read_text(encoding="utf-8"))
    del meta["ann"]  # what the code before the approximate index wrote
    meta["version"] = 1
    (folder / "index.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    old = load_index(folder)
    assert old.ann is None and old.backend_for() == ("numpy", "")
    same_hits(query_text(old, encoder, CAPTIONS[0], k=3), query_text(old, encoder, CAPTIONS[0], k=3, backend="numpy"))
    build_index(photos, folder, encoder, progress=False, min_ann_size=1)  # the next run adds it
    upgraded = json.loads((folder / "index.json").read_text(encoding="utf-8"))
    assert upgraded["version"] == 2 and upgraded["ann"]["count"] == len(GOOD)


def test_without_faiss_auto_is_exact_with_a_note_and_ivf_an_error(tmp_path, encoder, monkeypatch):
    photos = make_photos(tmp_path / "photos")
    build_index(photos, tmp_path / "with", encoder, progress=False, ann="ivf")

    def no_faiss():
        raise SearchError(f"the faiss backend needs the faiss-cpu package: {topk.FAISS_HINT}")

    monkeypatch.setattr(topk, "_import_faiss", no_faiss)
    report = build_index(photos, tmp_path / "auto", encoder, progress=False, min_ann_size=1)
    assert report.index.ann is None and not (tmp_path / "auto" / ANN_FILE).exists()
    note = [ln.strip() for ln in report.summary().splitlines() if "exact search" in ln]
    assert note == [f"exact search: no approximate index without faiss; {topk.FAISS_HINT}"]
    with pytest.raises(SearchError, match=r"faiss-cpu"):
        build_index(photos, tmp_path / "ivf", encoder, progress=False, ann="ivf")
    assert not (tmp_path / "ivf").exists()  # refused before any work
    kept = build_index(photos, tmp_path / "with", encoder, progress=False, min_ann_size=1)
    assert kept.index.ann is not None and (tmp_path / "with" / ANN_FILE).is_file()  # not thrown away
    index = load_index(tmp_path / "with")  # has one: searched exactly, and told
    backend, why = index.backend_for()
    assert backend == "numpy" and "faiss" in why
    assert query_text(index, encoder, CAPTIONS[1], k=3)[0].path.startswith(str(photos.resolve()))
    with pytest.raises(SearchError, match="faiss-cpu"):
        index.search(encoder.encode_texts(["x"]), backend="ivf")


# --------------------------------------------------------------------------- the command line
def _search_main():
    spec = importlib.util.spec_from_file_location("search_cli", REPO / "launch" / "search.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_cli_flags(tmp_path, encoder, capsys, monkeypatch):
    main = _search_main()
    index_help = main.__globals__["build_parser"]()._subparsers._group_actions[0].choices["index"].format_help()
    assert f"default: {DEFAULT_MIN_ANN_SIZE}," in " ".join(index_help.split())  # the help says the library's default
    photos, folder = make_photos(tmp_path / "photos"), tmp_path / "idx"
    ckpt = encoder.checkpoint
    assert main(["index", "--images", str(photos), "--ckpt", ckpt, "--out", str(folder), "--no-progress",
                 "--min-ann-size", "3"]) == 0
    assert "approximate search: IVF-Flat" in capsys.readouterr().out and (folder / ANN_FILE).is_file()
    assert main(["query", str(folder), CAPTIONS[0], "--k", "3"]) == 0
    approx = capsys.readouterr().out
    assert main(["query", str(folder), CAPTIONS[0], "--k", "3", "--exact"]) == 0
    assert capsys.readouterr().out == approx and len(approx.splitlines()) == 3
    with pytest.raises(SystemExit):
        main(["query", str(folder), "x", "--exact", "--faiss"])
    capsys.readouterr()
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss -> ImportError
    assert main(["query", str(folder), CAPTIONS[0], "--k", "3"]) == 0
    out = capsys.readouterr()
    assert out.out == approx and out.err.strip().startswith("search.py: note: exact search: the approximate index")
    assert main(["index", "--images", str(photos), "--ckpt", ckpt, "--out", str(tmp_path / "j"), "--ann", "ivf"]) == 2
    assert "search.py: error: the faiss backend needs the faiss-cpu package" in capsys.readouterr().err
