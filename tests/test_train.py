"""End to end through ``run_training`` on a small demo: loss falls, metrics, logs and checkpoints."""
from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import ernievil2.train.run as run_module
from ernievil2.evaluators.retrieval import RetrievalEvaluator, load_retrieval_set
from ernievil2.losses import TERMS
from ernievil2.models.config import DualEncoderConfig
from ernievil2.tokenizer import WordPieceTokenizer
from ernievil2.train.config import register_schemas
from ernievil2.train.optim import cosine_with_warmup
from ernievil2.train.run import run_training
from ernievil2.weights.layouts import MODEL_CONFIG, WEIGHTS
from ernievil2.weights.load import load_model

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"
RECALL_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")
RECORD_KEYS = {"step", "dataset", "protocol", *RECALL_KEYS, "mean_recall", "train_seconds"}
OPTIONAL_RECORD_KEYS = {"i2t_mean", "t2i_mean"}

register_schemas()


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("demo_cache")


def _compose(cache: Path, *overrides: str):
    small = [
        "data.demo.n_train=600", "data.demo.n_val=60", "data.demo.samples_per_shard=200",
        f"data.demo.cache_dir={cache}", "data.batch_size=16", "data.num_workers=0", "data.shuffle_buffer=200",
        "trainer.device=cpu", "logger.backend=none",
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=small + list(overrides))


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def multiview_run(demo_cache, tmp_path_factory):
    cfg = _compose(
        demo_cache, "trainer.max_steps=30", "logger.log_every=5", "eval.every_n_steps=15",
        "optim.lr=2e-3", "optim.warmup_steps=5",
        # all four terms (the default recipe runs two), their auxiliary views on a quarter of the rows
        "loss.image_image=1", "loss.text_text=1", "loss.aux_fraction=0.25",
    )
    run_dir = tmp_path_factory.mktemp("run_multiview")
    start = time.perf_counter()
    final = run_training(cfg, run_dir)
    return {"cfg": cfg, "run_dir": run_dir, "final": final, "seconds": time.perf_counter() - start}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_loss_falls(multiview_run):
    log = _jsonl(multiview_run["run_dir"] / "train_log.jsonl")
    assert [r["step"] for r in log] == [5, 10, 15, 20, 25, 30]
    losses = [r["loss"] for r in log]
    assert all(math.isfinite(v) for v in losses)
    first, last = np.mean(losses[:2]), np.mean(losses[-2:])
    assert first > last, f"loss did not fall: {losses}"
    for r in log:
        # The multi-view loss logs all four terms and their weighted sum (weights 1).
        assert set(TERMS) <= set(r)
        assert r["loss"] == pytest.approx(sum(r[t] for t in TERMS), rel=1e-5)
        assert 0 < r["logit_scale"] <= 100.0 + 1e-3
        assert r["grad_norm"] > 0 and r["lr"] > 0
    # The logged lr is the one the step used: 2e-3 · cosine_with_warmup(step - 1, 5, 30, 0).
    for r in log:
        assert r["lr"] == pytest.approx(2e-3 * cosine_with_warmup(r["step"] - 1, 5, 30, 0.0), rel=1e-9)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_metrics_records(multiview_run):
    records = _jsonl(multiview_run["run_dir"] / "metrics.jsonl")
    zeroshot = [r for r in records if r["protocol"] == "zeroshot"]  # eval=demo also classifies (test_zeroshot.py)
    assert [(r["step"], r["dataset"]) for r in zeroshot] == [(s, d) for s in (15, 30)
                                                             for d in ("demo_objects_en", "demo_objects_zh")]
    records = [r for r in records if r["protocol"] != "zeroshot"]
    assert [r["step"] for r in records] == [15, 30]
    for r in records:
        assert RECORD_KEYS <= set(r) <= RECORD_KEYS | OPTIONAL_RECORD_KEYS, sorted(r)
        assert r["dataset"] == "demo_val" and r["protocol"] == "multi"
        for k in RECALL_KEYS + ("mean_recall",):
            assert 0.0 <= r[k] <= 100.0, (k, r[k])
        assert r["mean_recall"] == pytest.approx(np.mean([r[k] for k in RECALL_KEYS]), abs=1e-9)
        for d in ("i2t", "t2i"):
            assert r[f"{d}_r1"] <= r[f"{d}_r5"] <= r[f"{d}_r10"]
    # run_training returns the final evaluation, the same as the last line of metrics.jsonl.
    assert [r for r in multiview_run["final"] if r["protocol"] != "zeroshot"] == [records[-1]]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_checkpoint_written_and_loadable(multiview_run):
    run_dir = multiview_run["run_dir"]
    entries = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert entries == ["latest", "step_0000030"]
    assert (run_dir / "checkpoints" / "latest").read_text(encoding="utf-8").strip() == "step_0000030"
    ckpt = run_dir / "checkpoints" / "step_0000030"
    names = {p.name for p in ckpt.iterdir()}
    assert {WEIGHTS, MODEL_CONFIG, "vocab.txt", "optimizer.safetensors", "trainer_state.json"} <= names
    assert (ckpt / "vocab.txt").read_bytes() == (run_dir / "vocab.txt").read_bytes()
    model = load_model(ckpt).model
    assert isinstance(model.cfg, DualEncoderConfig)
    tokenizer = WordPieceTokenizer(ckpt / "vocab.txt", max_length=32)
    assert model.cfg.text.vocab_size == tokenizer.vocab_size
    assert model.cfg.vision.width == 64
    # The checkpoint is the final model: re-evaluating it reproduces the final metrics.
    cfg = OmegaConf.to_object(multiview_run["cfg"])
    data = load_retrieval_set(cfg.eval.datasets[0].path, model.cfg.vision.image_size, tokenizer, cfg.model.text_max_length)
    record = RetrievalEvaluator("demo_val", data, "multi")(model, 30)[0]
    final = multiview_run["final"][0]
    for k in RECALL_KEYS:
        assert record[k] == pytest.approx(final[k], abs=1e-9), k


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_clip_only_run(demo_cache, tmp_path):
    cfg = _compose(demo_cache, "loss=clip_only", "trainer.max_steps=10", "logger.log_every=5", "eval=none")
    final = run_training(cfg, tmp_path)
    assert final == []
    log = _jsonl(tmp_path / "train_log.jsonl")
    assert [r["step"] for r in log] == [5, 10]
    for r in log:
        assert "loss" in r and "image_caption" in r
        assert not set(TERMS) - {"image_caption"} & set(r), sorted(r)
        assert r["loss"] == pytest.approx(r["image_caption"], rel=1e-6)
    assert not (tmp_path / "metrics.jsonl").exists() or not _jsonl(tmp_path / "metrics.jsonl")
    assert (tmp_path / "checkpoints" / "step_0000010" / WEIGHTS).exists()


