"""Data-parallel training checked with real processes (``paddle.distributed.launch``, gloo on CPU).

- 2 ranks × B against 1 process × 2B on the same data and init: loss terms and every parameter
  gradient agree (float64, relative error ≤ 1e-5) for the local and the global loss, with and
  without untagged samples on a rank; a gather without gradient (paddle's plain all_gather) is caught.
- ``launch/train.py`` under the launcher: one shared run dir, one writer, identical parameters.
- World size 1 calls no collective.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import dist_worker
import numpy as np
import paddle
import pytest
import yaml

from ernievil2.distributed import (
    DistInfo,
    DistributedExchange,
    barrier,
    broadcast_object,
    check_parameters_in_sync,
    init_distributed,
    main_process_first,
    parameter_digest,
)
from ernievil2.losses import LossConfig, MultiViewLoss
from ernievil2.train.config import RUN_TIME_ENV, run_time
from ernievil2.weights.load import load_model

REPO_ROOT = Path(__file__).resolve().parents[1]
RTOL = 1e-5
LAUNCH_TIMEOUT_S = 240


def _clean_env() -> dict[str, str]:
    """The test's environment without launcher variables (the launcher sets its own)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PADDLE_") and k != RUN_TIME_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _launch(script: Path, args: list[str], log_dir: Path, cwd: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", str(nproc),
           "--log_dir", str(log_dir), str(script), *args]
    proc = subprocess.run(cmd, cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    if proc.returncode != 0:
        logs = "".join(f"\n==== {p.name}\n{p.read_text(errors='replace')[-4000:]}" for p in sorted(log_dir.glob("workerlog.*")))
        pytest.fail(f"launcher exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}{logs}")
    return proc


# ------------------------------------------------------------------------------------------------
# 2 ranks × B == 1 process × 2B
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory) -> Path:
    """Runs tests/dist_worker.py on 2 ranks once; its .npz files land in the returned folder."""
    base = tmp_path_factory.mktemp("dist_worker")
    _launch(REPO_ROOT / "tests" / "dist_worker.py", [str(base / "out")], base / "log", cwd=base)
    return base / "out"


@pytest.fixture(scope="module")
def one_process_reference() -> dict[str, tuple[dict[str, float], dict[str, np.ndarray]]]:
    """The same cases in this process over the whole batch (world size 1, float64)."""
    previous = paddle.get_default_dtype()
    paddle.set_default_dtype("float64")
    try:
        return dist_worker.run_cases(DistInfo())
    finally:
        paddle.set_default_dtype(previous)


def _load(out: Path, rank: int, case: str) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    with np.load(out / f"rank{rank}_{case}.npz") as z:
        terms = {k[5:]: float(z[k]) for k in z.files if k.startswith("term/")}
        grads = {k[5:]: z[k] for k in z.files if k.startswith("grad/")}
    return terms, grads


def _grad_errors(got: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> dict[str, float]:
    """Per-parameter relative error ``|got - ref|_2 / |ref|_2``; a parameter whose true gradient is
    zero up to rounding (e.g. the attention key bias: softmax ignores a per-row constant) is
    measured against the largest gradient norm instead."""
    scale = max(float(np.linalg.norm(g)) for g in ref.values())
    return {
        name: float(np.linalg.norm(got[name] - g)) / max(float(np.linalg.norm(g)), 1e-9 * scale)
        for name, g in ref.items()
    }


# An accumulation case is checked against one process over the whole batch in one piece.
REFERENCE = {"accum_local_b": "local_b", "accum_global_a": "global_a", "aux_local_b": "aux_accum_local_b",
             "dup_masked_accum_local_b": "dup_masked_local_b"}


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", ["local_a", "local_b", "global_a", "global_b", "image_only_a",
                                  "accum_local_b", "accum_global_a", "aux_local_b", "dup_masked_local_a",
                                  "dup_positive_local_a", "dup_positive_global_a", "dup_masked_accum_local_b",
                                  "sigmoid_positive_local_a", "sigmoid_masked_global_b", "agreement_local_a",
                                  "agreement_global_b"])
