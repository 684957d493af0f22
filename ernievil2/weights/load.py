"""Loading weights of any layout (ours, the official release, PaddleNLP's; found by
:mod:`ernievil2.weights.find`, converted by :mod:`ernievil2.weights.layouts`):

* :func:`load_model`: build the model a checkpoint describes, load its weights and find its vocab
  (inference, ``mode=eval``, search and export all load through it);
* :func:`load_weights`: load a checkpoint into an existing model (``model.init_from``). Its two
  phases, :func:`read_state` then :func:`load_state_into` (which first runs :func:`check_state`),
  are public so that resuming a training run checks the weights and the optimizer state before
  setting either.

Loading is strict by default: one :class:`CheckpointMismatchError` names the weights file and the
first differing key, and lists every missing key, unexpected key and shape mismatch.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import paddle

from ernievil2.models import ErnieViL2, build_model
from ernievil2.models.config import DualEncoderConfig
from ernievil2.weights.configs import config_from_dict, dual_encoder_config_from_paddlenlp, infer_config
from ernievil2.weights.find import CheckpointSource, find_vocab, read_stored_state, vocab_candidates
from ernievil2.weights.layouts import (
    LAYOUT_OFFICIAL,
    LAYOUT_OURS,
    LAYOUT_PADDLENLP,
    MODEL_CONFIG,
    OFFICIAL_UNUSED_PREFIXES,
    PADDLENLP_TEXT_LN_EPS,
    TO_OURS,
)

log = logging.getLogger(__name__)

#: An architecture computed from the vocab's size (``None`` when no vocab was found).
ConfigFactory = Callable[[Optional[int]], DualEncoderConfig]


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model (or the optimizer) it is loaded into. ``missing``,
    ``unexpected`` and ``mismatched`` (key, checkpoint shape, model shape) list the differences."""

    def __init__(self, message: str, missing: Sequence[str] = (), unexpected: Sequence[str] = (),
                 mismatched: Sequence[tuple[str, tuple, tuple]] = ()):
        super().__init__(message)
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)


@dataclass
class LoadReport:
    """What a load did: tensors loaded, the differences (non-strict loads) and the tensors of the
    checkpoint deliberately left out (the official release's unused classification head)."""

    source: Optional[CheckpointSource] = None
    loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    # Tensors of the model that a one-tower checkpoint lacks and that keep the model's own init
    # (a text tower's pooler; see ernievil2.weights.towers).
    fresh: list[str] = field(default_factory=list)


@dataclass
class LoadedModel:
    """What :func:`load_model` returns: the model (eval mode), where it came from and its vocab
    (``None`` when no rule of :func:`~ernievil2.weights.find.find_vocab` found one)."""

    model: ErnieViL2
    source: CheckpointSource
    vocab_file: Optional[Path]
    report: LoadReport

    def tokenizer(self, max_length: int = 48) -> Any:
        """A :class:`~ernievil2.tokenizer.WordPieceTokenizer` on the vocab (``FileNotFoundError``
        when there is none)."""
        from ernievil2.tokenizer import WordPieceTokenizer

        if self.vocab_file is None:
            looked = ", ".join(str(p) for p in vocab_candidates(self.source))
            raise FileNotFoundError(f"{self.source.path}: no WordPiece vocab (looked for {looked}); pass vocab=PATH")
        return WordPieceTokenizer(self.vocab_file, max_length=max_length)


def as_param_tensor(value: np.ndarray, target: paddle.Tensor) -> paddle.Tensor:
    """``value`` as a tensor of ``target``'s dtype (e.g. float32 weights into a bf16 AMP O2 model)."""
    if value.dtype == np.uint16:
        # paddle.save stores bfloat16 tensors as uint16 bit patterns (no parameter here is uint16):
        # widen them to float32 exactly, then cast to the parameter's dtype.
        value = (value.astype(np.uint32) << 16).view(np.float32)
    tensor = paddle.to_tensor(np.ascontiguousarray(value))
    return tensor if tensor.dtype == target.dtype else tensor.astype(target.dtype)


