"""Training checkpoints that survive a kill: everything a run needs to continue exactly.

A checkpoint is one folder, written atomically (:func:`ernievil2.atomic.atomic_dir`: a temporary
folder, fsync, rename), so a kill at any moment leaves the previous checkpoint intact:

- ``model.safetensors`` + ``model_config.json`` (+ extra files such as ``vocab.txt``), written by
  :func:`ernievil2.weights.save.write_model_files` as for any checkpoint of ours:
  :func:`ernievil2.weights.load.load_model`, ``model.init_from`` and inference read a training
  checkpoint like any other, and resuming loads its weights through the same entry point;
- ``optimizer.safetensors``: every tensor of ``optimizer.state_dict()``, keyed
  ``<parameter>@<accumulator>`` with the parameter's structured name
  (``vision.blocks.0.fc1.weight@moment1``) rather than Paddle's generated one
  (``linear_3.w_0_moment1_0``), which depends on how many layers the process built before the
  model; master weights (O2 mixed precision) are ``<parameter>@master_weight``; absent when the
  optimizer state is sharded over the ranks (``trainer.sharding_stage`` >= 1: rank 0 holds a share);
- ``trainer_state.json``, written last: step, samples seen, data-stream state, ``extra``, the LR
  scheduler, the optimizer's other entries, the loss scaler, the RNG states (Python, NumPy, Paddle
  CPU and CUDA), the resolved config, the code version and the creation time.

Only safetensors and JSON: nothing is pickled. The folders of a run (``step_NNNNNNN``, the
``latest`` and ``best`` pointers, retention) are :mod:`ernievil2.train.checkpoint_manager`'s; the
RNG states' JSON is :mod:`ernievil2.train.rng_state`'s.
"""
from __future__ import annotations

import functools
import importlib.metadata
import json
import logging
import os
import re
import subprocess
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import paddle
from safetensors.numpy import load_file, save_file

from ernievil2.atomic import atomic_dir
from ernievil2.models import ErnieViL2
from ernievil2.train.parallel import unwrap
from ernievil2.train.rng_state import capture_rng_state, rng_restorer
from ernievil2.weights.layouts import MODEL_CONFIG, WEIGHTS
from ernievil2.weights.load import CheckpointMismatchError, check_state, first_difference, load_state_into, read_state
from ernievil2.weights.save import write_model_files

log = logging.getLogger("ernievil2")

OPTIMIZER_STATE = "optimizer.safetensors"
TRAINER_STATE = "trainer_state.json"
METRICS = "metrics.json"
FORMAT_VERSION = 1
RESERVED_FILES = {WEIGHTS, MODEL_CONFIG, OPTIMIZER_STATE, TRAINER_STATE, METRICS}

_KEY_SEP = "@"
_MASTER_WEIGHT = "master_weight"
_LR_ENTRY = "LR_Scheduler"


@dataclass
class TrainingState:
    """Where a run stands, beside the model/optimizer/scheduler/scaler states (JSON-able values)."""

    step: int
    samples_seen: int
    data_state: dict = field(default_factory=dict)  # e.g. {"epoch": 3, "batches_in_epoch": 17}
    extra: dict = field(default_factory=dict)  # e.g. {"wandb_run_id": "...", "nan_streak": 0}


# --------------------------------------------------------------------------- JSON and versions


def jsonable(value: Any, where: str) -> Any:
    """``value`` with NumPy/Paddle scalars and arrays as plain numbers and lists; anything that JSON
    cannot hold raises, naming ``where``."""
    if isinstance(value, paddle.Tensor):
        value = value.numpy()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise TypeError(f"{where}: key {bad[0]!r} is not a string (checkpoints hold JSON)")
        return {k: jsonable(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise TypeError(f"{where}: a {type(value).__name__} is not JSON-serialisable (checkpoints hold JSON and "
                    "safetensors only)")


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, str | None]:
    """The installed package version and ``git describe --always --dirty`` of the package's folder
    (None where unavailable: not a git checkout, or no git)."""
    try:
        package = importlib.metadata.version("ernievil2")
    except importlib.metadata.PackageNotFoundError:
        package = None
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--tags", "--abbrev=40"],
                             cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=20, check=False)
        git = out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        git = None
    return {"package": package, "git": git}


# --------------------------------------------------------------------------- optimizer state


def _accumulator_kind(var_name: str, owner: str) -> str:
    """``linear_3.w_0_moment1_0`` owned by ``linear_3.w_0`` → ``moment1``: the counters Paddle's
    unique-name generator appends (``_0``, also inside ``fp32_master_0_moment1_0``) are dropped."""
    return re.sub(r"_\d+(?=_|$)", "", var_name[len(owner) + 1:])