def test_two_ranks_match_one_process(case, two_rank_results, one_process_reference):
    ref_terms, ref_grads = one_process_reference[REFERENCE.get(case, case)]
    terms0, grads0 = _load(two_rank_results, 0, case)
    terms1, grads1 = _load(two_rank_results, 1, case)
    # Every active loss term is reported (with the weighted sum) and equals one process's.
    assert set(ref_terms) == {"loss", *dist_worker.CASES[case][3]}
    assert set(terms0) == set(ref_terms)
    for name, want in ref_terms.items():
        assert terms0[name] == pytest.approx(want, rel=RTOL), name
        assert terms1[name] == terms0[name], name
    # Every parameter the loss reaches has a gradient, equal to one process's and the same on both
    # ranks; DataParallel may give the unreached ones (image_only: text tower, temperature) zeros.
    assert set(ref_grads) <= set(grads0) and set(grads0) == set(grads1)
    if case != "image_only_a":
        assert len(ref_grads) == len(list(dist_worker.make_model().parameters()))
    for name in set(grads0) - set(ref_grads):
        assert not np.any(grads0[name]), name
    errors = _grad_errors(grads0, ref_grads)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= RTOL, f"{case}: gradient of {worst} off by {errors[worst]:.2e} (relative)"
    for name in grads0:
        np.testing.assert_array_equal(grads0[name], grads1[name], err_msg=name)


@pytest.mark.parametrize("case", sorted(set(REFERENCE) - {"aux_local_b"}))
def test_accumulation_matches_one_batch_in_one_process(case, one_process_reference):
    """k=2 micro-batches of B in one process == one batch of 2B: every loss term and gradient."""
    terms, grads = one_process_reference[case]
    ref_terms, ref_grads = one_process_reference[REFERENCE[case]]
    assert set(terms) == set(ref_terms) and set(grads) == set(ref_grads)
    for name, want in ref_terms.items():
        assert terms[name] == pytest.approx(want, rel=RTOL), name
    errors = _grad_errors(grads, ref_grads)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= RTOL, f"{case}: gradient of {worst} off by {errors[worst]:.2e} (relative)"


def test_accumulation_replays_dropout():
    """With dropout on, a micro-batch recomputed with gradient sees the dropout masks of its cached
    pass (RNG replay): the loss the step reports equals the loss of the cached features alone."""
    from ernievil2.train.step import encode_views

    previous = paddle.get_default_dtype()
    paddle.set_default_dtype("float64")
    try:
        trainer = dist_worker.make_trainer(DistInfo())
        for layer in trainer.model.text.sublayers():
            if isinstance(layer, paddle.nn.Dropout):
                layer.p = 0.3
        micro = dist_worker.micro_batches(dist_worker.make_batch("a"), 2)
        views = trainer.loss.required_views
        paddle.seed(11)
        with paddle.no_grad():  # the trainer's caching pass, replayed here
            parts = [encode_views(trainer.model, b, views, with_logit_scale=False)[0] for b in micro]
        feats = {k: paddle.concat([p[k] for p in parts]) for k in parts[0]}
        mask = paddle.concat([paddle.to_tensor(b["has_objects"]) for b in micro])
        cached_loss = float(trainer.loss(feats, trainer.model.logit_scale.detach(), mask)["loss"])
        paddle.seed(11)
        reported = trainer.train_step(micro)["loss"]
        paddle.seed(12)  # control: other dropout masks give another loss
        with paddle.no_grad():
            other = [encode_views(trainer.model, b, views, with_logit_scale=False)[0] for b in micro]
        other_feats = {k: paddle.concat([p[k] for p in other]) for k in other[0]}
        other_loss = float(trainer.loss(other_feats, trainer.model.logit_scale.detach(), mask)["loss"])
    finally:
        paddle.set_default_dtype(previous)
    assert reported == pytest.approx(cached_loss, rel=1e-12)
    assert other_loss != pytest.approx(cached_loss, rel=1e-6)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_gather_without_gradient_is_caught(two_rank_results, one_process_reference):
    """The silent bug of a plain gather (``all_gather`` without gradient) must fail the comparison above."""
    _, ref_grads = one_process_reference["local_a"]
    _, grads = _load(two_rank_results, 0, "nograd_gather_a")
    assert max(_grad_errors(grads, ref_grads).values()) > 1e-2


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_data_parallel_averages_gradients(two_rank_results):
    """Paddle 3.3.1's DataParallel averages parameter gradients over ranks (inputs 1 and 2 → 1.5),
    the fact the trainer's gradient scaling relies on."""
    for rank in (0, 1):
        np.testing.assert_allclose(np.load(two_rank_results / f"rank{rank}_dp_grad.npy"), [1.5, 0.0])


