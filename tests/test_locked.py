"""Locked towers (LiT), their unlocking mid-run (Chinese-CLIP's stage 2), layer-wise LR decay and
caption-language selection (training and evaluation).

- a locked tower: bit-identical weights after training steps, no optimizer state, eval mode
  (dropout off) while the rest trains; ``model.<tower>.locked`` stays out of the tower config;
- ``optim.unlock_at``: the tower trains from then on, gets optimizer state, its LR ramped from 0;
  the unlock step is checkpointed and a resume follows it whatever its own clock says; a killed
  run resumed across the unlock point logs the losses of an uninterrupted one (subprocesses);
- layer decay: the learning rate Paddle applies to each parameter, measured from Adam's first
  step, is ``lr · decay^(depth_max − depth)``; the train log carries each group's;
- ``data.caption_languages``: the kept captions, and samples left with none counted as skips;
  an evaluation set's ``caption_languages`` (the demo val set in Chinese only);
- 2 ranks (gloo, CPU): data parallel with a locked tower unlocked half-way, with and without
  recompute (gradients averaged after backward) and with sharded optimizer state, trains like one
  process over the whole batch.
"""
from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import dist_worker
import numpy as np
import paddle
import pytest
from safetensors.numpy import load_file
from train_runs import REPO_ROOT, compose_config, read_jsonl, train_cmd, train_env

from ernievil2.data.caption_language import caption_languages, kept_captions, language_in
from ernievil2.data.demo import DemoDataSpec, ensure_demo_data, make_sample
from ernievil2.data.demo.scenes import val_scenes
from ernievil2.data.loader import StreamSource, build_train_data
from ernievil2.data.sample import BadSample, RawSample
from ernievil2.data.shard_writer import ShardWriter
from ernievil2.data.views import MultiViewTransform, ViewConfig
from ernievil2.distributed import DistInfo
from ernievil2.evaluators.retrieval import eval_set_spec, read_items
from ernievil2.losses import LossConfig, MultiViewLoss
from ernievil2.models import build_model
from ernievil2.models.config import model_config
from ernievil2.models.schema import ModelSchema, resolve_model
from ernievil2.tokenizer import SPECIAL_TOKENS, WordPieceTokenizer
from ernievil2.train.config import EvalSetSchema, OptimSchema, TrainerSchema, register_schemas, validate
from ernievil2.train.optim import build_optimizer, lr_groups
from ernievil2.train.run import run_training
from ernievil2.train.towers import TowerSchedule, locked_towers
from ernievil2.train.trainer import Trainer
from ernievil2.train.training_checkpoint import OPTIMIZER_STATE, _optimizer_entries

SMALL = [
    "data.demo.n_train=600", "data.demo.n_val=60", "data.demo.samples_per_shard=200", "data.batch_size=16",
    "data.shuffle_buffer=200", "trainer.device=cpu", "logger.backend=none", "optim.warmup_steps=3",
]
register_schemas()


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("demo_cache_locked")


def _compose(*overrides: str):
    return compose_config(SMALL, *overrides)


def _jsonl(path: Path) -> list[dict]:
    return read_jsonl(path)


def _moment_owners(optimizer, model) -> set[str]:
    """The parameters (structured names) the optimizer holds any state for."""
    return {key.rsplit("@", 1)[0] for key in _optimizer_entries(optimizer, model)[0]}


def _trainer(locked=("vision",), unlock_at=None, warmup=0, run_dir: str | Path = "unused"):
    model = dist_worker.make_model()
    optim = OptimSchema(lr=1e-2, warmup_steps=0, grad_clip=0.0, unlock_at=unlock_at, unlock_warmup_steps=warmup)
    optimizer, scheduler = build_optimizer(model, optim, 8)
    towers = TowerSchedule(model, locked, optim.unlock_at, optim.unlock_warmup_steps, lr_groups(model, optim))
    return Trainer(model, MultiViewLoss(LossConfig()), optimizer, scheduler, None, [], None, run_dir,
                   TrainerSchema(max_steps=8), towers=towers)


