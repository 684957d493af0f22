"""The training stream (:class:`ernievil2.data.loader.TrainStream`) across ranks, with real processes
(``paddle.distributed.launch`` on CPU, ``tests/dist_data_worker.py``).

- 2 ranks × 2 loader workers over 6 uneven shards: every sample of an epoch is read exactly once
  across the job, in each of two epochs, and every (rank, worker) reads some.
- Fewer shards than ranks × workers: the job exits non-zero with a message that names the numbers
  and the ways out (``data.resampled=true``, fewer workers), both through the main-process check
  that ``run.py`` makes (``build_train_data``) and through the loader workers alone; nothing hangs.
- A resampled source over the same too-few shards runs: an endless stream per reader.
- ``launch/train.py`` wires ``data.resampled``.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import paddle
import pytest

from ernievil2.data.loader import StreamSource, TrainStream, build_train_data
from ernievil2.data.loader_workers import iterate_loader
from ernievil2.data.sample import RawSample
from ernievil2.data.shard_writer import ShardWriter

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKER = REPO_ROOT / "tests" / "dist_data_worker.py"
TIMEOUT_S = 120
# The same words in the main process (check_readers) and inside a loader worker.
TOO_FEW = re.escape("source 'train': 3 shard(s) cannot feed 2 rank(s) x 2 loader worker(s) = 4 readers")


def _env() -> dict[str, str]:
    """This environment without launcher variables (the launcher sets its own)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PADDLE_") and k not in ("RANK", "WORLD_SIZE", "ERNIEVIL2_RUN_TIME")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _write_shards(out: Path, n: int, per_shard: int) -> Path:
    with ShardWriter(out, max_samples=per_shard) as w:
        for i in range(n):
            w.write(RawSample(key=f"s{i:05d}", image=b"\xff\xd8not-decoded", captions=[f"caption {i}"]))
    return out


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)


def _launch_worker(tmp: Path, shards: Path, *args: str, nproc: int = 2) -> tuple[subprocess.CompletedProcess, str]:
    """Run the data worker on ``nproc`` ranks; returns the launcher's result and all worker logs."""
    log_dir = tmp / "log"
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", str(nproc),
           "--log_dir", str(log_dir), str(WORKER), "--shards", str(shards), "--out", str(tmp / "out"), *args]
    proc = _run(cmd, tmp)
    logs = "".join(f"\n==== {p.name}\n{p.read_text(errors='replace')}" for p in sorted(log_dir.glob("workerlog.*")))
    return proc, logs