# ---------------------------------------------------------------- released size on CPU


def expected_param_count(cfg: DualEncoderConfig) -> int:
    v, t = cfg.vision, cfg.text
    lin = lambda i, o: i * o + o  # noqa: E731
    ln = lambda w: 2 * w  # noqa: E731
    vision_block = ln(v.width) + lin(v.width, 3 * v.width) + lin(v.width, v.width) + ln(v.width) \
        + lin(v.width, v.mlp_dim) + lin(v.mlp_dim, v.width)
    vision = 3 * v.patch_size**2 * v.width + v.width + (v.num_patches + 1) * v.width + ln(v.width) \
        + v.layers * vision_block + ln(v.width)
    text_block = 4 * lin(t.width, t.width) + ln(t.width) + lin(t.width, t.ffn_dim) + lin(t.ffn_dim, t.width) \
        + ln(t.width)
    text = t.vocab_size * t.width + t.max_positions * t.width + ln(t.width) + t.layers * text_block \
        + lin(t.width, t.width)
    return vision + text + 1  # + temperature


class _PeakRss:
    """Samples this process's resident memory (VmRSS) in a background thread."""

    def __init__(self, every: float = 0.05):
        self.every, self.peak, self._stop = every, 0, threading.Event()
        self.base = self._rss()

    @staticmethod
    def _rss() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def _loop(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self.every)

    def __enter__(self):
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_base_preset_one_step_on_cpu(demo_cache, tmp_path, monkeypatch, capsys):
    cfg = _compose(
        demo_cache, "model=base", "model.vocab_file=null", "model.text.vocab_size=40000",
        "trainer.max_steps=1", "data.batch_size=2", "eval=none", "logger.log_every=1",
        "trainer.save_checkpoint=false",
    )
    built, snapshot = [], {}
    watched = ("vision.blocks.0.attn.qkv.weight", "vision.patch_embed.weight", "text.blocks.11.ffn_o.weight",
               "text.pooler.weight", "temperature")
    real_build = run_module.build_model

    def capture(model_cfg):
        model = real_build(model_cfg)
        built.append(model)
        params = dict(model.named_parameters())
        snapshot.update({k: params[k].numpy().copy() for k in watched})
        return model

    monkeypatch.setattr(run_module, "build_model", capture)
    start = time.perf_counter()
    with _PeakRss() as mem:
        run_training(cfg, tmp_path)
    seconds = time.perf_counter() - start

    (model,) = built
    mc = model.cfg
    assert (mc.vision.width, mc.vision.layers, mc.vision.heads, mc.vision.image_size) == (768, 12, 12, 224)
    assert (mc.text.vocab_size, mc.text.layers, mc.text.max_positions) == (40000, 12, 2048)
    n_params = sum(int(np.prod(p.shape)) for p in model.parameters())
    assert n_params == expected_param_count(mc) == 203_738_881
    params = dict(model.named_parameters())
    for k in watched:
        assert not np.array_equal(params[k].numpy(), snapshot[k]), f"{k} did not change after one step"
    log = _jsonl(tmp_path / "train_log.jsonl")
    assert [r["step"] for r in log] == [1] and math.isfinite(log[0]["loss"])

    with capsys.disabled():
        print(f"\n[base preset, 1 step, batch 2, CPU] {seconds:.1f} s, peak RSS {mem.peak / 2**30:.2f} GiB "
              f"(+{(mem.peak - mem.base) / 2**30:.2f} GiB over {mem.base / 2**30:.2f} GiB before), "
              f"{n_params / 1e6:.2f}M parameters")


def test_eval_schedule_by_steps_and_by_training_seconds():
    from ernievil2.train.schedule import EvalSchedule

    by_steps = EvalSchedule(every_steps=10, every_s=0.0)
    assert [s for s in range(1, 31) if by_steps.due(s, None)] == [10, 20, 30]
    by_time = EvalSchedule(every_steps=0, every_s=60.0, now_s=75.0)  # a run resumed at 75 s
    assert by_time.next_s == 120.0 and not by_time.due(7, 119.9) and by_time.due(8, 121.5)
    by_time.evaluated(121.5)
    assert by_time.next_s == 180.0  # on the grid of 60 s, not 60 s after the late evaluation
    both = EvalSchedule(every_steps=5, every_s=30.0)
    assert both.due(5, 1.0) and both.due(6, 30.0) and not both.due(6, 29.0)