def _optimizer_entries(optimizer: paddle.optimizer.Optimizer, model: paddle.nn.Layer
                       ) -> tuple[dict[str, paddle.Tensor], dict[str, Any]]:
    """``optimizer.state_dict()`` split into its tensors, keyed ``<structured name>@<kind>`` (the live
    tensors: setting their values sets the optimizer's state), and its other entries."""
    structured = {p.name: name for name, p in unwrap(model).named_parameters()}
    by_length = sorted(structured, key=len, reverse=True)  # the longest generated name that prefixes wins
    tensors: dict[str, paddle.Tensor] = {}
    other: dict[str, Any] = {}
    for var_name, value in optimizer.state_dict().items():
        if var_name == "master_weights":
            pairs = [(f"{structured.get(auto)}{_KEY_SEP}{_MASTER_WEIGHT}", auto, t) for auto, t in value.items()]
        elif isinstance(value, paddle.Tensor):
            owner = next((auto for auto in by_length if var_name.startswith(auto + "_")), None)
            if owner is None:
                raise CheckpointMismatchError(f"optimizer state {var_name!r} belongs to no parameter of the model")
            pairs = [(f"{structured[owner]}{_KEY_SEP}{_accumulator_kind(var_name, owner)}", owner, value)]
        else:
            other[var_name] = value
            continue
        for key, auto, tensor in pairs:
            if auto not in structured:
                raise CheckpointMismatchError(f"optimizer master weight of {auto!r}: no such parameter in the model")
            if key in tensors:
                raise ValueError(f"two optimizer states map to {key!r} (one of them {var_name!r})")
            tensors[key] = tensor
    return tensors, other


def _materialise_accumulators(optimizer: paddle.optimizer.Optimizer, params: list[paddle.Tensor]) -> None:
    """Create the optimizer's accumulators of ``params`` now (initialised as its first ``step()``
    would) so that saved values have tensors to go into. Paddle has no public call for it: this is the call
    ``step()`` makes, which skips parameters already set up."""
    if params:
        optimizer._create_accumulators(paddle.static.default_main_program().global_block(), params)


# --------------------------------------------------------------------------- one checkpoint


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    """True for a folder holding a finished training checkpoint (weights + ``trainer_state.json``)."""
    path = Path(path)
    return (path / TRAINER_STATE).is_file() and (path / WEIGHTS).is_file()


def _check_same_keys(saved: dict[str, list[int]], live: dict[str, list[int]], where: str, what: str) -> None:
    """Raise :class:`CheckpointMismatchError` naming the first key (sorted) whose shape differs or
    that only one side has (the message of :func:`ernievil2.weights.load.first_difference`)."""
    difference = first_difference(saved, live, what)
    if difference:
        raise CheckpointMismatchError(f"{where}: the checkpoint does not match the {what}: {difference}")