# ------------------------------------------------------------------------------------------------
# launch/train.py under the launcher
# ------------------------------------------------------------------------------------------------


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_launch_train_two_ranks(tmp_path):
    # No hydra.run.dir: the default timestamped dir must be one folder for both ranks.
    overrides = [
        "trainer.max_steps=20", "trainer.device=cpu", "logger.log_every=5", "eval.every_n_steps=0",
        "data.demo.n_train=400", "data.demo.n_val=40", "data.demo.samples_per_shard=50",
        f"data.demo.cache_dir={tmp_path / 'cache'}", "data.batch_size=8", "data.num_workers=1",
        "model.vision.layers=1", "model.text.layers=1",
    ]
    log_dir = tmp_path / "log"
    _launch(REPO_ROOT / "launch" / "train.py", overrides, log_dir, cwd=tmp_path)

    run_dirs = list((tmp_path / "outputs" / "demo").iterdir())
    assert len(run_dirs) == 1, run_dirs
    run_dir = run_dirs[0]
    # One writer: exactly one of each file in the whole tree, all in the shared run dir.
    for name in ("metrics.jsonl", "train_log.jsonl", "config.json", "vocab.txt"):
        found = [p for p in tmp_path.rglob(name) if "cache" not in p.parts and "checkpoints" not in p.parts]
        assert found == [run_dir / name], (name, found)
    assert [r["step"] for r in _jsonl(run_dir / "train_log.jsonl")] == [5, 10, 15, 20]
    records = _jsonl(run_dir / "metrics.jsonl")
    # eval=demo: the retrieval set, then the two zero-shot classification sets
    assert [(r["step"], r["dataset"]) for r in records] == [(20, "demo_val"), (20, "demo_objects_en"),
                                                            (20, "demo_objects_zh")]
    ckpts = sorted((run_dir / "checkpoints").iterdir())
    assert [p.name for p in ckpts] == ["latest", "step_0000020"]
    # A log file per rank (Hydra job name); the .hydra config copy (rank 0 writes it, the others skip it).
    assert sorted(p.name for p in run_dir.glob("*.log")) == ["train_rank0.log", "train_rank1.log"]
    assert (run_dir / ".hydra" / "config.yaml").exists()

    # Both ranks end with the same parameters (the trainer compares digests and would have failed
    # the job otherwise), and those are the parameters of rank 0's checkpoint.
    digests = []
    for rank in (0, 1):
        text = (log_dir / f"workerlog.{rank}").read_text(errors="replace")
        found = re.findall(rf"rank {rank}: parameters identical on all 2 ranks \(digest ([0-9a-f]+)\)", text)
        assert len(found) == 1, text[-3000:]
        digests.append(found[0])
        # Every rank's console log shows its training lines.
        assert "step 20 | loss" in text
    assert digests[0] == digests[1] == parameter_digest(load_model(run_dir / "checkpoints" / "step_0000020").model)


# ------------------------------------------------------------------------------------------------
# One process: no collective, and the loss variants coincide
# ------------------------------------------------------------------------------------------------


def _batch_feats(seed: int = 0, n: int = 6, d: int = 8):
    rng = np.random.default_rng(seed)
    feats = {}
    for view in ("image", "caption", "objects", "image_view1", "image_view2", "text_view"):
        x = rng.standard_normal((n, d))
        t = paddle.to_tensor(x / np.linalg.norm(x, axis=1, keepdims=True), dtype="float64")
        t.stop_gradient = False
        feats[view] = t
    mask = paddle.to_tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0], dtype="float64")
    return feats, mask


