"""Checkpoints that survive a kill, resume, eval-only mode and the non-finite-loss guard, end to end.

The kill test runs ``launch/train.py`` in subprocesses: an uninterrupted run, and the same run
killed with SIGKILL at a random step after its second checkpoint and restarted with
``resume=latest`` in the same run dir. Loss values per step and the final parameters must agree.
"""
from __future__ import annotations

import json
import random
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from train_runs import compose_config, read_jsonl, train_cmd, train_env

from ernievil2.train.config import register_schemas
from ernievil2.train.run import run_evaluation, run_training
from ernievil2.train.trainer import NonFiniteLossError
from ernievil2.weights.layouts import WEIGHTS

SMALL = [
    "data.demo.n_train=600", "data.demo.n_val=60", "data.demo.samples_per_shard=200", "data.batch_size=16",
    "data.shuffle_buffer=200", "trainer.device=cpu", "logger.backend=none", "optim.warmup_steps=3",
    # all four terms (the default recipe runs two), their auxiliary views on a quarter of the rows
    "loss.image_image=1", "loss.text_text=1", "loss.aux_fraction=0.25",
]

register_schemas()


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("demo_cache_resume")


def _compose(*overrides: str):
    return compose_config(SMALL, *overrides)


def _jsonl(path: Path) -> list[dict]:
    return read_jsonl(path)


def _train_cmd(run_dir: Path, cache: Path, *extra: str) -> list[str]:
    return train_cmd(SMALL, run_dir, cache, *extra)


def _env() -> dict[str, str]:
    return train_env()


