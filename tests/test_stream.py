"""Training stream: sources mixed by weight, exact and resampled epochs,
epoch accounting from sizes.json, http(s) and pipe: shard URLs, exact resume with 0, 1 and 2 loader
workers, and the has_objects mask over mixed sources."""
from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from ernievil2.data.loader import (
    StreamSource,
    TrainStream,
    build_train_data,
    mix,
    round_robin_skips,
)
from ernievil2.data.sample import BadSample, RawSample
from ernievil2.data.shard_reader import read_sizes
from ernievil2.data.shard_writer import ShardWriter
from ernievil2.data.views import MultiViewTransform, ViewConfig
from ernievil2.tokenizer import WordPieceTokenizer

SIZES = (7, 5, 9)  # samples per shard: uneven, so the two workers of a rank yield different batch counts


def _jpeg(i: int) -> bytes:
    rng = np.random.default_rng(i)
    ok, buf = cv2.imencode(".jpg", rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    assert ok
    return buf.tobytes()


def write_shards(out: Path, sizes=SIZES, prefix: str = "s", objects: bool = False, start: int = 0) -> Path:
    """Shards of ``sizes`` samples; key ``{prefix}{number}``, number counting from ``start``."""
    i = start
    for n in sizes:  # one writer per shard size (max_samples fixes a writer's shard length)
        with ShardWriter(out, prefix=f"{prefix}{i:04d}", max_samples=n) as w:
            for _ in range(n):
                w.write(RawSample(key=f"{prefix}{i:05d}", image=_jpeg(i), captions=[f"caption {i}"],
                                  objects=[f"thing {i}"] if objects else None))
                i += 1
    sizes_json = {p.name: n for p, n in zip(sorted(out.glob("*.tar")), sizes)}
    (out / "sizes.json").write_text(__import__("json").dumps(sizes_json))
    return out


class KeyTransform:
    """A cheap transform: the key's number and a value drawn from (epoch, key); ``validate`` checks the image."""

    def __call__(self, sample: RawSample, epoch: int) -> dict:
        self.validate(sample)
        number = int(sample.key.lstrip("abcdefghijklmnopqrstuvwxyz"))
        noise = np.random.default_rng([epoch, number]).random(3).astype(np.float32)
        return {"idx": np.array(number, dtype=np.int64), "noise": noise}

    def validate(self, sample: RawSample) -> None:
        if cv2.imdecode(np.frombuffer(sample.image, np.uint8), cv2.IMREAD_COLOR) is None:
            raise BadSample("corrupt_image", f"sample {sample.key}: not an image")


def _arrays(batches) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for b in batches:
        out.append((np.asarray(b["idx"].numpy() if hasattr(b["idx"], "numpy") else b["idx"]),
                    np.asarray(b["noise"].numpy() if hasattr(b["noise"], "numpy") else b["noise"])))
    return out


def _loader(sources, num_workers: int, batch_size: int = 2, shuffle_buffer: int = 4):
    return build_train_data(sources, KeyTransform(), batch_size=batch_size, num_workers=num_workers,
                            shuffle_buffer=shuffle_buffer, seed=3, world_size=1)


@pytest.fixture(autouse=True)
def _one_process(monkeypatch):
    for var in ("PADDLE_TRAINER_ID", "PADDLE_TRAINERS_NUM", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)


def test_round_robin_skips_matches_paddle_order():
    # paddle 3.3.1, 3 workers with 2, 5, 3 batches yields w0 w1 w2 w0 w1 w2 w1 w2 w1 w1
    order = [0, 1, 2, 0, 1, 2, 1, 2, 1, 1]
    for k in range(len(order) + 1):
        taken, first = round_robin_skips([2, 5, 3], k)
        assert taken == [order[:k].count(w) for w in range(3)]
        assert first == (order[k] if k < len(order) else 0)
    assert round_robin_skips([0, 3], 2) == ([0, 2], 1)
    with pytest.raises(ValueError, match="cannot skip 11 batches"):
        round_robin_skips([2, 5, 3], 11)


def test_mix_follows_weights_and_drops_exhausted_sources():
    rng = np.random.default_rng(0)
    out = list(mix([iter(["a"] * 30), iter(["b"] * 3000)], [0.9, 0.1], [False, False], rng))
    assert out.count("a") == 30 and out.count("b") == 3000  # exact sources: every item once
    first = out[:40]
    assert first.count("a") > 20, "weight 0.9 must put most of source a first"
    endless = mix([iter(["a"] * 5), iter(lambda: "b", None)], [1.0, 1.0], [False, True], np.random.default_rng(1))
    assert list(endless).count("a") == 5  # ends with the last finite source


@pytest.mark.timeout(120)
@pytest.mark.parametrize("num_workers", [0, 1, 2])
def test_exact_resume_equals_the_rest_of_the_epoch(tmp_path, num_workers):
    shards = write_shards(tmp_path / "a", sizes=(7, 5, 9, 4))
    loader = _loader([StreamSource.of("a", shards)], num_workers)
    full = _arrays(loader.batches(1))
    assert loader.samples_per_epoch == 25 == read_sizes([str(p) for p in sorted(shards.glob("*.tar"))])
    assert len(full) == loader.batches_per_epoch(1)
    seen = np.concatenate([idx for idx, _ in full])
    assert len(seen) == len(set(seen.tolist())), "an exact epoch reads no sample twice"
    if num_workers == 2:  # workers read 7+9 and 5+4 samples: 8 and 4 batches of 2
        assert len(full) == 12 and len(seen) == 24
    for k in sorted({1, 3, len(full) // 2 + 1, len(full) - 2, len(full)}):
        resumed = _arrays(loader.batches(1, skip_batches=k))
        assert len(resumed) == len(full) - k, k
        for (idx, noise), (idx_ref, noise_ref) in zip(resumed, full[k:]):
            np.testing.assert_array_equal(idx, idx_ref)
            np.testing.assert_array_equal(noise, noise_ref)
    other_epoch = np.concatenate([idx for idx, _ in _arrays(loader.batches(2))])
    assert other_epoch.tolist() != seen.tolist()


@pytest.mark.timeout(120)
def test_exact_resume_with_bad_samples_two_workers(tmp_path):
    """Bad samples change no worker's batch count (its last batches are topped up), so the resume
    position still follows from the batch count."""
    shards = write_shards(tmp_path / "a", sizes=(7, 5, 9, 4))
    # corrupt three images of the first shard: the stream drops them
    import io
    import tarfile
    first = min(shards.glob("*.tar"))
    with tarfile.open(first) as tin:
        members = [(m, tin.extractfile(m).read()) for m in tin.getmembers()]
    with tarfile.open(first, "w") as tout:
        for m, data in members:
            if m.name.endswith(".jpg") and m.name[:-4] in ("s00001", "s00002", "s00003"):
                data = b"not a jpeg"
            m.size = len(data)
            tout.addfile(m, io.BytesIO(data))
    loader = _loader([StreamSource.of("a", shards)], 2)
    batches = list(loader.batches(0))
    full = _arrays(batches)
    assert len(full) == 12  # as without the bad samples
    assert sum(b.get("skipped", {}).get("corrupt_image", 0) for b in batches) == 3
    for k in (2, 7, 11):
        resumed = list(loader.batches(0, skip_batches=k))
        for (idx, noise), (idx_ref, noise_ref) in zip(_arrays(resumed), full[k:]):
            np.testing.assert_array_equal(idx, idx_ref)
            np.testing.assert_array_equal(noise, noise_ref)
        assert len(resumed) == 12 - k
        # bad samples before the checkpoint were reported then, not again
        reported_before = sum(b.get("skipped", {}).get("corrupt_image", 0) for b in batches[:k])
        assert sum(b.get("skipped", {}).get("corrupt_image", 0) for b in resumed) == 3 - reported_before


@pytest.mark.timeout(120)
def test_resampled_resume_continues(tmp_path):
    shards = write_shards(tmp_path / "a", sizes=(7, 5))
    loader = _loader([StreamSource.of("a", shards, resampled=True)], 2)
    assert loader.samples_per_epoch is None and loader.batches_per_epoch(0) is None

    def take(skip: int, n: int = 12) -> np.ndarray:
        it = loader.batches(0, skip_batches=skip)
        out = [np.asarray(next(it)["idx"]) for _ in range(n)]
        it.close()
        return np.stack(out)

    restart, again = take(0), take(0)
    np.testing.assert_array_equal(restart, again)  # deterministic
    resumed, resumed_again = take(6), take(6)
    np.testing.assert_array_equal(resumed, resumed_again)
    assert not np.array_equal(resumed, restart), "a resumed endless stream must not replay its start"
    assert set(np.unique(resumed).tolist()) <= set(range(12))


@pytest.mark.timeout(120)
def test_mixed_sources_weights_and_objects_mask(tmp_path):
    tagged = write_shards(tmp_path / "coco", sizes=(20, 20), prefix="c", objects=True)
    plain = write_shards(tmp_path / "web", sizes=(20, 20), prefix="w", start=1000)
    # any WordPiece vocab does: a stand-in built here
    tok = WordPieceTokenizer(WordPieceTokenizer.build_vocab(["the picture contains a dog, a cat"], tmp_path / "vocab.txt",
                                                            vocab_size=60))
    transform = MultiViewTransform(ViewConfig(image_size=16, min_image_side=4), tok, max_length=12, seed=0,
                                   views=["image", "caption_ids", "objects_ids"])
    sources = [StreamSource.of("coco", tagged, weight=0.25), StreamSource.of("web", plain, weight=0.75, resampled=True)]
    stream = TrainStream(sources, transform, batch_size=8, shuffle_buffer=0, seed=1)
    stream.set_position(0)
    keys_mask = []
    for batch in stream:
        ids = batch["objects_ids"]
        for row, flag in zip(ids, batch["has_objects"]):
            keys_mask.append((bool(flag), bool((row != tok.pad_id).any())))
    # every tagged sample, once; the resampled web source fills in at its weight until coco is done
    n_tagged = sum(flag for flag, _ in keys_mask)
    assert all(flag == has_text for flag, has_text in keys_mask), "has_objects must match the objects text"
    assert len(keys_mask) == stream.raw_samples(0, 0, 1) // 8 * 8
    assert 36 <= n_tagged <= 40 and len(keys_mask) - n_tagged > 2 * n_tagged


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def http_root(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                             "--directory", str(root)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        yield root, f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.timeout(120)
def test_http_and_pipe_urls_read_like_local_files(http_root, tmp_path):
    root, base = http_root
    write_shards(root, sizes=(6, 6))
    local = _arrays(_loader([StreamSource.of("a", root)], 0).batches(0))
    names = sorted(p.name for p in root.glob("*.tar"))
    http = _loader([StreamSource.of("a", [f"{base}/{n}" for n in names])], 0)
    assert http.samples_per_epoch == 12  # sizes.json fetched over HTTP
    pipe = _loader([StreamSource.of("a", [f"pipe:cat {root / n}" for n in names])], 0)
    assert pipe.samples_per_epoch == 12  # no sizes.json for pipes: counted once
    for other in (http, pipe):
        got = _arrays(other.batches(0))
        # the shard permutation and shuffle depend on the shard index, not its URL
        assert [i.tolist() for i, _ in got] == [i.tolist() for i, _ in local]
