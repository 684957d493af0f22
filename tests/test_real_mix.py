"""Real data end to end: pack the shared Flickr8k-CN and COCO-mini sets with launch/pack.py, then
train ``experiment=real_mix`` (3:1 mix, released vocab) for a few steps. The objects term sees only
the COCO rows: the ``has_objects`` mask is 1 exactly for samples with tags, and those are ~1/4 of
the mix. Skipped without ../shared."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from ernievil2.data.shard_reader import iter_samples
from ernievil2.train.config import register_schemas
from ernievil2.train.run import run_training

REPO = Path(__file__).resolve().parents[1]
register_schemas()


def _pack(args: list[str]) -> None:
    """launch/pack.py ARGS in a subprocess, as the documented commands run it."""
    proc = subprocess.run([sys.executable, "launch/pack.py", *args, "--no-progress"], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.fixture(scope="module")
def packed(tmp_path_factory, flickr8k_dir: Path, coco_mini_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("packed")
    _pack(["--format", "jsonl", "--input", str(flickr8k_dir / "captions.jsonl"), "--output", str(root / "flickr8k-cn"),
           "--language", "zh", "--samples-per-shard", "20", "--limit", "120"])
    _pack(["--format", "jsonl", "--input", str(coco_mini_dir / "captions.jsonl"), "--output", str(root / "coco-mini"),
           "--samples-per-shard", "10", "--limit", "40"])
    return root


def test_packed_sources_differ_in_object_tags(packed: Path):
    flickr = list(iter_samples(packed / "flickr8k-cn"))
    coco = list(iter_samples(packed / "coco-mini"))
    assert len(flickr) == 120 and len(coco) == 40
    assert not any(s.has_objects for s in flickr) and all(s.lang == "zh" for s in flickr)
    assert all(s.has_objects for s in coco) and all(s.lang == "en" for s in coco)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_real_mix_trains_with_objects_on_coco_rows_only(packed: Path, shared_dir: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("REAL_MIX_ROOT", str(packed))
    monkeypatch.setenv("ERNIEVIL2_SHARED", str(shared_dir))
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "experiment=real_mix", "trainer.max_steps=12", "trainer.checkpoint_every=0", "logger.log_every=2",
            "data.batch_size=16", "data.num_workers=0", "eval.datasets.0.max_images=16", "eval.every_n_steps=0",
            "trainer.device=cpu", "loss.aux_fraction=1.0"])  # objects on every row: the mask shows the mix
    # Every batch the trainer sees: the mask is 1 exactly where the objects text is non-empty.
    from ernievil2.train import trainer as trainer_module

    seen = []
    real_step = trainer_module.Trainer.train_step

    def spy(self, batches, *args):
        for b in ([batches] if isinstance(batches, dict) else batches):
            mask = np.asarray(b["has_objects"])
            pad = self.model.cfg.text.pad_id
            has_text = (np.asarray(b["objects_ids"]) != pad).sum(axis=1) > 2  # more than [CLS] [SEP]
            seen.append((mask, has_text))
        return real_step(self, batches, *args)

    monkeypatch.setattr(trainer_module.Trainer, "train_step", spy)
    final = run_training(cfg, tmp_path)
    masks = np.concatenate([m for m, _ in seen]).astype(np.float64)
    assert len(masks) == 12 * 16
    for mask, has_text in seen:
        np.testing.assert_array_equal(mask.astype(bool), has_text)
    assert 0.12 < masks.mean() < 0.40, masks.mean()  # 1 part in 4 comes from COCO
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) and r["image_objects"] > 0 for r in log)
    assert np.mean([r["objects_frac"] for r in log]) == pytest.approx(masks.mean(), abs=1e-9)
    assert {(r["dataset"], r["protocol"]) for r in final} == {("flickr8k_cn", "multi"), ("flickr8k_cn", "official")}
