"""Finding what a path holds: a checkpoint of any layout (ours, the official release, PaddleNLP's;
see :mod:`ernievil2.weights.layouts`), its weights file, its configuration file and its vocab.

What a path may be: our checkpoint folder (``model.safetensors`` + ``model_config.json``), a
training run folder (its latest ``checkpoints/step_*``), a PaddleNLP ``save_pretrained`` folder
(``config.json`` + ``model_state.pdparams`` or ``model.safetensors``), a folder holding exactly one
official ``.pdparams``, or a ``.safetensors`` / ``.pdparams`` file. Every ``.pdparams`` is read with
:func:`ernievil2.weights.pdparams.load_pdparams` (a restricted unpickler), never with ``paddle.load``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from safetensors.numpy import load_file

from ernievil2.weights.layouts import (
    LAYOUT_OFFICIAL,
    LAYOUT_OURS,
    LAYOUT_PADDLENLP,
    MODEL_CONFIG,
    PADDLENLP_CONFIG,
    PADDLENLP_SAFE_WEIGHTS,
    PADDLENLP_WEIGHTS,
    VOCAB,
    WEIGHTS,
    key_layout,
)
from ernievil2.weights.pdparams import load_pdparams


@dataclass(frozen=True)
class CheckpointSource:
    """A recognised checkpoint: the path given, its layout, the weights file and (if any) the file
    describing its architecture."""

    path: Path
    layout: str
    weights: Path
    config: Optional[Path] = None


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


def _read_weights(weights: Path) -> dict[str, np.ndarray]:
    if weights.suffix == ".safetensors":
        return load_file(str(weights))
    return load_pdparams(weights)


def read_stored_state(path: str | os.PathLike) -> tuple[CheckpointSource, dict[str, np.ndarray]]:
    """The source of ``path`` and its weights under the key names they are stored with (read once:
    finding a ``.pdparams``'s layout already reads it)."""
    src, raw = _resolve(path)
    return src, (raw if raw is not None else _read_weights(src.weights))