def _steps(trainer: Trainer, n: int, total: int = 8) -> None:
    for _ in range(n):
        trainer.prepare_step(trainer.step / total)
        trainer.train_step(dist_worker.make_batch("a" if trainer.step % 2 == 0 else "b"))
        trainer._apply_update()
        trainer.scheduler.step()
        trainer.step += 1


@pytest.fixture
def float64():
    previous = paddle.get_default_dtype()
    paddle.set_default_dtype("float64")
    yield
    paddle.set_default_dtype(previous)


# ------------------------------------------------------------------------------------------------
# locked towers, unlocking
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tower", ["vision", "text"])
def test_locked_tower_keeps_its_weights_and_has_no_optimizer_state(float64, tower):
    trainer = _trainer(locked=(tower,))
    model = trainer.model
    before = {n: p.numpy().copy() for n, p in model.named_parameters()}
    _steps(trainer, 3)
    other = "text" if tower == "vision" else "vision"
    for name, p in model.named_parameters():
        if name.startswith(tower + "."):
            np.testing.assert_array_equal(p.numpy(), before[name], err_msg=name)  # bit-identical
        elif name.startswith(other + ".blocks.0."):
            assert not np.array_equal(p.numpy(), before[name]), name
    owners = _moment_owners(trainer.optimizer, model)
    assert owners and not [n for n in owners if n.startswith(tower + ".")]
    assert {n for n, _ in model.named_parameters() if not n.startswith(tower + ".")} == owners
    assert model.training and not getattr(model, tower).training  # eval mode while the rest trains


def test_locked_text_tower_runs_without_dropout_or_gradient():
    paddle.seed(0)
    model = build_model(model_config("tiny", text={"vocab_size": 64, "dropout": 0.5, "attention_dropout": 0.5}))
    TowerSchedule(model, ["text"])
    model.train()
    ids = paddle.randint(4, 64, [3, 10])
    a, b = model.encode_text(ids), model.encode_text(ids)
    assert a.stop_gradient and np.array_equal(a.numpy(), b.numpy())
    model.eval()  # an evaluation, then back to training: still locked in eval mode
    model.train()
    np.testing.assert_array_equal(model.encode_text(ids).numpy(), a.numpy())
    free = build_model(model_config("tiny", text={"vocab_size": 64, "dropout": 0.5, "attention_dropout": 0.5}))
    free.train()
    assert not free.encode_text(ids).stop_gradient


def test_unlock_trains_the_tower_with_its_own_warmup(float64):
    trainer = _trainer(unlock_at=0.5, warmup=2)
    model = trainer.model
    _steps(trainer, 4)
    assert trainer.towers.unlocked_at_step is None and not _moment_owners(trainer.optimizer, model) & {
        n for n, _ in model.named_parameters() if n.startswith("vision.")}
    at_unlock = {n: p.numpy().copy() for n, p in model.named_parameters() if n.startswith("vision.")}
    _steps(trainer, 1)  # step index 4: 4 / 8 = unlock_at
    assert trainer.towers.unlocked_at_step == 4 and model.vision.training
    attrs = {p.optimize_attr["learning_rate"] for n, p in model.named_parameters() if n.startswith("vision.")}
    assert attrs == {0.5}  # (0 + 1) / 2
    lr = trainer.scheduler.last_lr
    logged = trainer.towers.learning_rates(lr)
    assert logged["lr/vision"] == pytest.approx(0.5 * lr) and logged["lr/text"] == pytest.approx(lr)
    _steps(trainer, 1)
    assert {p.optimize_attr["learning_rate"] for n, p in model.named_parameters() if n.startswith("vision.")} == {1.0}
    for name, value in at_unlock.items():
        assert not np.array_equal(model.state_dict()[name].numpy(), value), name
    assert {n for n, _ in model.named_parameters()} == _moment_owners(trainer.optimizer, model)


