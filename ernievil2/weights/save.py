"""Writing weights: our layout (``model.safetensors`` + ``model_config.json``, atomically; training
checkpoints write their model files through :func:`write_model_files` too) and PaddleNLP's
``ErnieViLModel`` folder (:func:`export_paddlenlp`)."""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import numpy as np
import paddle
from safetensors.numpy import save_file

from ernievil2.atomic import atomic_dir
from ernievil2.models import ErnieViL2
from ernievil2.weights.configs import dual_encoder_config_to_paddlenlp
from ernievil2.weights.layouts import (
    MODEL_CONFIG,
    PADDLENLP_CONFIG,
    PADDLENLP_TEXT_LN_EPS,
    PADDLENLP_WEIGHTS,
    VOCAB,
    WEIGHTS,
    ours_to_paddlenlp,
    plain_vocab_text,
)

log = logging.getLogger(__name__)


def state_to_numpy(model: paddle.nn.Layer) -> dict[str, np.ndarray]:
    """The model's state as NumPy arrays; half-precision tensors (AMP O2 weights) widened to float32,
    so a weights file always holds plain floats whatever precision trained it."""
    return {k: np.ascontiguousarray((v.astype("float32") if v.dtype in (paddle.bfloat16, paddle.float16) else v).numpy())
            for k, v in model.state_dict().items()}


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


def export_paddlenlp(model: ErnieViL2, out_dir: str | os.PathLike, vocab_file: Optional[str | os.PathLike] = None) -> Path:
    """Write ``model`` as a PaddleNLP ``ErnieViLModel`` folder (``config.json`` +
    ``model_state.pdparams``; with ``vocab_file`` also ``vocab.txt`` (one token per line, as PaddleNLP
    reads it) + ``tokenizer_config.json`` for ``ErnieViLTokenizer``) atomically: the folder appears
    complete or not at all.

    PaddleNLP runs its text LayerNorms with eps 1e-12 whatever the config says; a model whose
    ``text.ln_eps`` differs gives slightly different text embeddings there (logged).
    """
    cfg = model.cfg
    out = Path(out_dir).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    state = ours_to_paddlenlp(state_to_numpy(model), cfg)
    if cfg.text.ln_eps != PADDLENLP_TEXT_LN_EPS:
        log.warning(
            "PaddleNLP's ErnieModel runs every text LayerNorm with eps %g regardless of config.json; this "
            "model uses %g, so PaddleNLP's text embeddings will differ slightly from ours", PADDLENLP_TEXT_LN_EPS,
            cfg.text.ln_eps,
        )
    with atomic_dir(out) as tmp:
        paddle.save({k: paddle.to_tensor(v) for k, v in state.items()}, str(tmp / PADDLENLP_WEIGHTS))
        (tmp / PADDLENLP_CONFIG).write_text(json.dumps(dual_encoder_config_to_paddlenlp(cfg), indent=2), encoding="utf-8")
        if vocab_file is not None:
            (tmp / VOCAB).write_text(plain_vocab_text(vocab_file), encoding="utf-8")
            (tmp / "tokenizer_config.json").write_text(
                json.dumps({"tokenizer_class": "ErnieViLTokenizer", "do_lower_case": True,
                            "model_max_length": cfg.text.max_positions}, indent=2),
                encoding="utf-8",
            )
    return out