def _records(out: Path, world: int = 2) -> list[dict]:
    records = [json.loads((out / f"rank{r}.json").read_text(encoding="utf-8")) for r in range(world)]
    assert [(r["rank"], r["world"]) for r in records] == [(r, world) for r in range(world)]
    return records


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT_S)
def test_two_ranks_two_workers_read_each_sample_once(tmp_path):
    shards = _write_shards(tmp_path / "shards", n=40, per_shard=7)  # 6 shards: 7,7,7,7,7,5
    assert len(list(shards.glob("*.tar"))) == 6
    # Batches of 1: an exact epoch drops each reader's last partial batch, here there is none.
    proc, logs = _launch_worker(tmp_path, shards, "--workers", "2", "--epochs", "2", "--batch-size", "1")
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}{logs[-6000:]}"
    records = _records(tmp_path / "out")
    orders = []
    for epoch in range(2):
        for r in records:  # each rank yields the batches its loader announced (the trainer's epoch length)
            assert len(r["epochs"][epoch]["idx"]) == r["epochs"][epoch]["batches_per_epoch"], (r["rank"], epoch)
        everything = [i for r in records for i in r["epochs"][epoch]["idx"]]
        dup = {i: c for i, c in Counter(everything).items() if c > 1}
        assert not dup, f"epoch {epoch}: samples read more than once: {dup}"
        assert sorted(everything) == list(range(40)), f"epoch {epoch}: missing {set(range(40)) - set(everything)}"
        for r in records:
            # Both loader workers of both ranks read (4 readers, 6 shards: nobody idles).
            assert set(r["epochs"][epoch]["worker"]) == {0, 1}, (r["rank"], epoch)
        orders.append([r["epochs"][epoch]["idx"] for r in records])
    assert orders[0] != orders[1], "the epoch must change the shard permutation and the shuffle"


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT_S)
@pytest.mark.parametrize("precheck", [True, False], ids=["main_process_check", "loader_workers_only"])
def test_too_few_shards_fails_clearly(tmp_path, precheck):
    shards = _write_shards(tmp_path / "shards", n=21, per_shard=7)  # 3 shards for 4 readers
    args = ["--workers", "2"] + ([] if precheck else ["--no-precheck"])
    proc, logs = _launch_worker(tmp_path, shards, *args)
    assert proc.returncode != 0
    assert re.search(TOO_FEW, logs), logs[-6000:]
    assert "data.resampled=true" in logs and "fewer loader workers" in logs
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT_S)
def test_resampled_runs_with_too_few_shards(tmp_path):
    shards = _write_shards(tmp_path / "shards", n=21, per_shard=7)
    proc, logs = _launch_worker(tmp_path, shards, "--workers", "2", "--resampled", "--max-batches", "12",
                                "--batch-size", "4")
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}{logs[-6000:]}"
    records = _records(tmp_path / "out")
    streams = [r["epochs"][0]["idx"] for r in records]
    # 12 batches of 4 per rank: more than one pass over the 21 samples, so the stream did not end.
    assert [len(s) for s in streams] == [48, 48]
    assert all(0 <= i < 21 for s in streams for i in s)
    assert streams[0] != streams[1], "each rank (and worker) draws its own shard sequence"
    for r in records:
        assert set(r["epochs"][0]["worker"]) == {0, 1}


# ------------------------------------------------------------------------------------------------
# One process: the DataLoader error is a failure, not a hang; resampling in detail
# ------------------------------------------------------------------------------------------------


@pytest.mark.timeout(TIMEOUT_S)
def test_loader_workers_error_is_a_failure_not_a_hang(tmp_path):
    """Without the main-process check the error happens in a loader worker: paddle hands the main
    process only a generic SystemError (and re-raises the worker's error in a daemon thread that may
    not get to print it), but the run fails promptly and the workers have logged the message."""
    shards = _write_shards(tmp_path / "shards", n=7, per_shard=7)  # 1 shard, 2 workers
    proc = _run([sys.executable, str(WORKER), "--shards", str(shards), "--out", str(tmp_path / "out"),
                 "--workers", "2", "--no-precheck"], tmp_path)
    assert proc.returncode != 0
    assert "source 'train': 1 shard(s) cannot feed 1 rank(s) x 2 loader worker(s) = 2 readers" in proc.stderr, \
        proc.stderr[-4000:]
    assert "data.resampled=true" in proc.stderr


def _fake_rank(monkeypatch, rank: int, world: int, worker: int, workers: int) -> None:
    monkeypatch.setenv("PADDLE_TRAINER_ID", str(rank))
    monkeypatch.setenv("PADDLE_TRAINERS_NUM", str(world))
    monkeypatch.setattr(paddle.io, "get_worker_info", lambda: SimpleNamespace(id=worker, num_workers=workers))


def _stream(shards: Path, resampled: bool = False, **kw) -> TrainStream:
    """A training stream of one source, batches of one sample: ``{"idx": [number]}``."""
    return TrainStream([StreamSource.of("train", shards, resampled=resampled)],
                       lambda s, e: {"idx": np.asarray(int(s.key[1:]))}, batch_size=1, **kw)


