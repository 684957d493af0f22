"""The one way model weights go in and out: find a checkpoint of any supported layout, load it
together with its vocab, save ours, export PaddleNLP's.

Three layouts are recognised (the key maps between them: :mod:`ernievil2.pretrained`):

``ernievil2``
    This project's own checkpoints: a folder with ``model.safetensors`` + ``model_config.json``
    (as :func:`save_checkpoint` and the training checkpoints write them), a training run folder
    (its latest ``checkpoints/step_*``), or a ``.safetensors`` file.
``official``
    The official ERNIE repository's release: one ``.pdparams`` pickle (or a folder holding exactly
    one). It carries no configuration; the architecture is read off the tensor shapes.
``paddlenlp``
    A PaddleNLP ``ErnieViLModel.save_pretrained`` folder: ``config.json`` + ``model_state.pdparams``
    (or ``model.safetensors``).

Entry points:

* :func:`load_model`: build the model a checkpoint describes, load its weights and find its vocab
  (inference, ``mode=eval``, search and export all load through it);
* :func:`load_weights`: load a checkpoint into an existing model (``model.init_from``). Its two
  phases, :func:`read_state` then :func:`load_state_into` (which first runs :func:`check_state`),
  are public so that resuming a training run checks the weights and the optimizer state before
  setting either;
* :func:`save_checkpoint` / :func:`write_model_files`: the one writer of our layout (training
  checkpoints call :func:`write_model_files` too); :func:`export_paddlenlp` writes PaddleNLP's.

Every ``.pdparams`` is read with :func:`ernievil2.safe_pickle.load_pdparams` (a restricted
unpickler), never with ``paddle.load``. Loading is strict by default: one
:class:`CheckpointMismatchError` names the weights file and the first differing key, and lists
every missing key, unexpected key and shape mismatch.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import paddle
from safetensors.numpy import load_file, save_file

from ernievil2.atomic import atomic_dir
from ernievil2.models import ErnieViL2, build_model
from ernievil2.models.config import DualEncoderConfig
from ernievil2.pretrained import (
    LAYOUT_OFFICIAL,
    LAYOUT_OURS,
    LAYOUT_PADDLENLP,
    OFFICIAL_UNUSED_PREFIXES,
    PADDLENLP_CONFIG,
    PADDLENLP_SAFE_WEIGHTS,
    PADDLENLP_TEXT_LN_EPS,
    PADDLENLP_WEIGHTS,
    TO_OURS,
    config_from_dict,
    dual_encoder_config_from_paddlenlp,
    dual_encoder_config_to_paddlenlp,
    infer_config,
    key_layout,
    ours_to_paddlenlp,
    plain_vocab_text,
)
from ernievil2.safe_pickle import load_pdparams

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
MODEL_CONFIG = "model_config.json"
VOCAB = "vocab.txt"

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


@dataclass(frozen=True)
class CheckpointSource:
    """A recognised checkpoint: the path given, its layout, the weights file and (if any) the file
    describing its architecture."""

    path: Path
    layout: str
    weights: Path
    config: Optional[Path] = None


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


@dataclass
class LoadedModel:
    """What :func:`load_model` returns: the model (eval mode), where it came from and its vocab
    (``None`` when no rule of :func:`find_vocab` found one)."""

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


# --------------------------------------------------------------------------------------------
# Model state as NumPy.

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


# --------------------------------------------------------------------------------------------
# Saving.

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


# --------------------------------------------------------------------------------------------
# Finding checkpoints and their vocab.

def _describe_keys(keys, n: int = 8) -> str:
    keys = sorted(keys)
    more = f" … ({len(keys)} in all)" if len(keys) > n else ""
    return f"{keys[:n]}{more}"


def _safetensors_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        return list(f.keys())


def _latest_run_checkpoint(path: Path) -> Optional[Path]:
    ckpts = sorted(
        d for d in (path / "checkpoints").glob("step_*") if (d / MODEL_CONFIG).is_file() and (d / WEIGHTS).is_file()
    )
    return ckpts[-1] if ckpts else None


def _source_from_file(path: Path, given: Path) -> tuple[CheckpointSource, Optional[dict]]:
    sibling_ours = path.parent / MODEL_CONFIG
    sibling_pnlp = path.parent / PADDLENLP_CONFIG
    if path.suffix == ".safetensors":
        layout = key_layout(_safetensors_keys(path))
        if layout == LAYOUT_PADDLENLP:
            return CheckpointSource(given, layout, path, sibling_pnlp if sibling_pnlp.is_file() else None), None
        if layout == LAYOUT_OURS:
            return CheckpointSource(given, layout, path, sibling_ours if sibling_ours.is_file() else None), None
        raise ValueError(
            f"{path}: a .safetensors file whose keys match no known ERNIE-ViL 2.0 layout; "
            f"keys: {_describe_keys(_safetensors_keys(path))}"
        )
    if path.suffix == ".pdparams":
        state = load_pdparams(path)
        layout = key_layout(state)
        if layout == LAYOUT_OFFICIAL:
            return CheckpointSource(given, layout, path, None), state
        if layout == LAYOUT_PADDLENLP:
            return CheckpointSource(given, layout, path, sibling_pnlp if sibling_pnlp.is_file() else None), state
        raise ValueError(
            f"{path}: a .pdparams file whose keys match neither the official ERNIE-ViL 2.0 layout "
            f"(visual.*, text_model.encoder_stack.*) nor PaddleNLP's (vision_model.*, text_model.encoder.*); "
            f"keys: {_describe_keys(state)}"
        )
    raise ValueError(f"{path}: unrecognised checkpoint file type {path.suffix!r} (expected .safetensors or .pdparams)")


def _resolve(path: str | os.PathLike) -> tuple[CheckpointSource, Optional[dict]]:
    """The source of ``path`` and, where finding the layout meant reading the weights (a
    ``.pdparams``), the raw state too (so that it is read once)."""
    given = Path(path).expanduser()
    if not given.exists():
        raise FileNotFoundError(f"{given}: no such checkpoint file or folder")
    if given.is_file():
        return _source_from_file(given, given)
    if (given / MODEL_CONFIG).is_file() and (given / WEIGHTS).is_file():
        return CheckpointSource(given, LAYOUT_OURS, given / WEIGHTS, given / MODEL_CONFIG), None
    if (given / PADDLENLP_CONFIG).is_file():
        weights = next((given / n for n in (PADDLENLP_WEIGHTS, PADDLENLP_SAFE_WEIGHTS) if (given / n).is_file()), None)
        if weights is not None:
            conf = json.loads((given / PADDLENLP_CONFIG).read_text(encoding="utf-8"))
            if conf.get("model_type") != "ernie_vil":
                raise ValueError(
                    f"{given / PADDLENLP_CONFIG}: model_type is {conf.get('model_type')!r}, not 'ernie_vil': "
                    "not a PaddleNLP ErnieViLModel folder"
                )
            return CheckpointSource(given, LAYOUT_PADDLENLP, weights, given / PADDLENLP_CONFIG), None
    latest = _latest_run_checkpoint(given)
    if latest is not None:
        return CheckpointSource(given, LAYOUT_OURS, latest / WEIGHTS, latest / MODEL_CONFIG), None
    pdparams = sorted(given.glob("*.pdparams"))
    if len(pdparams) == 1:
        return _source_from_file(pdparams[0], given)
    found = sorted(p.name + ("/" if p.is_dir() else "") for p in given.iterdir())
    extra = f"; several .pdparams files, pass one of them: {[p.name for p in pdparams]}" if pdparams else ""
    raise ValueError(
        f"{given}: not a recognised ERNIE-ViL 2.0 checkpoint folder (found: {_describe_keys(found, 20)}){extra}. "
        f"Expected {MODEL_CONFIG} + {WEIGHTS} (ernievil2), {PADDLENLP_CONFIG} + {PADDLENLP_WEIGHTS} (PaddleNLP), "
        "a training run folder with checkpoints/step_*, or one official .pdparams file."
    )


def resolve_source(path: str | os.PathLike) -> CheckpointSource:
    """Find what ``path`` is: layout, weights file and config file (raises naming the path)."""
    return _resolve(path)[0]


def detect_layout(path: str | os.PathLike) -> str:
    """``"ernievil2"``, ``"official"`` or ``"paddlenlp"``; ``ValueError`` naming the path and what was
    found when it is none of them (``FileNotFoundError`` when it does not exist)."""
    return resolve_source(path).layout


def vocab_candidates(source: CheckpointSource) -> list[Path]:
    """Where :func:`find_vocab` looks, in order: ``vocab.txt`` beside the weights file, then in the
    folder the checkpoint was named by when that is another one (a run folder)."""
    folders = [source.weights.parent]
    if source.path.is_dir() and source.path.resolve() != source.weights.parent.resolve():
        folders.append(source.path)
    return [folder / VOCAB for folder in folders]


def find_vocab(source: CheckpointSource, vocab: Optional[str | os.PathLike] = None) -> Optional[Path]:
    """The WordPiece vocab of a checkpoint, by the one rule every loader follows:

    1. ``vocab`` when given (``FileNotFoundError`` when that file does not exist);
    2. ``vocab.txt`` beside the weights file: in our checkpoint folder (training writes the vocab
       into every checkpoint), in a run folder's latest ``checkpoints/step_*``, in a PaddleNLP
       folder, or beside a ``.safetensors`` / ``.pdparams`` file given by path;
    3. ``vocab.txt`` in the run folder itself (written there when training built its vocab).

    ``None`` when none exists.
    """
    if vocab:
        path = Path(vocab).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"vocab file not found: {path}")
        return path
    return next((p for p in vocab_candidates(source) if p.is_file()), None)


def _vocab_size(vocab_file: Path) -> int:
    from ernievil2.tokenizer import load_vocab

    return max(load_vocab(vocab_file).values()) + 1


# --------------------------------------------------------------------------------------------
# Reading and loading.

def _read_weights(weights: Path) -> dict[str, np.ndarray]:
    if weights.suffix == ".safetensors":
        return load_file(str(weights))
    return load_pdparams(weights)


def read_state(path: str | os.PathLike) -> tuple[CheckpointSource, dict[str, np.ndarray], list[str]]:
    """``(source, state in our key names, ignored keys)`` of a checkpoint of any layout."""
    src, raw = _resolve(path)
    if raw is None:
        raw = _read_weights(src.weights)
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


def check_state(model: paddle.nn.Layer, state: Mapping[str, np.ndarray], where: str, strict: bool = True) -> LoadReport:
    """Compare an our-named ``state`` with ``model``. Strict: one :class:`CheckpointMismatchError`
    naming ``where`` and the first differing key lists every missing key, unexpected key and shape
    mismatch. Non-strict: the differences are logged and returned."""
    own = model.state_dict()
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


def load_state_into(model: paddle.nn.Layer, state: Mapping[str, np.ndarray], where: str, strict: bool = True) -> LoadReport:
    """Copy an our-named ``state`` into ``model`` (each tensor cast to its parameter's dtype) after
    :func:`check_state`: strict, nothing is set unless everything fits; non-strict, what fits is loaded."""
    report = check_state(model, state, where, strict)
    bad = {k for k, _, _ in report.mismatched}
    loaded = 0
    with paddle.no_grad():
        for k, param in model.state_dict().items():  # state_dict() holds the live tensors
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
    PaddleNLP's ``config.json``, see :func:`ernievil2.pretrained.dual_encoder_config_from_paddlenlp`);
    else, for the official and PaddleNLP layouts, read off the tensor shapes
    (:func:`ernievil2.pretrained.infer_config`); else (a bare ``.safetensors`` of ours)
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