def _vocab_size(vocab_file: Path) -> int:
    from ernievil2.tokenizer import load_vocab

    return max(load_vocab(vocab_file).values()) + 1


# --------------------------------------------------------------------------------------------
# Reading and loading.

def read_state(path: str | os.PathLike) -> tuple[CheckpointSource, dict[str, np.ndarray], list[str]]:
    """``(source, state in our key names, ignored keys)`` of a checkpoint of any layout."""
    src, raw = read_stored_state(path)
    ignored = []
    if src.layout == LAYOUT_OFFICIAL:
        ignored = sorted(k for k in raw if k.startswith(OFFICIAL_UNUSED_PREFIXES))
        raw = {k: v for k, v in raw.items() if not k.startswith(OFFICIAL_UNUSED_PREFIXES)}
    return src, TO_OURS[src.layout](raw), ignored


def first_difference(saved: Mapping[str, Sequence[int]], live: Mapping[str, Sequence[int]], what: str) -> Optional[str]:
    """``first differing key 'K': checkpoint shape [..], <what> absent (N of M keys differ)`` for the
    first key (sorted) whose shape differs or that one side lacks; ``None`` when they agree."""
    saved = {k: list(v) for k, v in saved.items()}
    live = {k: list(v) for k, v in live.items()}
    keys = set(saved) | set(live)
    differing = [k for k in sorted(keys) if saved.get(k) != live.get(k)]
    if not differing:
        return None

    def describe(shape: Optional[list[int]]) -> str:
        return "absent" if shape is None else f"shape {shape}"

    key = differing[0]
    return (f"first differing key {key!r}: checkpoint {describe(saved.get(key))}, {what} {describe(live.get(key))} "
            f"({len(differing)} of {len(keys)} keys differ)")