def test_check_readers_in_the_main_process(tmp_path, monkeypatch):
    shards = _write_shards(tmp_path, n=21, per_shard=7)
    monkeypatch.setenv("PADDLE_TRAINER_ID", "1")
    monkeypatch.setenv("PADDLE_TRAINERS_NUM", "2")
    stream = _stream(shards)
    with pytest.raises(ValueError) as err:
        stream.check_readers(2)
    assert re.search(TOO_FEW, str(err.value)) and "data.resampled=true" in str(err.value)
    stream.check_readers(1)  # 2 readers, 3 shards
    stream.check_readers(0)  # reading in the main process: one reader per rank
    with pytest.raises(ValueError, match=r"3 shard\(s\) cannot feed 4 rank\(s\) x 1"):
        stream.check_readers(0, world=4)
    _stream(shards, split_by_rank=False).check_readers(3)
    _stream(shards, resampled=True).check_readers(64, world=1024)


def _take(stream: TrainStream, n: int, epoch: int = 0) -> list[int]:
    stream.set_position(epoch)
    it = iter(stream)
    out = [int(next(it)["idx"][0]) for _ in range(n)]
    it.close()
    return out


def test_resampled_stream_is_endless_and_seeded_per_reader(tmp_path, monkeypatch):
    shards = _write_shards(tmp_path, n=21, per_shard=7)
    streams = {}
    for rank in range(2):
        for worker in range(2):
            _fake_rank(monkeypatch, rank, 2, worker, 2)
            streams[(rank, worker)] = _take(_stream(shards, resampled=True, seed=4), 100)
    assert all(len(s) == 100 for s in streams.values())  # 100 > 21 samples: no end of epoch
    assert len({tuple(s) for s in streams.values()}) == 4, "every reader draws its own sequence"
    _fake_rank(monkeypatch, 1, 2, 0, 2)
    again = _stream(shards, resampled=True, seed=4)
    assert _take(again, 100) == streams[(1, 0)], "same (seed, epoch, reader): same stream"
    assert _take(again, 100, epoch=1) != streams[(1, 0)], "the epoch reseeds the draws"
    assert _take(_stream(shards, resampled=True, seed=5), 100) != streams[(1, 0)]
    # With a shuffle buffer the stream stays endless and covers every shard eventually.
    assert len(set(_take(_stream(shards, resampled=True, seed=4, shuffle_buffer=8), 300))) == 21


def test_resampled_stream_of_unreadable_shards_raises(tmp_path, monkeypatch):
    for var in ("PADDLE_TRAINER_ID", "PADDLE_TRAINERS_NUM"):
        monkeypatch.delenv(var, raising=False)
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(3):
        (bad / f"b-{i}.tar").write_bytes(b"this is not a tar file" * 10)
    with pytest.raises(ValueError, match=r"none of the 3 shard\(s\) yields a readable sample"):
        _take(_stream(bad, resampled=True), 1)


class _FakeIterator:
    """Stands in for paddle's loader iterator: records the shutdown calls."""

    def __init__(self, calls: list[str], n: int = 100):
        self.calls, self.left = calls, n
        self._shutdown = False
        self._reader = SimpleNamespace(shutdown=lambda: calls.append("reader.shutdown"))
        self._thread = SimpleNamespace(is_alive=lambda: True, join=lambda t: calls.append(f"join {t}"))

    def __iter__(self):
        return self

    def __next__(self):
        if not self.left:
            raise StopIteration
        self.left -= 1
        return self.left

    def _try_shutdown_all(self):
        self.calls.append("try_shutdown_all")
        self._shutdown = True


def test_iterate_loader_shuts_down_when_left_early():
    calls: list[str] = []
    it = _FakeIterator(calls)
    loader = type("Loader", (), {"__iter__": lambda self: it})()
    for n, _ in enumerate(iterate_loader(loader), start=1):
        if n == 3:
            break  # the generator is closed right here (CPython refcounting), as in the trainer
    assert calls == ["reader.shutdown", "try_shutdown_all", "join 1.0"]
    # Loaders without paddle's private attributes are simply iterated.
    assert list(iterate_loader([1, 2, 3])) == [1, 2, 3]


