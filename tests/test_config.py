"""Hydra config groups over the typed schemas: defaults, group choices, and fail-fast on typos."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ernievil2.losses import LossConfig
from ernievil2.models.schema import ModelSchema, resolve_model
from ernievil2.train.config import (
    Config,
    EvalSetSchema,
    OptimSchema,
    TrainerSchema,
    register_schemas,
    validate,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"

register_schemas()


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def _error_text(exc: BaseException) -> str:
    """The message of an exception and of everything it was raised from."""
    parts = []
    while exc is not None:
        parts.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return "\n".join(parts)


def test_default_compose_is_the_demo():
    cfg = _compose()
    assert cfg.name == "demo"
    assert cfg.model.preset == "tiny"
    assert cfg.data.source == "demo"
    # the default recipe (conf/loss/multiview.yaml): image-caption + image-objects on every row
    assert {t: cfg.loss[t] for t in ("image_caption", "image_objects", "image_image", "text_text")} == {
        "image_caption": 1.0, "image_objects": 1.0, "image_image": 1.0, "text_text": 0.0}
    assert cfg.loss.aux_fraction == 1.0
    assert cfg.model.vision.init == cfg.model.text.init == "fan_in"
    assert len(cfg.eval.datasets) == 1
    assert cfg.eval.datasets[0].name == "demo_val"
    assert cfg.eval.datasets[0].protocol == "multi"
    # Whatever experiment/demo.yaml sets wins over the group defaults (its tuned values may change).
    experiment = OmegaConf.load(CONF_DIR / "experiment" / "demo.yaml")
    for key in ("optim.lr", "optim.warmup_steps", "trainer.max_steps", "data.batch_size", "model.text_max_length",
                "eval.every_n_steps"):
        value = OmegaConf.select(experiment, key)
        if value is not None:
            assert OmegaConf.select(cfg, key) == value, key

    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, Config)
    assert isinstance(obj.model, ModelSchema) and isinstance(obj.optim, OptimSchema)
    assert isinstance(obj.loss, LossConfig)
    assert isinstance(obj.eval.datasets[0], EvalSetSchema)
    # the demo's val split, an ordinary shards folder inside the data.demo settings' cache folder
    from ernievil2.data.demo import demo_path

    spec = {name: getattr(obj.data.demo, name) for name in ("n_train", "n_val", "image_size", "seed", "samples_per_shard",
                                                            "tags", "tag_recall", "false_tags", "tag_attributes",
                                                            "attribute_error", "mismatch", "version")}
    from ernievil2.data.demo import DemoDataSpec

    assert (obj.eval.datasets[0].format, obj.eval.datasets[0].path) == (
        "shards", demo_path(obj.data.demo.cache_dir, DemoDataSpec(**spec), "val"))
    assert not hasattr(obj.eval.datasets[0], "shards")  # the legacy spelling of format: shards, path: is gone
    # The tiny preset, with a vocab size to be filled from the built vocab.
    model = resolve_model(obj.model, 500, built_vocab=True)
    assert model.vision.width == 64 and model.text.vocab_size == 500


def test_clip_only_loss_group():
    cfg = _compose("loss=clip_only")
    assert cfg.loss.image_caption == 1.0
    assert (cfg.loss.image_objects, cfg.loss.image_image, cfg.loss.text_text) == (0.0, 0.0, 0.0)


def test_model_overrides_reach_the_model_config():
    cfg = _compose("model=base", "model.vision.layers=2", "model.text.vocab_size=40000", "model.vocab_file=null")
    m = resolve_model(OmegaConf.to_object(cfg).model, 123, built_vocab=True)
    assert m.vision.layers == 2 and m.vision.width == 768 and m.text.layers == 12
    assert m.text.vocab_size == 40000  # an explicit override wins over the built vocab's size


@pytest.mark.parametrize("override,key", [
    # misspelled keys
    ("optim.lrr=0.1", "lrr"),
    ("model.vision.widht=3", "widht"),
    ("trainer.max_stepz=3", "max_stepz"),
    ("data.demo.n_trian=10", "n_trian"),
    ("nme=x", "nme"),
    # values of the wrong type
    ("trainer.max_steps=abc", "max_steps"),
    ("optim.lr=fast", "lr"),
    ("eval.at_end=maybe", "at_end"),
])
def test_bad_override_fails_at_compose_naming_the_key(override, key):
    with pytest.raises(Exception) as err:
        _compose(override)
    assert key in _error_text(err.value)


def test_unknown_group_option_fails():
    with pytest.raises(Exception) as err:
        _compose("model=huge")
    assert "huge" in _error_text(err.value)


def test_appended_unknown_key_is_rejected():
    # Hydra's '+key=value' opens the struct flag; validate() checks against the schema again.
    cfg = _compose("+optim.lrr=0.1")
    with pytest.raises(Exception, match="lrr"):
        validate(cfg)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_entry_point_fails_fast_naming_the_key(tmp_path):
    proc = subprocess.run(
        [sys.executable, "launch/train.py", "optim.lrr=0.1", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert "lrr" in proc.stderr + proc.stdout
    assert not (tmp_path / "run" / "train_log.jsonl").exists()


def test_loaded_vocab_keeps_the_released_embedding_size():
    # The released vocab.txt holds 39,980 ids; the released model's embedding has 40,000 rows.
    base = ModelSchema(preset="base")
    assert resolve_model(base, 39980, built_vocab=False).text.vocab_size == 40000
    # A larger loaded vocab enlarges the tiny preset; a built vocab sizes it exactly.
    assert resolve_model(ModelSchema(preset="tiny"), 39980, built_vocab=False).text.vocab_size == 39980
    assert resolve_model(ModelSchema(preset="tiny"), 321, built_vocab=True).text.vocab_size == 321


def test_real_mix_experiment_mixes_two_packed_sources(monkeypatch):
    """experiment=real_mix: Flickr8k-CN and COCO-mini at 3:1, resampled, the released vocab, the
    Flickr8k-CN retrieval set; REAL_MIX_ROOT / ERNIEVIL2_SHARED move the folders."""
    monkeypatch.setenv("REAL_MIX_ROOT", "/data/packed")
    monkeypatch.setenv("ERNIEVIL2_SHARED", "/data/shared")
    cfg = validate(_compose("experiment=real_mix"))
    assert cfg.data.source == "shards" and cfg.data.train_shards is None and cfg.data.resampled
    assert [(s.name, s.shards, s.weight) for s in cfg.data.sources] == [
        ("flickr8k_cn", "/data/packed/flickr8k-cn", 3.0), ("coco_mini", "/data/packed/coco-mini", 1.0)]
    assert cfg.model.vocab_file == "/data/shared/assets/ernie-3.0-base-zh/vocab.txt"
    assert [d.name for d in cfg.eval.datasets] == ["flickr8k_cn"]


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")))
def test_every_experiment_composes_and_validates(name):
    cfg = validate(_compose(f"experiment={name}"))
    assert cfg.name == name
    assert cfg.trainer.max_steps > 0 and cfg.data.batch_size > 0


def test_pretrain_base_uses_the_memory_settings():
    cfg = validate(_compose("experiment=pretrain_base"))
    assert cfg.model.preset == "base" and cfg.data.source == "shards" and cfg.data.resampled
    t = cfg.trainer
    assert (t.amp, t.amp_level, t.recompute, t.sharding_stage) == ("bf16", "O2", True, 1)
    assert t.best_metric == "flickr30k/multi/mean_recall" and cfg.logger.backend == "wandb"


def test_trainer_group_default_changes_nothing():
    """trainer=cpu (the default) holds exactly TrainerSchema's defaults, so the demo runs as before."""
    defaults = TrainerSchema()
    cpu = OmegaConf.load(CONF_DIR / "trainer" / "cpu.yaml")
    assert {"amp", "amp_level", "recompute", "sharding_stage", "checkpoint_every", "keep_last"} <= set(cpu)
    for key, value in cpu.items():
        assert getattr(defaults, key) == value, key
    cfg = validate(_compose())
    assert cfg.trainer == replace(defaults, max_steps=cfg.trainer.max_steps)


