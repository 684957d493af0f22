"""Filtering by the model (ernievil2.filtering, launch/filter.py, launch/pack.py --keep-keys): scores
equal an independent computation, resumable sidecars that refuse what changed, bad samples counted,
ranks splitting shards, a global cut of exact size, and the re-pack keeping exactly the listed keys."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import cv2
import numpy as np
import paddle
import pytest

from ernievil2.data import preprocess
from ernievil2.data.sample import RawSample
from ernievil2.data.shard_reader import iter_samples, list_shards
from ernievil2.data.shard_writer import ShardWriter
from ernievil2.distributed import DistInfo
from ernievil2.filtering import FilterError, ShardScores, read_sidecar, sidecar_path
from ernievil2.filtering.score import ScoreOptions, score_shards
from ernievil2.filtering.select import read_scores, select_keys, write_selection
from ernievil2.models import build_model, model_config
from ernievil2.search import load_encoder
from ernievil2.tokenizer import WordPieceTokenizer
from ernievil2.weights.save import save_checkpoint

REPO = Path(__file__).resolve().parents[1]
WORDS = ["red", "blue", "circle", "square", "a", "large", "small", "green", "triangle", "left", "of"]
QUIET = ScoreOptions(batch_size=4, workers=2, progress=False)


def _jpeg(i: int, size: int = 40) -> bytes:
    rng = np.random.default_rng(i)
    img = cv2.resize(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8), (size + i % 7, size), interpolation=cv2.INTER_LINEAR)
    ok, buf = cv2.imencode(".jpg", img)
    assert ok
    return buf.tobytes()


def _captions(i: int) -> list[str]:
    rng = np.random.default_rng(1000 + i)
    return [" ".join(rng.choice(WORDS, 4)) for _ in range(1 + i % 3)]


def write_shards(folder: Path, n: int = 22, per_shard: int = 8, start: int = 0) -> list[RawSample]:
    samples = [RawSample(f"k{start + i:04d}", _jpeg(start + i), _captions(start + i)) for i in range(n)]
    with ShardWriter(folder, max_samples=per_shard) as w:
        for s in samples:
            w.write(s, "jpg")
    return samples


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    paddle.set_device("cpu")
    vocab = WordPieceTokenizer.build_vocab([" ".join(WORDS)] * 3, tmp_path_factory.mktemp("vocab") / "vocab.txt",
                                           vocab_size=300)
    paddle.seed(0)
    model = build_model(model_config("tiny", text={"vocab_size": 300}))
    return save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "step_0000001", files={"vocab.txt": Path(vocab)})


@pytest.fixture(scope="module")
def encoder(ckpt):
    return load_encoder(ckpt, device="cpu", text_max_length=16)


def _expected(encoder, sample: RawSample) -> np.ndarray:
    """Cosines of a sample's captions with its image, computed here from the model's own calls."""
    model, size = encoder.model, encoder.image_size
    pixels = preprocess.preprocess(sample.image, "official", size)[None]
    with paddle.no_grad():
        model.eval()
        img = model.encode_image(paddle.to_tensor(pixels)).numpy()[0]
        ids = encoder.tokenizer(sample.captions, 16)
        txt = model.encode_text(paddle.to_tensor(ids)).numpy()
    img, txt = img / np.linalg.norm(img), txt / np.linalg.norm(txt, axis=1, keepdims=True)
    return txt @ img


def test_scores_equal_an_independent_computation(tmp_path, encoder):
    samples = write_shards(tmp_path / "shards")
    report = score_shards(tmp_path / "shards", tmp_path / "scores", encoder, QUIET)
    assert (report.shards, report.scored, report.samples, report.skipped) == (3, 3, 22, {})
    got = {}
    for s in read_scores(tmp_path / "scores"):
        for key, a, b in zip(s.keys, s.caption_offsets[:-1], s.caption_offsets[1:]):
            got[key] = s.caption_scores[a:b]
    assert list(got) == [s.key for s in samples]
    for sample in samples:
        np.testing.assert_allclose(got[sample.key], _expected(encoder, sample), atol=2e-5)
    shard = read_sidecar(sidecar_path(tmp_path / "scores", list_shards(tmp_path / "shards")[0]))
    first = np.array([got[k][0] for k in shard.keys])
    np.testing.assert_array_equal(shard.score("first"), first)
    np.testing.assert_allclose(shard.score("max"), [got[k].max() for k in shard.keys], rtol=1e-6)
    np.testing.assert_allclose(shard.score("mean"), [got[k].mean() for k in shard.keys], rtol=1e-6)
    assert shard.image_emb is None and shard.meta["model"]["text_max_length"] == 16


def test_embeddings_kept_as_float16_when_asked(tmp_path, encoder):
    write_shards(tmp_path / "shards", n=5)
    score_shards(tmp_path / "shards", tmp_path / "scores", encoder,
                 ScoreOptions(batch_size=2, keep_embeddings=True, progress=False))
    [s] = read_scores(tmp_path / "scores")
    assert s.image_emb.dtype == np.float16 and s.image_emb.shape == (5, encoder.identity.dim)
    first = (s.image_emb.astype(np.float32) * s.text_emb.astype(np.float32)).sum(1)
    np.testing.assert_allclose(first, s.score("first"), atol=3e-3)


def test_rerun_skips_finished_shards_and_refuses_what_changed(tmp_path, encoder, ckpt):
    write_shards(tmp_path / "shards")
    score_shards(tmp_path / "shards", tmp_path / "scores", encoder, QUIET)
    first = sorted(p.stat().st_mtime_ns for p in (tmp_path / "scores").iterdir())
    again = score_shards(tmp_path / "shards", tmp_path / "scores", encoder, QUIET)
    assert (again.scored, again.already_scored) == (0, 3)
    assert sorted(p.stat().st_mtime_ns for p in (tmp_path / "scores").iterdir()) == first
    # a killed run: one sidecar missing -> only that shard is scored
    urls = list_shards(tmp_path / "shards")
    sidecar_path(tmp_path / "scores", urls[1]).unlink()
    assert score_shards(tmp_path / "shards", tmp_path / "scores", encoder, QUIET).scored == 1
    # a shard rewritten after scoring is refused by name
    with open(urls[2], "ab") as f:
        f.write(b"\0" * 512)
    with pytest.raises(FilterError, match=r"shard .*000002\.tar changed since it was scored"):
        score_shards(tmp_path / "shards", tmp_path / "scores", encoder, QUIET)
    # another model's sidecars are not mixed in
    other = load_encoder(ckpt, device="cpu", text_max_length=12)
    with pytest.raises(FilterError, match="another model or settings"):
        score_shards(tmp_path / "shards", tmp_path / "scores", other, QUIET)


def test_corrupt_sidecar_is_named(tmp_path, encoder):
    write_shards(tmp_path / "shards", n=6, per_shard=3)
    score_shards(tmp_path / "shards", tmp_path / "scores", encoder, QUIET)
    victim = sorted((tmp_path / "scores").iterdir())[1]
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.raises(FilterError, match=rf"{victim.name}: not a readable score sidecar"):
        read_scores(tmp_path / "scores")
    s = ShardScores.from_lists("x.tar", ["a", "b"], [np.ones(1), np.ones(2)], {})
    s.caption_offsets = np.array([0, 3, 2])  # not increasing: offsets and scores disagree
    s.write(tmp_path / "bad.scores.npz")
    with pytest.raises(FilterError, match="bad.scores.npz: corrupt score sidecar"):
        read_sidecar(tmp_path / "bad.scores.npz")
    with pytest.raises(FilterError, match="score folder not found"):
        read_scores(tmp_path / "nowhere")


def _tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_bad_samples_are_counted_by_kind(tmp_path, encoder):
    folder = tmp_path / "shards"
    folder.mkdir()
    cap = json.dumps({"captions": ["red circle"]}).encode()
    _tar(folder / "a.tar", {"good.jpg": _jpeg(1), "good.json": cap, "broken.jpg": b"\xff\xd8 not a jpeg",
                            "broken.json": cap, "nocap.jpg": _jpeg(2), "ok2.jpg": _jpeg(3), "ok2.txt": b"blue square"})
    report = score_shards(folder, tmp_path / "scores", encoder, QUIET)
    assert report.samples == 2 and report.skipped == {"corrupt_image": 1, "no_caption": 1}
    [s] = read_scores(tmp_path / "scores")
    assert s.keys == ["good", "ok2"] and s.meta["skipped"] == {"corrupt_image": 1, "no_caption": 1}
    with pytest.raises(FilterError, match="shard not found: .*missing.tar"):
        score_shards([str(folder / "a.tar"), str(folder / "missing.tar")], tmp_path / "s2", encoder, QUIET)


def test_ranks_split_the_shards(tmp_path, encoder):
    write_shards(tmp_path / "shards", n=30, per_shard=6)
    r0 = score_shards(tmp_path / "shards", tmp_path / "scores", encoder, QUIET, DistInfo(0, 2))
    names0 = {p.name for p in (tmp_path / "scores").iterdir()}
    r1 = score_shards(tmp_path / "shards", tmp_path / "scores", encoder, QUIET, DistInfo(1, 2))
    assert (r0.shards, r1.shards, r0.samples + r1.samples) == (3, 2, 30)
    assert len(names0) == 3 and len(list((tmp_path / "scores").iterdir())) == 5


def _scores(shard: str, keys: list[str], values: list[float]) -> ShardScores:
    return ShardScores.from_lists(shard, keys, [np.array([v], np.float32) for v in values], {"model": "m"})


def test_fraction_keeps_exactly_the_best_share_across_shards():
    a = _scores("/d/x/a.tar", ["a0", "a1", "a2", "a3"], [0.9, 0.1, 0.5, 0.5])
    b = _scores("/d/y/b.tar", ["b0", "b1", "b2"], [0.5, 0.8, 0.2])
    sel = select_keys([a, b], fraction=0.5)  # ceil(3.5) = 4 of 7: 0.9, 0.8, then the first two 0.5s in order
    assert sel.keys == ["a0", "a2", "a3", "b1"] and sel.thresholds == {"all": pytest.approx(0.5)}
    assert sel.per_shard == {"/d/x/a.tar": [3, 4], "/d/y/b.tar": [1, 3]}
    thr = select_keys([a, b], threshold=0.5)
    assert thr.keys == ["a0", "a2", "a3", "b0", "b1"]
    per = select_keys([a, b], fraction=1 / 3, per_source=True)  # ceil(4/3)=2 of x, 1 of y
    assert per.keys == ["a0", "a2", "b1"] and set(per.thresholds) == {"/d/x", "/d/y"}
    with pytest.raises(FilterError, match="exactly one of"):
        select_keys([a], fraction=0.5, threshold=0.1)
    with pytest.raises(FilterError, match=r"--fraction must be in \(0, 1\]"):
        select_keys([a], fraction=0.0)


def test_select_writes_keys_summary_and_histogram(tmp_path):
    a = _scores("/d/a.tar", [f"k{i}" for i in range(50)], list(np.linspace(0, 1, 50)))
    sel = select_keys([a], fraction=0.3)
    out = tmp_path / "keep.txt"
    keep, summary, png = write_selection(sel, out, sel.summary(0.3, None, "first"))
    assert keep.read_text().split() == [f"k{i}" for i in range(35, 50)]
    data = json.loads(summary.read_text())
    assert (data["kept"], data["total"], data["fraction"]) == (15, 50, 0.3)
    assert data["thresholds"]["all"] == pytest.approx(35 / 49) and data["per_shard"]["/d/a.tar"] == {"kept": 15, "total": 50}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _pack(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "launch/pack.py", *args, "--no-progress"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_pack_keeps_exactly_the_listed_keys(tmp_path):
    samples = write_shards(tmp_path / "src", n=20, per_shard=6)
    wanted = [s.key for s in samples[::3]]
    (tmp_path / "keep.txt").write_text("\n".join(wanted + ["", "no_such_key"]) + "\n")
    proc = _pack("--format", "shards", "--input", str(tmp_path / "src"), "--keep-keys", str(tmp_path / "keep.txt"),
                 "--output", str(tmp_path / "dst"), "--samples-per-shard", "4")
    assert proc.returncode == 0, proc.stderr
    assert "1 listed key(s) not in the input (e.g. no_such_key)" in proc.stdout
    got = list(iter_samples(tmp_path / "dst"))
    assert [s.key for s in got] == wanted and [s.captions for s in got] == [s.captions for s in samples[::3]]
    sizes = json.loads((tmp_path / "dst" / "sizes.json").read_text())
    assert sum(sizes.values()) == len(wanted) == 7
    summary = json.loads((tmp_path / "dst" / "pack_summary.json").read_text())
    assert summary["keep_keys"] == {"listed": 8, "left_out": 13, "not_found": 1, "not_found_examples": ["no_such_key"]}
    (tmp_path / "none.txt").write_text("ghost\n")
    proc = _pack("--format", "shards", "--input", str(tmp_path / "src"), "--keep-keys", str(tmp_path / "none.txt"),
                 "--output", str(tmp_path / "dst2"))
    assert proc.returncode == 1 and "nothing was written" in proc.stderr
    (tmp_path / "empty.txt").write_text("\n")
    proc = _pack("--format", "shards", "--input", str(tmp_path / "src"), "--keep-keys", str(tmp_path / "empty.txt"),
                 "--output", str(tmp_path / "dst3"))
    assert proc.returncode == 2 and "empty.txt: lists no keys" in proc.stderr


@pytest.mark.slow
def test_filter_command_lines_score_select_and_repack(tmp_path, ckpt):
    """launch/filter.py score and select as a user runs them, then the re-pack; a bad folder exits 2."""
    write_shards(tmp_path / "web", n=12, per_shard=5)
    run = dict(cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    proc = subprocess.run([sys.executable, "launch/filter.py", "score", "--ckpt", str(ckpt), "--shards",
                           str(tmp_path / "web"), "--out", str(tmp_path / "scores"), "--no-progress"], **run)
    assert proc.returncode == 0, proc.stderr
    assert "scored 12 pair(s) in 3 shard(s)" in proc.stdout
    proc = subprocess.run([sys.executable, "launch/filter.py", "select", str(tmp_path / "scores"), "--fraction",
                           "0.5", "--out", str(tmp_path / "keep.txt")], **run)
    assert proc.returncode == 0, proc.stderr
    assert "kept 6 of 12 pair(s)" in proc.stdout and (tmp_path / "keep.txt.hist.png").is_file()
    assert _pack("--format", "shards", "--input", str(tmp_path / "web"), "--keep-keys", str(tmp_path / "keep.txt"),
                 "--output", str(tmp_path / "top")).returncode == 0
    assert len(list(iter_samples(tmp_path / "top"))) == 6
    proc = subprocess.run([sys.executable, "launch/filter.py", "select", str(tmp_path / "nowhere"), "--fraction",
                           "0.5", "--out", str(tmp_path / "k2.txt")], **run)
    assert proc.returncode == 2 and "score folder not found" in proc.stderr and not (tmp_path / "k2.txt").exists()


def _sidecar_arrays(folder: Path) -> dict[str, tuple]:
    return {p.name: (s.keys, s.caption_scores.tolist(), s.caption_offsets.tolist())
            for p in sorted(folder.glob("*.scores.npz")) for s in [read_sidecar(p)]}


@pytest.mark.slow
def test_killed_scoring_resumes_to_the_same_sidecars(tmp_path, ckpt):
    """SIGKILL `score` once some shards are done; the rerun scores only the rest, and every sidecar
    equals an uninterrupted run's; no temporary file is left."""
    write_shards(tmp_path / "web", n=96, per_shard=8)
    cmd = [sys.executable, "launch/filter.py", "score", "--ckpt", str(ckpt), "--shards", str(tmp_path / "web"),
           "--batch-size", "2", "--workers", "1", "--no-progress", "--out"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([*cmd, str(tmp_path / "killed")], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while len(list((tmp_path / "killed").glob("*.scores.npz"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    done = len(list((tmp_path / "killed").glob("*.scores.npz")))
    assert 2 <= done < 12, "the kill came too late to test a resume"
    rerun = subprocess.run([*cmd, str(tmp_path / "killed")], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"in {12 - done} shard(s)" in rerun.stdout and f"{done} of 12 shard(s) already scored" in rerun.stdout
    whole = subprocess.run([*cmd, str(tmp_path / "whole")], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=300)
    assert whole.returncode == 0, whole.stderr
    assert _sidecar_arrays(tmp_path / "killed") == _sidecar_arrays(tmp_path / "whole")
    assert sorted(p.name for p in (tmp_path / "killed").iterdir()) == sorted(_sidecar_arrays(tmp_path / "whole"))


@pytest.mark.slow
def test_two_launched_ranks_score_disjoint_shards_covering_all(tmp_path, ckpt):
    write_shards(tmp_path / "web", n=25, per_shard=5)
    proc = subprocess.run(
        [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", str(tmp_path / "logs"),
         "launch/filter.py", "score", "--ckpt", str(ckpt), "--shards", str(tmp_path / "web"), "--out",
         str(tmp_path / "scores"), "--device", "cpu", "--no-progress"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    logs = "".join(p.read_text() for p in sorted((tmp_path / "logs").glob("workerlog.*")))
    assert proc.returncode == 0, proc.stderr + logs
    assert "rank 0: scored 15 pair(s) in 3 shard(s)" in logs and "rank 1: scored 10 pair(s) in 2 shard(s)" in logs
    keys = [k for s in read_scores(tmp_path / "scores") for k in s.keys]
    assert sorted(keys) == [f"k{i:04d}" for i in range(25)]


def test_first_caption_only_scores_the_same_first_caption(tmp_path, encoder):
    write_shards(tmp_path / "shards", n=9, per_shard=5)
    score_shards(tmp_path / "shards", tmp_path / "all", encoder, QUIET)
    first = ScoreOptions(batch_size=4, progress=False, captions="first")
    score_shards(tmp_path / "shards", tmp_path / "first", encoder, first)
    every, one = read_scores(tmp_path / "all"), read_scores(tmp_path / "first")
    for a, b in zip(every, one):
        assert b.keys == a.keys and list(np.diff(b.caption_offsets)) == [1] * len(b)
        np.testing.assert_allclose(b.score("first"), a.score("first"), atol=2e-6)
    with pytest.raises(FilterError, match="another model or settings"):  # a folder holds one setting
        score_shards(tmp_path / "shards", tmp_path / "all", encoder, first)
    with pytest.raises(FilterError, match="captions must be 'all' or 'first'"):
        ScoreOptions(captions="some")