def check_state(model: paddle.nn.Layer, state: Mapping[str, np.ndarray], where: str, strict: bool = True,
                prefix: str = "") -> LoadReport:
    """Compare an our-named ``state`` with ``model``. Strict: one :class:`CheckpointMismatchError`
    naming ``where`` and the first differing key lists every missing key, unexpected key and shape
    mismatch. Non-strict: the differences are logged and returned. ``prefix``: the name of
    ``model`` inside ``state``'s keys (``"vision."`` for a model's image tower)."""
    own = {prefix + k: v for k, v in model.state_dict().items()}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [
        (k, tuple(np.shape(state[k])), tuple(own[k].shape))
        for k in sorted(set(own) & set(state))
        if tuple(np.shape(state[k])) != tuple(own[k].shape)
    ]
    report = LoadReport(missing=missing, unexpected=unexpected, mismatched=mismatched)
    if missing or unexpected or mismatched:
        first = first_difference({k: np.shape(v) for k, v in state.items()}, {k: v.shape for k, v in own.items()}, "model")
        lines = [f"{where}: the checkpoint does not match the model: {first}"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {missing}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {unexpected}")
        for k, theirs, ours in mismatched:
            lines.append(f"  shape mismatch for {k}: checkpoint {list(theirs)}, model {list(ours)}")
        message = "\n".join(lines)
        if strict:
            raise CheckpointMismatchError(message, missing, unexpected, mismatched)
        log.warning("%s\n  (strict=False: loading the %d matching tensors)", message,
                    len(own) - len(missing) - len(mismatched))
    return report


def load_state_into(model: paddle.nn.Layer, state: Mapping[str, np.ndarray], where: str, strict: bool = True,
                    prefix: str = "") -> LoadReport:
    """Copy an our-named ``state`` into ``model`` (each tensor cast to its parameter's dtype) after
    :func:`check_state` (``prefix`` as there): strict, nothing is set unless everything fits;
    non-strict, what fits is loaded."""
    report = check_state(model, state, where, strict, prefix)
    bad = {k for k, _, _ in report.mismatched}
    loaded = 0
    with paddle.no_grad():
        for k, param in model.state_dict().items():  # state_dict() holds the live tensors
            k = prefix + k
            if k in state and k not in bad:
                param.set_value(as_param_tensor(np.asarray(state[k]), param))
                loaded += 1
    report.loaded = loaded
    return report


def load_weights(model: ErnieViL2, path: str | os.PathLike, strict: bool = True) -> LoadReport:
    """Load a checkpoint of any layout (detected from ``path``) into an existing ``model``.

    Errors name the weights file. The official release's unused classification head
    (``visual.classfy.*``) is skipped and reported in ``LoadReport.ignored``.
    """
    src, state, ignored = read_state(path)
    report = load_state_into(model, state, str(src.weights), strict=strict)
    report.source, report.ignored = src, ignored
    log.info("loaded %d tensors from %s (%s layout)%s", report.loaded, src.weights, src.layout,
             f"; skipped unused {ignored}" if ignored else "")
    return report


def _architecture(src: CheckpointSource, state: Mapping[str, np.ndarray], fallback: Union[DualEncoderConfig, ConfigFactory, None],
                  vocab_size: Optional[int]) -> DualEncoderConfig:
    if src.config is not None:
        d = json.loads(src.config.read_text(encoding="utf-8"))
        return config_from_dict(d) if src.layout == LAYOUT_OURS else dual_encoder_config_from_paddlenlp(d)
    if src.layout == LAYOUT_PADDLENLP:
        return infer_config(state, text_ln_eps=PADDLENLP_TEXT_LN_EPS)
    if src.layout == LAYOUT_OFFICIAL:
        return infer_config(state)
    if fallback is None:
        raise ValueError(f"{src.weights}: no {MODEL_CONFIG} beside it; pass config=DualEncoderConfig(...)")
    return fallback if isinstance(fallback, DualEncoderConfig) else fallback(vocab_size)


def load_model(
    path: str | os.PathLike,
    vocab: Optional[str | os.PathLike] = None,
    *,
    fallback_vocab: Optional[str | os.PathLike] = None,
    config: Optional[DualEncoderConfig] = None,
    fallback_config: Union[DualEncoderConfig, ConfigFactory, None] = None,
    strict: bool = True,
) -> LoadedModel:
    """Build the model a checkpoint of any layout describes, load its weights (strictly by
    default) and find its vocab; the model is returned in eval mode.

    Vocab: ``vocab``, else the :func:`find_vocab` rule (``vocab.txt`` beside the weights file, then
    in the run folder), else ``fallback_vocab`` when that file exists, else none
    (``LoadedModel.vocab_file`` is ``None``; :meth:`LoadedModel.tokenizer` then raises). A vocab
    holding more ids than the model's word embedding has rows is refused.

    Architecture: ``config`` when given; else the checkpoint's own (``model_config.json``;
    PaddleNLP's ``config.json``, see :func:`ernievil2.weights.configs.dual_encoder_config_from_paddlenlp`);
    else, for the official and PaddleNLP layouts, read off the tensor shapes
    (:func:`ernievil2.weights.configs.infer_config`); else (a bare ``.safetensors`` of ours)
    ``fallback_config``: a config, or a function of the vocab's size returning one.
    """
    src, state, ignored = read_state(path)
    vocab_file = find_vocab(src, vocab)
    if vocab_file is None and fallback_vocab and Path(fallback_vocab).expanduser().is_file():
        vocab_file = Path(fallback_vocab).expanduser()
    vocab_size = _vocab_size(vocab_file) if vocab_file is not None else None
    cfg = config if config is not None else _architecture(src, state, fallback_config, vocab_size)
    if vocab_size is not None and vocab_size > cfg.text.vocab_size:
        raise ValueError(f"vocab {vocab_file} has {vocab_size} ids but the model of {src.weights} has a "
                         f"{cfg.text.vocab_size}-row word embedding: not the vocab it was trained with")
    model = build_model(cfg)
    report = load_state_into(model, state, str(src.weights), strict=strict)
    report.source, report.ignored = src, ignored
    log.info("built %s model from %s: %d tensors%s; vocab %s", src.layout, src.weights, report.loaded,
             f"; skipped unused {ignored}" if ignored else "", vocab_file or "not found")
    model.eval()
    return LoadedModel(model, src, vocab_file, report)