def test_unlock_step_is_checkpointed_and_followed_on_resume(float64, tmp_path):
    """A run unlocked at step 2 (say by its clock); resumed with settings under which it would not
    unlock yet, it unlocks at once at the recorded step, its ramp where it was."""
    trainer = _trainer(unlock_at=0.25, warmup=4, run_dir=tmp_path)
    _steps(trainer, 3)
    ckpt = trainer.save()
    state = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
    assert state["extra"]["towers"] == {"locked": ["vision"], "unlocked_at_step": 2}
    assert any(k.startswith("vision.") for k in load_file(str(ckpt / OPTIMIZER_STATE)))

    again = _trainer(unlock_at=0.9, warmup=4)
    again.resume(str(ckpt))
    assert again.towers.unlocked_at_step == 2 and not any(
        p.stop_gradient for n, p in again.model.named_parameters() if n.startswith("vision."))
    again.prepare_step(0.0)  # below unlock_at: stays unlocked, ramp (3 - 2 + 1) / 4
    assert {p.optimize_attr["learning_rate"] for n, p in again.model.named_parameters()
            if n.startswith("vision.")} == {0.5}
    assert _moment_owners(again.optimizer, again.model) == {n for n, _ in again.model.named_parameters()}


def test_settings_are_checked():
    model = dist_worker.make_model()
    with pytest.raises(ValueError, match="no tower is locked"):
        TowerSchedule(model, [], unlock_at=0.5)
    with pytest.raises(ValueError, match="unlock_at must be in"):
        TowerSchedule(model, ["text"], unlock_at=1.5)
    with pytest.raises(ValueError, match="unknown tower"):
        TowerSchedule(model, ["audio"])
    with pytest.raises(ValueError, match="layer decay of the text tower"):
        lr_groups(model, OptimSchema(text_layer_decay=1.5))
    with pytest.raises(ValueError, match="sharding_stage 0 or 1"):
        Trainer(model, MultiViewLoss(LossConfig()), None, None, None, [], None, "unused",
                TrainerSchema(sharding_stage=2), towers=TowerSchedule(model, ["text"], unlock_at=0.5))


def test_locked_is_a_typed_training_key_not_an_architecture_field():
    cfg = validate(_compose("model.vision.locked=true"))
    assert cfg.model.vision.locked is True and cfg.model.text.locked is False
    assert locked_towers(cfg.model) == ["vision"]
    assert resolve_model(cfg.model, 100, built_vocab=True) == resolve_model(validate(_compose()).model, 100,
                                                                             built_vocab=True)
    assert ModelSchema().vision.locked is False
    with pytest.raises(Exception, match="locked"):
        _compose("model.text.locked=perhaps")


# ------------------------------------------------------------------------------------------------
# layer-wise learning-rate decay
# ------------------------------------------------------------------------------------------------


def _expected_factor(name: str, vision_decay: float, text_decay: float, temperature: float) -> float:
    """``decay^(depth_max - depth)`` worked out from the tiny model's layout by hand."""
    if name == "temperature":
        return temperature
    tower, rest = name.split(".", 1)
    decay, layers = (vision_decay, 4) if tower == "vision" else (text_decay, 2)
    first = rest.split(".")[0]
    if first == "blocks":
        depth = int(rest.split(".")[1]) + 1
    elif first in ("patch_embed", "class_embedding", "positional_embedding", "ln_pre", "word_emb", "pos_emb", "ln"):
        depth = 0
    else:
        assert first in ("ln_post", "pooler"), name
        depth = layers + 1
    return decay ** (layers + 1 - depth)


def test_layer_decay_sets_each_parameters_learning_rate():
    """Adam's first step moves every parameter element by its learning rate (eps tiny, no decay):
    the measured step of each parameter is ``lr · factor``."""
    paddle.seed(1)
    model = build_model(model_config("tiny", text={"vocab_size": 64}))
    cfg = OptimSchema(lr=1e-2, warmup_steps=0, grad_clip=0.0, weight_decay=0.0, eps=1e-12, layer_decay=0.5,
                      text_layer_decay=0.8, temperature_lr_scale=0.1)
    optimizer, _ = build_optimizer(model, cfg, 10)
    before = {n: p.numpy().copy() for n, p in model.named_parameters()}
    paddle.add_n([(p * paddle.sin(p * 7.0 + 1.0)).sum() for p in model.parameters()]).backward()
    optimizer.step()
    for name, p in model.named_parameters():
        moved = np.abs(p.numpy() - before[name]).max()
        assert moved == pytest.approx(1e-2 * _expected_factor(name, 0.5, 0.8, 0.1), rel=1e-3), name