def write_training_checkpoint(
    folder: str | os.PathLike, *, model: ErnieViL2, optimizer: paddle.optimizer.Optimizer | None,
    scheduler: paddle.optimizer.lr.LRScheduler | None, scaler: paddle.amp.GradScaler | None = None,
    state: TrainingState, config: dict | None = None, files: dict[str, Any] | None = None,
) -> None:
    """Fill the existing empty ``folder`` with a training checkpoint (layout: module docstring). Not
    atomic by itself: use :func:`save_training_checkpoint`, or pass it to
    :meth:`ernievil2.train.checkpoint_manager.CheckpointManager.save`."""
    folder = Path(folder)
    clashes = sorted(RESERVED_FILES & set(files or {}))
    if clashes:
        raise ValueError(f"checkpoint files {clashes} would overwrite the checkpoint's own files")
    for name in ("step", "samples_seen"):
        value = getattr(state, name)
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"TrainingState.{name} must be an int >= 0, got {value!r}")
    model = unwrap(model)
    tensors, other = _optimizer_entries(optimizer, model) if optimizer is not None else ({}, {})
    # Everything JSON is built before the first file is written: a bad value fails with nothing on disk.
    trainer_state = {
        "format": FORMAT_VERSION,
        "step": state.step,
        "samples_seen": state.samples_seen,
        "data_state": jsonable(state.data_state, "data_state"),
        "extra": jsonable(state.extra, "extra"),
        "scheduler": None if scheduler is None else jsonable(scheduler.state_dict(), "scheduler"),
        "optimizer": jsonable(other, "optimizer"),
        "scaler": None if scaler is None else jsonable(scaler.state_dict(), "scaler"),
        "rng": capture_rng_state(),
        "config": jsonable(config, "config"),
        "code_version": code_version(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    text = json.dumps(trainer_state, indent=1)
    write_model_files(model, folder, files)
    if optimizer is not None:
        save_file({k: np.ascontiguousarray(t.numpy()) for k, t in tensors.items()}, str(folder / OPTIMIZER_STATE))
    (folder / TRAINER_STATE).write_text(text, encoding="utf-8")  # last: its presence marks a finished folder


def save_training_checkpoint(
    out_dir: str | os.PathLike, *, model: ErnieViL2, optimizer: paddle.optimizer.Optimizer | None,
    scheduler: paddle.optimizer.lr.LRScheduler | None, scaler: paddle.amp.GradScaler | None = None,
    state: TrainingState, config: dict | None = None, files: dict[str, Any] | None = None,
) -> Path:
    """Write a training checkpoint (:func:`write_training_checkpoint`) into ``out_dir`` atomically: a
    kill at any moment leaves either the old folder or the complete new one."""
    with atomic_dir(out_dir) as tmp:
        write_training_checkpoint(tmp, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                                  state=state, config=config, files=files)
    return Path(out_dir)


def read_trainer_state(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``trainer_state.json`` of a checkpoint (config, code version, RNG, ...)."""
    path = Path(ckpt_dir) / TRAINER_STATE
    if not path.is_file():
        hint = (f" (it holds model weights only: start from them with model.init_from={ckpt_dir})"
                if (Path(ckpt_dir) / WEIGHTS).is_file() else "")
        raise FileNotFoundError(f"{ckpt_dir}: not a training checkpoint, no {TRAINER_STATE}{hint}")
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from err
    if saved.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {saved.get('format')!r}, this code reads {FORMAT_VERSION}")
    return saved


def load_training_checkpoint(
    ckpt_dir: str | os.PathLike, *, model: ErnieViL2, optimizer: paddle.optimizer.Optimizer | None = None,
    scheduler: paddle.optimizer.lr.LRScheduler | None = None, scaler: paddle.amp.GradScaler | None = None,
    restore_rng: bool = True,
) -> TrainingState:
    """Restore ``model`` (and whichever of ``optimizer``, ``scheduler``, ``scaler`` are given, and the
    RNG states) from a training checkpoint; returns the saved :class:`TrainingState`.

    Everything is read and checked before anything is set: a checkpoint of another architecture
    raises :class:`CheckpointMismatchError` naming the first differing key (sorted) and both shapes,
    and so does optimizer state that does not fit ``optimizer`` (the one thing done before that check
    is creating ``optimizer``'s not-yet-existing accumulators of the checkpoint's parameters)."""
    ckpt = Path(ckpt_dir)
    saved = read_trainer_state(ckpt)
    model = unwrap(model)
    source, weights, _ = read_state(ckpt)
    check_state(model, weights, str(source.weights))

    moments: dict[str, np.ndarray] = {}
    live_moments: dict[str, paddle.Tensor] = {}
    if optimizer is not None:
        if not (ckpt / OPTIMIZER_STATE).is_file():
            raise FileNotFoundError(f"{ckpt}: no {OPTIMIZER_STATE} to restore the optimizer from")
        moments = load_file(str(ckpt / OPTIMIZER_STATE))
        params = dict(model.named_parameters())
        owners = {key.rsplit(_KEY_SEP, 1)[0] for key in moments}
        unknown = sorted(owners - set(params))
        if unknown:
            key = min(k for k in moments if k.rsplit(_KEY_SEP, 1)[0] == unknown[0])
            raise CheckpointMismatchError(
                f"{ckpt / OPTIMIZER_STATE}: the checkpoint does not match the optimizer: first differing key "
                f"{key!r}: checkpoint shape {list(moments[key].shape)}, optimizer absent (no parameter {unknown[0]!r})")
        _materialise_accumulators(optimizer, [params[name] for name in sorted(owners)])
        live_moments, live_other = _optimizer_entries(optimizer, model)
        _check_same_keys({k: list(v.shape) for k, v in moments.items()},
                         {k: list(v.shape) for k, v in live_moments.items()}, str(ckpt / OPTIMIZER_STATE), "optimizer")
        if _LR_ENTRY in live_other and scheduler is None:
            raise ValueError(f"{ckpt}: the optimizer runs on an LR scheduler: pass scheduler= to restore it")
    if scheduler is not None and saved.get("scheduler") is None:
        raise ValueError(f"{ckpt / TRAINER_STATE}: no LR scheduler state saved, but a scheduler was given")
    restore = rng_restorer(saved.get("rng") or {}, str(ckpt / TRAINER_STATE)) if restore_rng else None

    load_state_into(model, weights, str(source.weights))
    for key, tensor in live_moments.items():
        tensor.set_value(moments[key])
    if scheduler is not None:
        scheduler.set_state_dict(saved["scheduler"])
    if scaler is not None:
        scaler_state = saved.get("scaler")
        if scaler_state:
            scaler.load_state_dict({k: np.asarray(v, dtype=np.float32) if k == "scale" else v
                                    for k, v in scaler_state.items()})
        elif scaler.state_dict():
            log.warning("%s: no loss-scaler state saved (an fp32 run?): the scaler starts afresh", ckpt)
    if restore is not None:
        restore()
    return TrainingState(step=saved["step"], samples_seen=saved["samples_seen"],
                         data_state=saved["data_state"], extra=saved["extra"])

