"""The model and tokenizer of inference and export, built from the settings of ``conf/infer.yaml``.

:func:`build_inference_model` takes the composed ``DictConfig`` or any object with the same
attributes (``model``, ``vocab_file``, ``text_max_length``, ``seed``; e.g. an
``ernievil2.train.infer_config.InferSchema``): it reads them by attribute and imports no Hydra.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np
from omegaconf import DictConfig

from ernievil2.inference.errors import InferError
from ernievil2.models.schema import resolve_model

log = logging.getLogger(__name__)

__all__ = ["build_inference_model"]


def _init_from(model_cfg: Any) -> Optional[str]:
    for tower in ("vision", "text"):
        if getattr(getattr(model_cfg, tower, None), "init_from", None):
            raise InferError(f"model.{tower}.init_from starts one tower of a model being trained; inference and "
                             "export load a whole model: model.init_from=PATH")
    value = getattr(model_cfg, "init_from", None) if not isinstance(model_cfg, DictConfig) else model_cfg.get("init_from")
    return os.path.expanduser(str(value)) if value else None


def _explicit_vocab(cfg: Any) -> Optional[str]:
    """``vocab_file``, else ``model.vocab_file`` (``None``: neither is set)."""
    value = cfg.vocab_file or cfg.model.vocab_file
    return os.path.expanduser(str(value)) if value else None


def _check_vocab_found(vocab: Optional[Path], required: bool) -> None:
    """:class:`InferError` asking for a vocab when none was found and one is ``required``."""
    if vocab is None and required:
        raise InferError(
            "no WordPiece vocab: set vocab_file=PATH (the released ERNIE 3.0 vocab is "
            "../shared/assets/ernie-3.0-base-zh/vocab.txt), or point model.init_from at a checkpoint with "
            "vocab.txt beside its weights"
        )


def build_inference_model(cfg: Any, require_vocab: bool = True):
    """``(model, tokenizer)`` in eval mode. With ``model.init_from`` the model and its vocab come
    from :func:`ernievil2.weights.load.load_model` (any layout: ours, official ``.pdparams``,
    PaddleNLP folder; ``vocab_file`` / ``model.vocab_file`` override the checkpoint's vocab; the
    ``model`` group describes a bare ``.safetensors`` only); otherwise ``cfg.model``'s architecture,
    randomly initialised with ``cfg.seed``, and the vocab ``vocab_file`` / ``model.vocab_file``.
    ``tokenizer`` is ``None`` when no vocab is found and ``require_vocab`` is false."""
    import paddle

    from ernievil2.models import build_model
    from ernievil2.tokenizer import WordPieceTokenizer
    from ernievil2.weights.load import load_model

    explicit = _explicit_vocab(cfg)
    init_from = _init_from(cfg.model)
    if init_from:
        try:
            loaded = load_model(init_from, explicit,
                                fallback_config=lambda vocab_size: resolve_model(cfg.model, vocab_size))
        except (OSError, ValueError) as exc:
            raise InferError(str(exc)) from exc
        log.info("architecture and weights from %s (model.preset and overrides ignored)", init_from)
        model, vocab = loaded.model, loaded.vocab_file
        _check_vocab_found(vocab, require_vocab)
        tokenizer = WordPieceTokenizer(vocab, max_length=cfg.text_max_length) if vocab else None
    else:
        vocab = Path(explicit) if explicit else None
        if vocab is not None and not vocab.is_file():
            raise InferError(f"vocab file not found: {vocab}")
        _check_vocab_found(vocab, require_vocab)
        tokenizer = WordPieceTokenizer(vocab, max_length=cfg.text_max_length) if vocab else None
        log.warning("model.init_from is not set: random initialisation (seed %d)", cfg.seed)
        paddle.seed(int(cfg.seed))
        np.random.seed(int(cfg.seed))
        model = build_model(resolve_model(cfg.model, tokenizer.vocab_size if tokenizer else None))
        if tokenizer is not None and tokenizer.vocab_size > model.cfg.text.vocab_size:
            raise InferError(f"vocab {vocab} has {tokenizer.vocab_size} ids but the model's word embedding has "
                             f"{model.cfg.text.vocab_size} rows")
    if cfg.text_max_length > model.cfg.text.max_positions:
        raise InferError(
            f"text_max_length {cfg.text_max_length} exceeds the model's max_positions {model.cfg.text.max_positions}"
        )
    model.eval()
    return model, tokenizer