def test_experiments_pick_a_trainer_instead_of_repeating_precision():
    for path in sorted((CONF_DIR / "experiment").glob("*.yaml")):
        trainer = OmegaConf.load(path).get("trainer") or {}
        assert not {"amp", "amp_level", "recompute", "sharding_stage"} & set(trainer), path.name
    t = validate(_compose("experiment=finetune_released")).trainer
    assert (t.amp, t.amp_level, t.recompute, t.sharding_stage, t.checkpoint_every) == ("bf16", "O1", True, 0, 500)
    # a checkpoint at every evaluation; the command line's trainer= wins over the experiment's
    assert validate(_compose("trainer=gpu_bf16", "eval.every_n_steps=7")).trainer.checkpoint_every == 7
    t = validate(_compose("experiment=finetune_released", "trainer=cpu")).trainer
    assert (t.amp, t.recompute, t.checkpoint_every) == ("none", False, 0)


@pytest.mark.slow
@pytest.mark.parametrize("args,message", [
    (["+optim.lrr=0.1"], "train.py: error: unknown config key 'optim.lrr' (valid keys here: "),
    (["mode=eval", "ckpt=/nonexistent/ckpt"], "train.py: error: /nonexistent/ckpt: no such checkpoint file or folder"),
])
def test_user_errors_print_one_line_without_traceback(args, message, tmp_path):
    cmd = [sys.executable, "launch/train.py", *args, f"hydra.run.dir={tmp_path / 'run'}"]
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(message), proc.stderr[-2000:]
    full = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False,
                          env={**env, "HYDRA_FULL_ERROR": "1"})
    assert full.returncode != 0 and "Traceback" in full.stderr