def _final_weights(run_dir: Path) -> dict[str, np.ndarray]:
    latest = (run_dir / "checkpoints" / "latest").read_text(encoding="utf-8").strip()
    return load_file(str(run_dir / "checkpoints" / Path(latest).name / WEIGHTS))


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("workers", [0, 2])
def test_killed_run_resumes_exactly(tmp_path, demo_cache, workers):
    steps, every = 20, 4
    args = (f"trainer.max_steps={steps}", f"trainer.checkpoint_every={every}", "logger.log_every=1", "eval=none",
            f"data.num_workers={workers}", "trainer.keep_last=2")
    full = tmp_path / "full"
    subprocess.run(_train_cmd(full, demo_cache, *args), env=_env(), check=True, capture_output=True, timeout=300)

    # The same run, killed at a random step after its second checkpoint.
    killed = tmp_path / "killed"
    kill_after = 2 * every + random.Random().randint(1, every - 1)
    proc = subprocess.Popen(_train_cmd(killed, demo_cache, *args), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    log_file = killed / "train_log.jsonl"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if log_file.is_file() and any(r["step"] >= kill_after for r in _jsonl(log_file)):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    logged_before = max(r["step"] for r in _jsonl(log_file))
    assert 2 * every < logged_before < steps
    # `latest` names a complete checkpoint (a kill never leaves it pointing at a partial one).
    ckpts = killed / "checkpoints"
    latest = ckpts / Path((ckpts / "latest").read_text(encoding="utf-8").strip()).name
    assert (latest / WEIGHTS).is_file() and (latest / "trainer_state.json").is_file()
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp")]
    saved_step = json.loads((latest / "trainer_state.json").read_text(encoding="utf-8"))["step"]
    assert saved_step >= 2 * every and saved_step % every == 0

    subprocess.run(_train_cmd(killed, demo_cache, *args, "resume=latest"), env=_env(), check=True,
                   capture_output=True, timeout=300)

    want = {r["step"]: r for r in _jsonl(full / "train_log.jsonl")}
    got: dict[int, dict] = {}
    for r in _jsonl(log_file):  # steps between the checkpoint and the kill are logged twice: all must agree
        np.testing.assert_allclose(r["loss"], want[r["step"]]["loss"], rtol=1e-6, err_msg=f"step {r['step']}")
        got[r["step"]] = r
    assert sorted(got) == list(range(1, steps + 1))
    for step, r in got.items():
        for term in ("image_caption", "image_objects", "image_image", "text_text", "lr"):
            np.testing.assert_allclose(r[term], want[step][term], rtol=1e-6, err_msg=f"{term} at step {step}")
    a, b = _final_weights(full), _final_weights(killed)
    assert set(a) == set(b)
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=0, atol=1e-6, err_msg=name)
    # keep_last=2: the two newest step checkpoints remain.
    kept = sorted(p.name for p in ckpts.glob("step_*"))
    assert kept == [f"step_{steps - every:07d}", f"step_{steps:07d}"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_eval_only_mode_reproduces_in_loop_numbers(tmp_path, demo_cache):
    run_dir = tmp_path / "run"
    start = time.perf_counter()
    final = run_training(_compose(f"data.demo.cache_dir={demo_cache}", "trainer.max_steps=8", "data.num_workers=0"),
                         run_dir)
    wall = time.perf_counter() - start
    assert final, "the demo config evaluates at the end"
    eval_dir = tmp_path / "eval"
    records = run_evaluation(_compose(f"data.demo.cache_dir={demo_cache}", "mode=eval", f"ckpt={run_dir}"), eval_dir)
    # in-loop records also say when they were taken: one evaluation, one training-seconds value, in
    # seconds (within the run's wall time); the metrics are the same
    seconds = {r.pop("train_seconds") for r in final}
    assert len(seconds) == 1 and 0 < seconds.pop() <= wall, (seconds, wall)
    assert records == final
    saved = json.loads((eval_dir / "eval_results.json").read_text(encoding="utf-8"))
    assert saved["step"] == 8 and saved["records"] == final
    assert not (eval_dir / "checkpoints").exists()


def test_eval_only_mode_needs_a_checkpoint(tmp_path, demo_cache):
    with pytest.raises(ValueError, match="ckpt=PATH"):
        run_evaluation(_compose(f"data.demo.cache_dir={demo_cache}", "mode=eval"), tmp_path)


@pytest.mark.timeout(300)
def test_non_finite_losses_skip_updates_then_stop(tmp_path, demo_cache, monkeypatch):
    """Every loss from step 3 on is NaN: the updates are skipped (parameters unchanged), counted,
    and after trainer.nan_patience in a row the run stops naming the last good checkpoint."""
    from ernievil2.train import trainer as trainer_module

    real_step = trainer_module.Trainer.train_step
    calls = {"n": 0}

    def poisoned(self, batches, *args):
        terms = real_step(self, batches, *args)
        calls["n"] += 1
        if calls["n"] >= 3:
            terms["loss"] = float("nan")
        return terms

    monkeypatch.setattr(trainer_module.Trainer, "train_step", poisoned)
    cfg = _compose(f"data.demo.cache_dir={demo_cache}", "trainer.max_steps=20", "trainer.checkpoint_every=2",
                   "trainer.nan_patience=3", "logger.log_every=1", "eval=none", "data.num_workers=0")
    with pytest.raises(NonFiniteLossError, match=r"3 non-finite losses in a row at step 5.*step_0000004"):
        run_training(cfg, tmp_path)
    log = _jsonl(tmp_path / "train_log.jsonl")
    assert [r["nonfinite_steps"] for r in log] == [0, 0, 1, 2]
    # The update of a non-finite step is skipped: the checkpoint of step 4 equals that of step 2
    # (no update after step 2 reached the weights).
    a = load_file(str(tmp_path / "checkpoints" / "step_0000002" / WEIGHTS))
    b = load_file(str(tmp_path / "checkpoints" / "step_0000004" / WEIGHTS))
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_out_of_memory_names_the_knobs(tmp_path, demo_cache, monkeypatch):
    """A device out-of-memory error stops the run with the settings that lower memory."""
    from ernievil2.train import trainer as trainer_module

    def oom(self, batches, *args):
        raise MemoryError("ResourceExhaustedError: Out of memory error on GPU 0. Cannot allocate 2.0GB")

    monkeypatch.setattr(trainer_module.Trainer, "train_step", oom)
    cfg = _compose(f"data.demo.cache_dir={demo_cache}", "trainer.max_steps=2", "eval=none", "data.num_workers=0")
    with pytest.raises(RuntimeError, match="step 1: out of device memory") as info:
        run_training(cfg, tmp_path)
    for knob in ("data.batch_size", "trainer.accum_steps", "trainer.recompute", "trainer.sharding_stage", "trainer.amp"):
        assert knob in str(info.value)
    assert isinstance(info.value.__cause__, MemoryError)