def test_world_size_one_calls_no_collective(monkeypatch):
    for var in ("PADDLE_TRAINERS_NUM", "PADDLE_TRAINER_ID", "PADDLE_LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)

    def forbidden(*args, **kwargs):
        raise AssertionError("a collective was called at world size 1")

    for name in ("init_parallel_env", "all_gather", "all_reduce", "barrier", "broadcast",
                 "broadcast_object_list", "all_gather_object"):
        monkeypatch.setattr(paddle.distributed, name, forbidden)

    info = init_distributed()
    assert info == DistInfo(0, 1, 0) and info.is_main and not info.distributed
    exchange = DistributedExchange(info)
    feats, mask = _batch_feats()
    scale = paddle.to_tensor(5.0, dtype="float64")
    for local in (True, False):
        out = MultiViewLoss(LossConfig(local_loss=local), exchange)(feats, scale, mask)
        out["loss"].backward()
    barrier()
    with main_process_first():
        pass
    assert broadcast_object({"a": 1}) == {"a": 1}
    layer = paddle.nn.Linear(2, 2)
    assert check_parameters_in_sync(layer) == parameter_digest(layer)


def test_local_and_global_loss_coincide_in_one_process():
    values, grads = [], []
    for local in (True, False):
        feats, mask = _batch_feats(seed=3)
        out = MultiViewLoss(LossConfig(local_loss=local))(feats, paddle.to_tensor(7.0, dtype="float64"), mask)
        out["loss"].backward()
        values.append({k: float(v) for k, v in out.items()})
        grads.append({k: v.grad.numpy() for k, v in feats.items()})
    assert values[0] == pytest.approx(values[1], rel=1e-12)
    for view in grads[0]:
        np.testing.assert_allclose(grads[0][view], grads[1][view], rtol=1e-10, atol=1e-14)


def test_run_time_resolver_uses_shared_stamp(monkeypatch):
    monkeypatch.setenv(RUN_TIME_ENV, "2024-05-06T07:08:09")
    assert run_time("%Y-%m-%d_%H-%M-%S") == "2024-05-06_07-08-09"
    monkeypatch.delenv(RUN_TIME_ENV)
    assert re.fullmatch(r"\d{4}-\d\d-\d\d", run_time("%Y-%m-%d"))


@pytest.mark.slow
def test_prepare_ranks_leaves_one_process_alone():
    """One process: launch/train.py adds no Hydra override (job name, output subdir) of its own."""
    env = {k: v for k, v in os.environ.items() if k != "PADDLE_TRAINERS_NUM"}
    proc = subprocess.run([sys.executable, "launch/train.py", "--cfg", "hydra", "trainer.max_steps=1"], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    hydra_cfg = yaml.safe_load(proc.stdout)["hydra"]
    assert hydra_cfg["overrides"] == {"hydra": [], "task": ["trainer.max_steps=1"]}
    assert hydra_cfg["job"]["name"] == "train" and hydra_cfg["output_subdir"] == ".hydra"


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_sharded_optimizer_state_trains_like_data_parallel(tmp_path):
    """trainer.sharding_stage=1 (fleet's sharded optimizer) on 2 ranks: each rank holds the Adam
    moments of part of the parameters only, and after 3 steps the parameters equal plain data
    parallel's (float64) and are identical on both ranks. So do data parallel's with
    trainer.recompute (its gradients averaged after backward, not by data parallel's hooks)."""
    results = {}
    for setting, args in (("dp", ["0"]), ("sharded", ["1"]), ("recompute", ["0", "recompute"])):
        base = tmp_path / setting
        _launch(REPO_ROOT / "tests" / "dist_sharding_worker.py", [str(base / "out"), *args], base / "log", cwd=tmp_path)
        results[setting] = [dict(np.load(base / "out" / f"rank{r}.npz")) for r in (0, 1)]
    n_params = len(list(dist_worker.make_model().parameters()))
    dp, sharded, recompute = results["dp"], results["sharded"], results["recompute"]
    assert [int(r["moments"]) for r in dp] == [n_params, n_params]
    held = [int(r["moments"]) for r in sharded]
    assert sum(held) == n_params and all(0 < h < n_params for h in held), held
    names = [k for k in dp[0] if k.startswith("param/")]
    assert len(names) == n_params
    for name in names:
        for run in (sharded, recompute):
            np.testing.assert_array_equal(run[0][name], run[1][name], err_msg=name)
            np.testing.assert_allclose(run[0][name], dp[0][name], rtol=1e-6, atol=1e-9, err_msg=name)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_two_ranks_resume_from_a_checkpoint(tmp_path):
    """2 ranks × 2 loader workers: a run resumed from its step-4 checkpoint (new run dir,
    ``resume=PATH``) logs the same loss at every later step and ends with the same parameters as
    the uninterrupted run: weights, AdamW state, schedule and each rank's data position restore."""
    common = [
        "trainer.max_steps=10", "trainer.checkpoint_every=4", "trainer.keep_last=5", "trainer.device=cpu",
        "logger.log_every=1", "eval=none", "data.demo.n_train=400", "data.demo.n_val=40",
        "data.demo.samples_per_shard=50", f"data.demo.cache_dir={tmp_path / 'cache'}", "data.batch_size=8",
        "data.num_workers=2", "model.vision.layers=1", "model.text.layers=1",
        "loss.image_image=1", "loss.text_text=1", "loss.aux_fraction=0.25",  # all four terms
    ]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    _launch(REPO_ROOT / "launch" / "train.py", [*common, f"hydra.run.dir={full}"], tmp_path / "log_full", cwd=tmp_path)
    start = full / "checkpoints" / "step_0000004"
    _launch(REPO_ROOT / "launch" / "train.py", [*common, f"hydra.run.dir={resumed}", f"resume={start}"],
            tmp_path / "log_resumed", cwd=tmp_path)
    want = {r["step"]: r for r in _jsonl(full / "train_log.jsonl")}
    got = {r["step"]: r for r in _jsonl(resumed / "train_log.jsonl")}
    assert sorted(got) == list(range(5, 11))
    for step, r in got.items():
        for key in ("loss", "image_caption", "image_objects", "image_image", "text_text", "lr", "samples_seen"):
            assert r[key] == pytest.approx(want[step][key], rel=1e-6), (key, step)
    a = load_model(full / "checkpoints" / "step_0000010").model
    b = load_model(resumed / "checkpoints" / "step_0000010").model
    assert parameter_digest(a) == parameter_digest(b)
