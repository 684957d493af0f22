"""Training checkpoints: exact resume, atomicity under a crash and a real SIGKILL, retention,
pointers, mismatch messages, RNG restore, and JSON/safetensors only."""
from __future__ import annotations

import importlib.metadata
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from ernievil2.models import build_model
from ernievil2.models.config import model_config
from ernievil2.train import checkpoint_manager, rng_state, training_checkpoint
from ernievil2.train.checkpoint_manager import CheckpointManager
from ernievil2.train.config import OptimSchema
from ernievil2.train.optim import build_optimizer
from ernievil2.train.training_checkpoint import (
    METRICS,
    OPTIMIZER_STATE,
    TRAINER_STATE,
    TrainingState,
    load_training_checkpoint,
    read_trainer_state,
    save_training_checkpoint,
)
from ernievil2.weights.layouts import MODEL_CONFIG, WEIGHTS
from ernievil2.weights.load import CheckpointMismatchError, load_model

REPO_ROOT = Path(__file__).resolve().parents[1]
OPTIM = OptimSchema(lr=1e-3, warmup_steps=2, weight_decay=0.1, grad_clip=1.0)
TOTAL_STEPS = 10
BATCH = 4


def tiny_config(text_layers: int = 1, vision_mlp: int = 256):
    # Dropout on, so that the resumed steps depend on the restored Paddle generator too.
    return model_config("tiny", vision={"layers": 1, "mlp_dim": vision_mlp},
                        text={"layers": text_layers, "vocab_size": 64, "dropout": 0.1, "attention_dropout": 0.1})


def build(cfg=None):
    model = build_model(cfg or tiny_config())
    model.train()
    optimizer, scheduler = build_optimizer(model, OPTIM, TOTAL_STEPS)
    return model, optimizer, scheduler


def train_steps(model, optimizer, scheduler, n: int) -> list[float]:
    """``n`` CLIP-loss steps on batches drawn from NumPy's and Python's global generators."""
    losses = []
    for _ in range(n):
        pixels = np.random.rand(BATCH, 3, 64, 64).astype("float32") + random.random()
        ids = np.random.randint(4, 64, size=(BATCH, 8)).astype("int64")
        image, text, scale = model(paddle.to_tensor(pixels), paddle.to_tensor(ids))
        logits = scale * image @ text.T
        labels = paddle.arange(BATCH)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        scheduler.step()
        losses.append(float(loss))
    return losses


def snapshot(model) -> dict[str, np.ndarray]:
    return {k: v.numpy().copy() for k, v in model.state_dict().items()}


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    paddle.seed(seed)