@pytest.mark.timeout(300)
def test_each_groups_learning_rate_is_logged(tmp_path, demo_cache):
    run_training(_compose(f"data.demo.cache_dir={demo_cache}", "trainer.max_steps=2", "logger.log_every=1",
                          "eval=none", "data.num_workers=0", "trainer.save_checkpoint=false",
                          "optim.layer_decay=0.5", "model.text.locked=true"), tmp_path)
    row = _jsonl(tmp_path / "train_log.jsonl")[-1]
    lr = row["lr"]
    expected = {"lr/vision_emb": lr / 32, **{f"lr/vision_block{i}": lr / 2 ** (4 - i) for i in range(4)},
                "lr/vision_head": lr, "lr/temperature": lr, "lr/text_emb": 0.0, "lr/text_block0": 0.0,
                "lr/text_block1": 0.0, "lr/text_head": 0.0}
    assert {k: v for k, v in row.items() if k.startswith("lr/")} == pytest.approx(expected)


# ------------------------------------------------------------------------------------------------
# caption languages
# ------------------------------------------------------------------------------------------------


def test_caption_language_rules():
    assert language_in("zh-CN", ["zh"]) and language_in("zh_cn", ["ZH"]) and not language_in("zh", ["zh-cn"])
    assert caption_languages(["a", "b"], "mul", {"languages": ["en", "zh"]}) == ["en", "zh"]
    assert caption_languages(["a dog", "一只狗"], "mul", {}) == ["en", "zh"]  # no list: guessed by script
    assert caption_languages(["a", "b"], "en", {}) == ["en", "en"]
    assert kept_captions(["a", "b", "c"], "en", {}, []) == [0, 1, 2]
    assert kept_captions(["a", "b", "c"], "en", {}, ["zh"]) == []


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> WordPieceTokenizer:
    vocab = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    vocab.write_text("\n".join([*SPECIAL_TOKENS, "a", "photo"]) + "\n", encoding="utf-8")
    return WordPieceTokenizer(vocab, max_length=8)


def test_training_keeps_the_captions_of_the_languages(tokenizer):
    sample = make_sample("s0", val_scenes(1, 0)[0], np.random.default_rng(0), 32, "val")
    assert sample.lang == "mul" and sample.meta["languages"] == ["en", "en", "zh", "zh"]
    transform = MultiViewTransform(ViewConfig(image_size=32), tokenizer, 8, views=["caption_ids"],
                                   caption_languages=["zh"])
    kept = transform.in_languages(sample)
    assert kept.captions == sample.captions[2:] and kept.meta["languages"] == ["zh", "zh"]
    english = RawSample("s1", sample.image, ["a photo"], lang="en")
    for check in (transform, transform.validate):
        with pytest.raises(BadSample, match="no caption in") as info:
            check(english)
        assert info.value.kind == "other_language"


def test_samples_without_a_kept_caption_are_counted(tmp_path, tokenizer):
    scene = val_scenes(1, 0)[0]
    with ShardWriter(tmp_path) as writer:
        for i in range(10):
            if i % 3 == 0:  # 4 samples with English captions only
                writer.write(RawSample(f"k{i:02d}", make_sample("x", scene, np.random.default_rng(i), 32, "val").image,
                                       ["a photo", "a photo a photo"], lang="en"))
            else:
                writer.write(make_sample(f"k{i:02d}", scene, np.random.default_rng(i), 32, "val"))
    transform = MultiViewTransform(ViewConfig(image_size=32), tokenizer, 8, views=["image", "caption_ids"],
                                   caption_languages=["zh"])
    data = build_train_data([StreamSource.of("x", tmp_path)], transform, batch_size=2, num_workers=0,
                            shuffle_buffer=0, seed=0, world_size=1)
    batches = list(data.batches(0))
    skipped: dict[str, int] = {}
    for b in batches:
        for kind, n in b.get("skipped", {}).items():
            skipped[kind] = skipped.get(kind, 0) + n
    assert skipped == {"other_language": 4}
    # every row's caption is a Chinese one (the English samples' "a photo" never shows); the exact
    # epoch counts 10 raw samples: its 5 batches repeat 4 of the 6 kept ones (as for any skip)
    ids = np.concatenate([np.asarray(b["caption_ids"]) for b in batches if "caption_ids" in b])
    assert len(ids) == 10 and not np.isin(ids, [tokenizer.token_to_id("a"), tokenizer.token_to_id("photo")]).any()


