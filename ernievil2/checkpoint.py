"""Model weights as safetensors, written atomically (temporary folder, fsync, rename)."""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import paddle
from safetensors.numpy import load_file, save_file

from ernievil2.atomic import atomic_dir
from ernievil2.models import ErnieViL2, build_model
from ernievil2.models.config import DualEncoderConfig, TextConfig, VisionConfig

WEIGHTS = "model.safetensors"
MODEL_CONFIG = "model_config.json"


def state_to_numpy(model: paddle.nn.Layer) -> dict[str, np.ndarray]:
    """The model's state as NumPy arrays; half-precision tensors (AMP O2 weights) widened to float32,
    so a weights file always holds plain floats whatever precision trained it."""
    return {k: np.ascontiguousarray((v.astype("float32") if v.dtype in (paddle.bfloat16, paddle.float16) else v).numpy())
            for k, v in model.state_dict().items()}


def as_param_tensor(value: np.ndarray, target: paddle.Tensor) -> paddle.Tensor:
    """``value`` as a tensor of ``target``'s dtype (e.g. float32 weights into a bf16 AMP O2 model)."""
    if value.dtype == np.uint16:
        # paddle.save stores bfloat16 tensors as uint16 bit patterns (no parameter here is uint16):
        # widen them to float32 exactly, then cast to the parameter's dtype.
        value = (value.astype(np.uint32) << 16).view(np.float32)
    tensor = paddle.to_tensor(np.ascontiguousarray(value))
    return tensor if tensor.dtype == target.dtype else tensor.astype(target.dtype)


def write_model_files(model: ErnieViL2, folder: Path, files: dict[str, Any] | None = None) -> None:
    """Write ``model.safetensors`` + ``model_config.json`` (+ ``files``: name → JSON-able or Path to copy)
    into the existing ``folder`` (not atomic by itself: ``folder`` is an :func:`atomic_dir`'s)."""
    save_file(state_to_numpy(model), str(folder / WEIGHTS))
    (folder / MODEL_CONFIG).write_text(json.dumps(asdict(model.cfg), indent=2), encoding="utf-8")
    for name, content in (files or {}).items():
        if isinstance(content, Path):
            shutil.copyfile(content, folder / name)
        else:
            (folder / name).write_text(json.dumps(content, indent=2, default=str), encoding="utf-8")


def save_checkpoint(model: ErnieViL2, out_dir: str | os.PathLike, files: dict[str, Any] | None = None) -> Path:
    """Write the model files (:func:`write_model_files`) into ``out_dir`` atomically: a kill at any
    moment leaves either the old folder or the new one."""
    with atomic_dir(out_dir) as tmp:
        write_model_files(model, tmp, files)
    return Path(out_dir)


def config_from_dict(d: dict) -> DualEncoderConfig:
    return DualEncoderConfig(
        vision=VisionConfig(**d["vision"]), text=TextConfig(**d["text"]),
        init_temperature=d["init_temperature"], attention=d["attention"],
    )


def load_weights(model: ErnieViL2, weights_file: str | os.PathLike) -> None:
    """Load a safetensors state into ``model`` strictly: every missing/unexpected key and shape
    mismatch is named."""
    state = load_file(str(weights_file))
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise KeyError(f"{weights_file}: missing keys {missing}, unexpected keys {unexpected}")
    for k, v in own.items():
        if list(v.shape) != list(state[k].shape):
            raise ValueError(f"{weights_file}: shape mismatch for {k}: checkpoint {list(state[k].shape)}, model {list(v.shape)}")
    model.set_state_dict({k: as_param_tensor(v, own[k]) for k, v in state.items()})


def load_checkpoint(ckpt_dir: str | os.PathLike) -> ErnieViL2:
    """Build the model described by ``model_config.json`` and load its weights."""
    ckpt = Path(ckpt_dir)
    cfg = config_from_dict(json.loads((ckpt / MODEL_CONFIG).read_text(encoding="utf-8")))
    model = build_model(cfg)
    load_weights(model, ckpt / WEIGHTS)
    return model