STATE = TrainingState(step=3, samples_seen=12, data_state={"epoch": 0, "batches_in_epoch": 3},
                      extra={"nan_streak": 0, "wandb_run_id": "abc"})


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint of the tiny model after 3 AdamW steps."""
    seed_all(0)
    model, optimizer, scheduler = build()
    train_steps(model, optimizer, scheduler, 3)
    folder = tmp_path_factory.mktemp("ckpt")
    vocab = folder / "vocab.txt"
    vocab.write_text("[PAD]\n[CLS]\n[SEP]\n", encoding="utf-8")
    return save_training_checkpoint(folder / "step_0000003", model=model, optimizer=optimizer, scheduler=scheduler,
                                    state=STATE, config={"model": {"preset": "tiny"}, "optim": {"lr": OPTIM.lr}},
                                    files={"vocab.txt": vocab})


def test_resume_reproduces_losses_and_parameters_bit_for_bit(tmp_path):
    seed_all(7)
    model, optimizer, scheduler = build()
    train_steps(model, optimizer, scheduler, 3)
    ckpt = save_training_checkpoint(tmp_path / "ckpt", model=model, optimizer=optimizer, scheduler=scheduler,
                                    state=STATE)
    expected_losses = train_steps(model, optimizer, scheduler, 3)
    expected = snapshot(model)

    seed_all(123)  # a new process would start from other generator states
    resumed, optimizer2, scheduler2 = build()
    # Paddle's generated names differ for the second model: the optimizer state must not rely on them.
    assert {p.name for p in resumed.parameters()}.isdisjoint(p.name for p in model.parameters())
    state = load_training_checkpoint(ckpt, model=resumed, optimizer=optimizer2, scheduler=scheduler2)
    assert state == STATE
    assert scheduler2.last_epoch == 3
    losses = train_steps(resumed, optimizer2, scheduler2, 3)

    assert losses == expected_losses
    got = snapshot(resumed)
    assert got.keys() == expected.keys()
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)

    # And in another process, as after a kill.
    script = (
        "import json, sys\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "from safetensors.numpy import save_file\n"
        "from test_checkpointing import build, snapshot, train_steps\n"
        "from ernievil2.train.training_checkpoint import load_training_checkpoint\n"
        "model, optimizer, scheduler = build()\n"
        "load_training_checkpoint(sys.argv[2], model=model, optimizer=optimizer, scheduler=scheduler)\n"
        "print(json.dumps(train_steps(model, optimizer, scheduler, 3)))\n"
        "save_file(snapshot(model), sys.argv[3])\n"
    )
    out = tmp_path / "params.safetensors"
    proc = subprocess.run([sys.executable, "-c", script, str(Path(__file__).parent), str(ckpt), str(out)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == expected_losses
    other_process = load_file(str(out))
    assert other_process.keys() == expected.keys()
    for key in expected:
        np.testing.assert_array_equal(other_process[key], expected[key], err_msg=key)


def test_optimizer_state_is_keyed_by_structured_parameter_names(trained_checkpoint):
    model = build_model(tiny_config())
    with safe_open(str(trained_checkpoint / OPTIMIZER_STATE), framework="numpy") as f:
        keys = set(f.keys())
        moment = f.get_tensor("vision.blocks.0.fc1.weight@moment1")
        beta_pow = f.get_tensor("temperature@beta2_pow_acc")
    kinds = {"moment1", "moment2", "beta1_pow_acc", "beta2_pow_acc"}
    assert keys == {f"{name}@{kind}" for name, _ in model.named_parameters() for kind in kinds}
    assert moment.shape == (64, 256) and np.abs(moment).max() > 0
    # Paddle starts beta2_pow_acc at beta2 and multiplies it by beta2 after each step: beta2^4 after 3.
    np.testing.assert_allclose(beta_pow, [OPTIM.beta2 ** 4], rtol=1e-6)


def test_master_weights_and_their_moments_get_structured_keys():
    # O2 mixed precision: AdamW(multi_precision) keeps fp32 master weights and their moments under
    # generated names like linear_0.w_0_fp32_master_0_moment1_0. Paddle has no bf16 AdamW kernel on
    # CPU, so this checks the naming (what makes a resume work across processes) without a step.
    keys = []
    for _ in range(2):  # the second layer gets other generated names, and must get the same keys
        layer = paddle.nn.Linear(4, 3)
        layer.to(dtype="bfloat16")
        optimizer = paddle.optimizer.AdamW(parameters=layer.parameters(), multi_precision=True)
        training_checkpoint._materialise_accumulators(optimizer, list(layer.parameters()))
        tensors, other = training_checkpoint._optimizer_entries(optimizer, layer)
        keys.append(sorted(tensors))
        np.testing.assert_array_equal(tensors["weight@master_weight"].numpy(), layer.weight.astype("float32").numpy())
        assert other == {}
    kinds = ["fp32_master_beta1_pow_acc", "fp32_master_beta2_pow_acc", "fp32_master_moment1", "fp32_master_moment2",
             "master_weight"]
    assert keys[0] == keys[1] == sorted(f"{p}@{k}" for p in ("weight", "bias") for k in kinds)


def test_checkpoint_is_readable_by_weights_only_loader(trained_checkpoint):
    model = load_model(trained_checkpoint).model
    seed_all(0)
    reference, optimizer, scheduler = build()
    train_steps(reference, optimizer, scheduler, 3)
    for key, value in snapshot(reference).items():
        np.testing.assert_array_equal(model.state_dict()[key].numpy(), value, err_msg=key)
    assert (trained_checkpoint / "vocab.txt").read_text(encoding="utf-8") == "[PAD]\n[CLS]\n[SEP]\n"


def test_trainer_state_records_config_version_and_progress(trained_checkpoint):
    saved = read_trainer_state(trained_checkpoint)
    assert saved["config"] == {"model": {"preset": "tiny"}, "optim": {"lr": OPTIM.lr}}
    assert (saved["step"], saved["samples_seen"]) == (3, 12)
    assert saved["scheduler"]["last_epoch"] == 3
    assert saved["optimizer"]["LR_Scheduler"] == saved["scheduler"]
    assert saved["code_version"]["package"] == importlib.metadata.version("ernievil2")
    if shutil.which("git") and (REPO_ROOT / ".git").exists():
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        assert saved["code_version"]["git"].startswith(head)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", saved["created"])


def test_only_safetensors_and_json_no_pickle(trained_checkpoint):
    names = sorted(p.name for p in trained_checkpoint.iterdir())
    assert names == sorted([WEIGHTS, MODEL_CONFIG, OPTIMIZER_STATE, TRAINER_STATE, "vocab.txt"])
    for path in trained_checkpoint.iterdir():
        assert not path.read_bytes().startswith(b"\x80"), f"{path.name} looks like a pickle"
        if path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
    for module in (training_checkpoint, checkpoint_manager, rng_state):
        source = Path(module.__file__).read_text(encoding="utf-8")
        assert not re.search(r"import pickle|from pickle|paddle\.(save|load)\(|np\.load\(", source), module.__name__


def test_other_architecture_fails_naming_first_differing_key_and_changes_nothing(trained_checkpoint):
    cases = [
        (tiny_config(text_layers=2), "first differing key 'text.blocks.1.attn.k.bias': checkpoint absent, model shape [64]"),
        (tiny_config(vision_mlp=128),
         "first differing key 'vision.blocks.0.fc1.bias': checkpoint shape [256], model shape [128]"),
    ]
    for cfg, message in cases:
        model, optimizer, scheduler = build(cfg)
        before = snapshot(model)
        with pytest.raises(CheckpointMismatchError) as err:
            load_training_checkpoint(trained_checkpoint, model=model, optimizer=optimizer, scheduler=scheduler)
        assert message in str(err.value)
        assert str(trained_checkpoint / WEIGHTS) in str(err.value)
        assert optimizer.state_dict() == {"LR_Scheduler": {"last_epoch": 0, "last_lr": scheduler.last_lr, "elapsed_s": 0.0}}
        assert scheduler.last_epoch == 0
        for key, value in snapshot(model).items():
            np.testing.assert_array_equal(value, before[key])


def test_optimizer_of_another_kind_fails_naming_first_differing_key(tmp_path):
    seed_all(1)
    model = build_model(tiny_config())
    momentum = paddle.optimizer.Momentum(learning_rate=0.1, parameters=model.parameters())
    image, text, scale = model(paddle.rand([2, 3, 64, 64]), paddle.randint(4, 64, [2, 8]))
    (scale * (image @ text.T)).mean().backward()
    momentum.step()
    ckpt = save_training_checkpoint(tmp_path / "ckpt", model=model, optimizer=momentum, scheduler=None,
                                    state=TrainingState(1, 2))
    target, adamw, scheduler = build()
    before = snapshot(target)
    with pytest.raises(CheckpointMismatchError,
                       match=r"first differing key 'temperature@beta1_pow_acc': checkpoint absent, optimizer shape \[1\]"):
        load_training_checkpoint(ckpt, model=target, optimizer=adamw, scheduler=scheduler)
    for key, value in snapshot(target).items():
        np.testing.assert_array_equal(value, before[key])


def draws() -> tuple:
    return random.random(), np.random.rand(3).tolist(), paddle.rand([3]).numpy().tolist()


def test_rng_states_are_restored(tmp_path):
    model, optimizer, scheduler = build()
    seed_all(1)
    draws()
    ckpt = save_training_checkpoint(tmp_path / "ckpt", model=model, optimizer=optimizer, scheduler=scheduler,
                                    state=TrainingState(0, 0))
    after_save = draws()
    seed_all(2)
    load_training_checkpoint(ckpt, model=model)
    assert draws() == after_save

    seed_all(2)
    from_seed_2 = draws()
    seed_all(2)
    load_training_checkpoint(ckpt, model=model, restore_rng=False)
    assert draws() == from_seed_2


class ScalerStandIn:
    """The state a dynamic-loss-scaling GradScaler reports (GradScaler turns itself off on CPU)."""

    def __init__(self, scale: float, incr_count: int):
        self.state = {"scale": np.array([scale], dtype=np.float32), "incr_ratio": 2.0, "decr_ratio": 0.5,
                      "incr_every_n_steps": 1000, "decr_every_n_nan_or_inf": 2, "incr_count": incr_count,
                      "decr_count": 0, "use_dynamic_loss_scaling": True}

    def state_dict(self) -> dict:
        return dict(self.state)

    def load_state_dict(self, state: dict) -> None:
        self.state = dict(state)


def test_loss_scaler_state_round_trips(tmp_path):
    model, optimizer, scheduler = build()
    ckpt = save_training_checkpoint(tmp_path / "ckpt", model=model, optimizer=optimizer, scheduler=scheduler,
                                    scaler=ScalerStandIn(32768.0, 17), state=TrainingState(0, 0))
    restored = ScalerStandIn(65536.0, 0)
    load_training_checkpoint(ckpt, model=model, scaler=restored)
    expected = ScalerStandIn(32768.0, 17).state
    assert restored.state.keys() == expected.keys()
    assert restored.state["scale"].dtype == np.float32
    np.testing.assert_array_equal(restored.state["scale"], expected["scale"])
    assert {k: v for k, v in restored.state.items() if k != "scale"} == {k: v for k, v in expected.items() if k != "scale"}

    # A disabled GradScaler (fp32, or any CPU run) saves {} and loads it back without complaint.
    disabled = paddle.amp.GradScaler(enable=False)
    ckpt2 = save_training_checkpoint(tmp_path / "ckpt2", model=model, optimizer=optimizer, scheduler=scheduler,
                                     scaler=disabled, state=TrainingState(0, 0))
    assert read_trainer_state(ckpt2)["scaler"] == {}
    load_training_checkpoint(ckpt2, model=model, scaler=paddle.amp.GradScaler(enable=False))


def test_non_json_state_fails_before_anything_is_written(tmp_path):
    model, optimizer, scheduler = build()
    with pytest.raises(TypeError, match=r"data_state\.epoch: a object is not JSON-serialisable"):
        save_training_checkpoint(tmp_path / "ckpt", model=model, optimizer=optimizer, scheduler=scheduler,
                                 state=TrainingState(1, 4, data_state={"epoch": object()}))
    assert list(tmp_path.iterdir()) == []


def test_without_optimizer_state_the_rest_round_trips(tmp_path):
    """Sharded optimizer state (trainer.sharding_stage >= 1): rank 0 saves no optimizer file; a
    resume restores the weights and the schedule, and asking for the moments names what is missing."""
    model, optimizer, scheduler = build()
    train_steps(model, optimizer, scheduler, 2)
    ckpt = save_training_checkpoint(tmp_path / "ckpt", model=model, optimizer=None, scheduler=scheduler, state=STATE)
    assert not (ckpt / OPTIMIZER_STATE).exists()
    resumed, optimizer2, scheduler2 = build()
    assert load_training_checkpoint(ckpt, model=resumed, scheduler=scheduler2).step == STATE.step
    assert all(np.array_equal(v, snapshot(resumed)[k]) for k, v in snapshot(model).items())
    assert scheduler2.last_epoch == scheduler.last_epoch
    with pytest.raises(FileNotFoundError, match="no optimizer.safetensors"):
        load_training_checkpoint(ckpt, model=resumed, optimizer=optimizer2, scheduler=scheduler2)


def test_weights_only_folder_is_refused_with_a_hint(tmp_path):
    from ernievil2.weights.save import save_checkpoint

    model = build_model(tiny_config())
    folder = save_checkpoint(model, tmp_path / "weights")
    with pytest.raises(FileNotFoundError, match="model weights only.*model.init_from"):
        load_training_checkpoint(folder, model=model)


# --------------------------------------------------------------------------- CheckpointManager


def fake_save(folder: Path) -> None:
    """A stand-in for write_training_checkpoint: the manager only needs a finished folder."""
    (folder / WEIGHTS).write_bytes(b"weights")
    (folder / TRAINER_STATE).write_text("{}", encoding="utf-8")


def steps_on_disk(root: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in root.iterdir() if p.name.startswith("step_"))


@pytest.mark.parametrize("mode, best_step, kept", [("max", 2, [2, 5, 6]), ("min", 1, [1, 5, 6])])
def test_keeps_last_k_and_the_best(tmp_path, mode, best_step, kept):
    manager = CheckpointManager(tmp_path, keep_last=2, best_metric="demo_val/multi/mean_recall", best_mode=mode)
    recall = {1: 0.1, 2: 0.5, 3: 0.3, 4: 0.2, 5: 0.25}
    for step, value in recall.items():
        manager.save(step, fake_save, metrics={"demo_val/multi/mean_recall": value, "step": step})
    manager.save(6, fake_save)  # no evaluation this time: it cannot become the best
    assert steps_on_disk(tmp_path) == kept
    assert manager.latest() == manager.step_dir(6)
    assert manager.best() == manager.step_dir(best_step)
    assert (tmp_path / "best").read_text(encoding="utf-8") == f"step_{best_step:07d}\n"
    assert json.loads((manager.best() / METRICS).read_text())["demo_val/multi/mean_recall"] == recall[best_step]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_crash_inside_save_leaves_previous_checkpoint_and_pointer(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=1)
    manager.save(1, fake_save)
    pointer = (tmp_path / "latest").read_text(encoding="utf-8")

    def crashing(folder: Path) -> None:
        (folder / WEIGHTS).write_bytes(b"half written")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        manager.save(2, crashing)
    with pytest.raises(RuntimeError, match="no complete checkpoint for step 3"):
        manager.save(3, lambda folder: None)
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_0000001"]
    assert (tmp_path / "latest").read_text(encoding="utf-8") == pointer == "step_0000001\n"
    assert manager.latest() == manager.step_dir(1)


def test_sigkill_during_save_leaves_previous_checkpoint(tmp_path):
    CheckpointManager(tmp_path).save(1, fake_save)
    script = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from ernievil2.train.checkpoint_manager import CheckpointManager\n"
        "from ernievil2.train.training_checkpoint import TRAINER_STATE\n"
        "from ernievil2.weights.layouts import WEIGHTS\n"
        "def dying(folder):\n"
        "    (folder / WEIGHTS).write_bytes(b'new')\n"
        "    (folder / TRAINER_STATE).write_text('{}')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "CheckpointManager(Path(sys.argv[1])).save(2, dying)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, timeout=120, check=False)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    manager = CheckpointManager(tmp_path)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".step_0000002.")]
    assert len(leftovers) == 1  # the killed save's temporary folder, invisible to readers
    assert manager.checkpoints() == [manager.step_dir(1)]
    assert manager.latest() == manager.step_dir(1)
    manager.save(2, fake_save)  # the next save clears what the killed one left
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_0000001", "step_0000002"]


def test_latest_falls_back_when_pointer_is_missing_or_stale(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=5)
    for step in (1, 2, 3):
        manager.save(step, fake_save)
    (tmp_path / "latest").unlink()
    assert manager.latest() == manager.step_dir(3)
    incomplete = manager.step_dir(9)
    incomplete.mkdir()
    (incomplete / WEIGHTS).write_bytes(b"weights without trainer state")
    (tmp_path / "latest").write_text("step_0000009\n", encoding="utf-8")
    assert manager.latest() == manager.step_dir(3)
    assert manager.checkpoints() == [manager.step_dir(s) for s in (1, 2, 3)]
    (tmp_path / "latest").write_text("step_0000002\n", encoding="utf-8")
    assert manager.latest() == manager.step_dir(2)


def test_resume_from_earlier_checkpoint_keeps_new_saves(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (2, 4, 6):
        manager.save(step, fake_save)
    manager.save(3, fake_save)  # a run resumed from step 2 writes step 3: it must survive retention
    assert steps_on_disk(tmp_path) == [3, 4, 6]
    assert manager.latest() == manager.step_dir(3)


def test_resolve(tmp_path):
    run_dir = tmp_path / "run"
    manager = CheckpointManager(run_dir / "checkpoints", keep_last=5)
    with pytest.raises(FileNotFoundError, match="resume=latest: no complete checkpoint"):
        manager.resolve("latest")
    for step in (1, 2):
        manager.save(step, fake_save)
    assert manager.resolve("latest") == manager.step_dir(2)
    assert manager.resolve(str(run_dir)) == manager.step_dir(2)
    assert manager.resolve(run_dir / "checkpoints") == manager.step_dir(2)
    assert manager.resolve(manager.step_dir(1)) == manager.step_dir(1)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        manager.resolve(tmp_path / "nowhere")


def test_manager_rejects_bad_settings(tmp_path):
    with pytest.raises(ValueError, match="keep_last must be >= 1"):
        CheckpointManager(tmp_path, keep_last=0)
    with pytest.raises(ValueError, match="best_mode must be 'max' or 'min'"):
        CheckpointManager(tmp_path, best_mode="highest")


def test_half_precision_weights_are_saved_as_float32_and_load_back(tmp_path):
    """AMP O2 keeps weights in bf16: the weights file holds float32 (readable by any loader), and
    loading casts back to the model's dtype."""
    from safetensors.numpy import load_file

    from ernievil2.models import build_model
    from ernievil2.models.config import model_config
    from ernievil2.weights.layouts import WEIGHTS
    from ernievil2.weights.load import load_weights
    from ernievil2.weights.save import save_checkpoint

    cfg = model_config("tiny", text={"vocab_size": 64})
    model = build_model(cfg)
    model.to(dtype="bfloat16")
    assert model.vision.blocks[0].fc1.weight.dtype == paddle.bfloat16
    save_checkpoint(model, tmp_path / "ckpt")
    arrays = load_file(str(tmp_path / "ckpt" / WEIGHTS))
    assert {a.dtype for a in arrays.values()} == {np.dtype("float32")}
    want = {k: v.astype("float32").numpy() for k, v in model.state_dict().items()}
    for k, a in arrays.items():
        np.testing.assert_array_equal(a, want[k], err_msg=k)
    other = build_model(cfg)
    other.to(dtype="bfloat16")
    load_weights(other, tmp_path / "ckpt" / WEIGHTS)
    for k, v in other.state_dict().items():
        assert v.dtype == paddle.bfloat16, k
        np.testing.assert_array_equal(v.astype("float32").numpy(), want[k], err_msg=k)