@pytest.fixture(scope="module")
def demo_val(demo_cache) -> Path:
    spec = DemoDataSpec(n_train=600, n_val=60, samples_per_shard=200)
    return ensure_demo_data(demo_cache, spec).val_dir


def test_eval_set_in_one_language(demo_val):
    """The demo val set with ``caption_languages: [zh]``: every image, its two Chinese captions only."""
    every = read_items(eval_set_spec(EvalSetSchema(name="demo_val", path=str(demo_val))))
    spec = eval_set_spec(EvalSetSchema(name="demo_val_zh", path=str(demo_val), caption_languages=["zh"]))
    assert spec.caption_languages == ("zh",)
    chinese = read_items(spec)
    assert [i.key for i in chinese] == [i.key for i in every] and len(every) == 60
    for a, b in zip(every, chinese):
        assert b.captions == a.captions[2:] and b.meta["languages"] == ["zh", "zh"]
        assert all(any("\u4e00" <= ch <= "\u9fff" for ch in c) for c in b.captions)
    none = eval_set_spec(EvalSetSchema(name="demo_val_ja", path=str(demo_val), caption_languages=["ja"]))
    with pytest.raises(Exception, match="holds no image"):
        read_items(none)


def test_eval_caption_languages_is_typed():
    cfg = _compose("eval.datasets=[{name: x, path: y, caption_languages: [zh]}]")
    assert validate(cfg).eval.datasets[0].caption_languages == ["zh"]
    with pytest.raises(Exception, match="caption_languages"):
        validate(_compose("eval.datasets=[{name: x, path: y, caption_languages: 3}]"))


# ------------------------------------------------------------------------------------------------
# resume across the unlock point (subprocesses)
# ------------------------------------------------------------------------------------------------

RESUME_ARGS = ("trainer.max_steps=8", "trainer.checkpoint_every=2", "logger.log_every=1", "eval=none",
               "data.num_workers=0", "trainer.keep_last=10", "model.vision.locked=true", "optim.unlock_at=0.5",
               "optim.unlock_warmup_steps=2", "optim.layer_decay=0.7")


def _train_cmd(run_dir: Path, cache: Path, *extra: str) -> list[str]:
    return train_cmd(SMALL, run_dir, cache, *RESUME_ARGS, *extra)


def _env() -> dict[str, str]:
    return train_env()