@pytest.mark.timeout(TIMEOUT_S)
def test_iterate_loader_with_workers_over_an_endless_stream(tmp_path, monkeypatch):
    for var in ("PADDLE_TRAINER_ID", "PADDLE_TRAINERS_NUM"):
        monkeypatch.delenv(var, raising=False)
    shards = _write_shards(tmp_path, n=21, per_shard=7)
    data = build_train_data([StreamSource.of("a", shards, resampled=True)],
                            lambda s, e: {"i": np.asarray(int(s.key[1:]))}, batch_size=4, num_workers=2,
                            shuffle_buffer=0, seed=0, world_size=1)
    for _ in range(2):  # a second loader after the first was left early still works
        batches = data.batches(0)
        got = [next(batches) for _ in range(5)]
        batches.close()
        assert len(got) == 5 and all(np.asarray(b["i"]).shape == (4,) for b in got)
        assert not [p for p in multiprocessing.active_children() if p.is_alive()]


_PDEATHSIG_PROBE = """
import ctypes, ctypes.util, os, sys
from ernievil2.data.loader_workers import ExitWithParent
init = ExitWithParent()  # made in "the rank"; this probe plays the worker, its parent the rank
init.parent = os.getppid() if sys.argv[1] == "normal" else -1  # -1: the rank died before init ran
init(0)
sig = ctypes.c_int(0)
ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").prctl(2, ctypes.byref(sig), 0, 0, 0)  # PR_GET_PDEATHSIG
print("pdeathsig", sig.value)
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux only")
def test_exit_with_parent_sets_the_parent_death_signal(tmp_path):
    """The loader workers' init function (run.py) asks the kernel for SIGKILL when the rank dies,
    and exits at once when the rank is already gone (tests/test_multinode.py kills a rank)."""
    ok = _run([sys.executable, "-c", _PDEATHSIG_PROBE, "normal"], tmp_path)
    assert ok.returncode == 0 and "pdeathsig 9" in ok.stdout, ok.stdout + ok.stderr
    orphan = _run([sys.executable, "-c", _PDEATHSIG_PROBE, "orphan"], tmp_path)
    assert orphan.returncode == 1 and "pdeathsig" not in orphan.stdout


# ------------------------------------------------------------------------------------------------
# launch/train.py: data.resampled
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_train_fails_fast_or_resamples(tmp_path):
    """2 demo shards and 4 loader workers: a clear error before training, or with
    ``data.resampled=true`` a run of max_steps."""
    common = [
        "trainer.device=cpu", "eval=none", "trainer.save_checkpoint=false", "logger.log_every=1",
        "data.demo.n_train=64", "data.demo.n_val=16", "data.demo.samples_per_shard=32",
        f"data.demo.cache_dir={tmp_path / 'cache'}", "data.batch_size=8", "data.num_workers=4",
        "data.shuffle_buffer=16", "model.vision.layers=1", "model.text.layers=1",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    script = str(REPO_ROOT / "launch" / "train.py")
    failed = _run([sys.executable, script, "trainer.max_steps=3", *common], tmp_path)
    assert failed.returncode != 0
    text = failed.stdout + failed.stderr
    assert "2 shard(s) cannot feed 1 rank(s) x 4 loader worker(s) = 4 readers" in text, text[-4000:]
    assert "data.resampled=true" in text
    # 12 steps of 8 samples = 96 > 64 samples in the 2 shards: only an endless stream gets there.
    ok = _run([sys.executable, script, "trainer.max_steps=12", "data.resampled=true", *common], tmp_path)
    assert ok.returncode == 0, (ok.stdout + ok.stderr)[-4000:]
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"]["resampled"] is True
    assert np.all(np.isfinite([json.loads(line)["loss"] for line in
                               (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]))