def _assert_same_log(got: Path, want: Path, steps: range) -> None:
    reference = {r["step"]: r for r in _jsonl(want)}
    seen = set()
    for r in _jsonl(got):  # a step logged twice (before the kill and after the resume) must agree both times
        for key in ("loss", "lr", "lr/vision_block0", "lr/vision_head", "lr/text_head", "logit_scale"):
            np.testing.assert_allclose(r[key], reference[r["step"]][key], rtol=1e-6, err_msg=f"{key} at {r['step']}")
        seen.add(r["step"])
    assert sorted(seen) == list(steps)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_killed_run_resumes_exactly_across_the_unlock(tmp_path, demo_cache):
    full = tmp_path / "full"
    subprocess.run(_train_cmd(full, demo_cache), env=_env(), check=True, capture_output=True, timeout=300)
    log = _jsonl(full / "train_log.jsonl")
    assert [r["lr/vision_head"] == 0.0 for r in log] == [True] * 4 + [False] * 4
    assert log[4]["lr/vision_head"] == pytest.approx(log[4]["lr"] / 2)  # the ramp's first step
    ckpts = full / "checkpoints"
    for step, unlocked in ((4, None), (6, 4)):
        state = json.loads((ckpts / f"step_{step:07d}" / "trainer_state.json").read_text(encoding="utf-8"))
        assert state["extra"]["towers"] == {"locked": ["vision"], "unlocked_at_step": unlocked}
        owners = {k.split("@")[0] for k in load_file(str(ckpts / f"step_{step:07d}" / OPTIMIZER_STATE))}
        assert any(o.startswith("vision.") for o in owners) is bool(unlocked)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(killed, demo_cache), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    log_file = killed / "train_log.jsonl"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if log_file.is_file() and any(r["step"] >= 3 for r in _jsonl(log_file)):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    latest = (killed / "checkpoints" / "latest").read_text(encoding="utf-8").strip()
    saved = json.loads((killed / "checkpoints" / Path(latest).name / "trainer_state.json").read_text())
    assert saved["step"] <= 4 and saved["extra"]["towers"]["unlocked_at_step"] is None  # before the unlock
    subprocess.run(_train_cmd(killed, demo_cache, "resume=latest"), env=_env(), check=True, capture_output=True,
                   timeout=300)
    _assert_same_log(log_file, full / "train_log.jsonl", range(1, 9))

    # A checkpoint written after the unlock restores it (tower trainable, its moments, its ramp).
    after = tmp_path / "after"
    subprocess.run(_train_cmd(after, demo_cache, f"resume={ckpts / 'step_0000006'}"), env=_env(), check=True,
                   capture_output=True, timeout=300)
    _assert_same_log(after / "train_log.jsonl", full / "train_log.jsonl", range(7, 9))
    for run in (killed, after):
        a, b = load_file(str(ckpts / "step_0000008" / "model.safetensors")), load_file(
            str(run / "checkpoints" / "step_0000008" / "model.safetensors"))
        for name in a:
            np.testing.assert_allclose(b[name], a[name], rtol=0, atol=1e-6, err_msg=name)


# ------------------------------------------------------------------------------------------------
# 2 ranks
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_ranks_with_a_locked_tower_train_like_one_process(tmp_path, float64):
    """tests/dist_locked_worker.py on 2 ranks (data parallel, data parallel + recompute, sharded
    optimizer state): the vision tower is bit-identical until it is unlocked half-way and holds no
    optimizer state until then; the final parameters equal one process's over the whole batch
    and are identical on both ranks."""
    import dist_locked_worker
    from test_distributed import _launch

    reference = dist_locked_worker.run(DistInfo(), "dp")
    for setting in ("dp", "recompute", "sharded"):
        base = tmp_path / setting
        _launch(REPO_ROOT / "tests" / "dist_locked_worker.py", [str(base / "out"), setting], base / "log", cwd=tmp_path)
        ranks = [dict(np.load(base / "out" / f"rank{r}.npz")) for r in (0, 1)]
        for out in ranks:
            assert not [k for k in out["owners_at_unlock"].tolist() if k.startswith("vision.")], setting
        held = [set(out["owners_at_end"].tolist()) for out in ranks]
        if setting == "sharded":  # each rank holds the state of its share, the vision tower's included
            assert not held[0] & held[1] and held[0] | held[1] == set(reference["param_names"]), held
        else:
            assert held[0] == held[1] == set(reference["param_names"])
        for name in reference["param_names"]:
            if name.startswith("vision."):
                np.testing.assert_array_equal(ranks[0][f"locked/{name}"], reference[f"init/{name}"], err_msg=name)
                assert not np.array_equal(ranks[0][f"param/{name}"], reference[f"init/{name}"]), name  # then trained
            np.testing.assert_array_equal(ranks[0][f"param/{name}"], ranks[1][f"param/{name}"], err_msg=name)
            np.testing.assert_allclose(ranks[0][f"param/{name}"], reference[f"param/{name}"], rtol=1e-6, atol=1e-9,
                                       err_msg=f"{setting}: {name}")
