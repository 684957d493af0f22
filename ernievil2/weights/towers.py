"""Per-tower initialisation: ``model.vision.init_from`` / ``model.text.init_from`` load ONE tower of
a model from any checkpoint that holds it (:func:`load_tower`; :func:`init_model` runs a training
run's ``model.init_from`` and both of these).

Sources: a checkpoint of ours or a run folder, the official release's ``.pdparams``, a PaddleNLP
ErnieViL folder (these hold both towers: the one asked for is taken, the other tower and the
temperature are left alone); for the text tower also a PaddleNLP ``ErnieModel`` folder (ERNIE 3.0:
``config.json`` + ``model_state.pdparams``), for the image tower also a timm ViT ``.safetensors``
(file, or a Hugging Face hub folder holding ``model.safetensors``); the one-tower layouts are
:mod:`ernievil2.weights.tower_layouts`'s.

Strict like :func:`ernievil2.weights.load.load_weights`: one :class:`CheckpointMismatchError` names
the weights file and lists every missing key, unexpected key and shape mismatch of the tower (with
hints where a difference is structural, e.g. a timm ViT that is not CLIP-style). The one exception:
our text tower's pooler (``text.pooler``, ``tanh(Linear(h[:, 0]))``: the only projection head the
model has; ERNIE-ViL 2.0 compares the towers' outputs without a projection), when a one-tower
checkpoint lacks it, keeps the model's own init, logged. A source without the tower asked for is
one error naming the file; so are attention heads that differ from the model's (where the source
records them: heads are not in the weights' shapes) and an ErnieModel activation other than GELU.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
from safetensors.numpy import load_file

from ernievil2.models import ErnieViL2
from ernievil2.weights.find import CheckpointSource, read_stored_state
from ernievil2.weights.layouts import (
    LAYOUT_OFFICIAL,
    LAYOUT_OURS,
    LAYOUT_PADDLENLP,
    MODEL_CONFIG,
    OFFICIAL_UNUSED_PREFIXES,
    PADDLENLP_CONFIG,
    PADDLENLP_SAFE_WEIGHTS,
    PADDLENLP_TEXT_LN_EPS,
    PADDLENLP_WEIGHTS,
    TO_OURS,
    key_layout,
)
from ernievil2.weights.load import CheckpointMismatchError, LoadReport, load_state_into, load_weights
from ernievil2.weights.pdparams import load_pdparams
from ernievil2.weights.tower_layouts import (
    LAYOUT_ERNIE,
    LAYOUT_TIMM,
    ernie_to_ours,
    timm_hints,
    timm_to_ours,
    unimodal_layout,
)

log = logging.getLogger(__name__)

TOWER_NAMES = {"vision": "image tower", "text": "text tower"}
# Where each tower's keys live in the two-tower layouts (ours, official, PaddleNLP ErnieViL).
_PREFIXES = {"vision": ("vision.", "visual.", "vision_model."), "text": ("text.", "text_model.")}
# Our tensors that a one-tower checkpoint may lack: they keep the model's init.
_FRESH_HEADS = {"vision": (), "text": ("text.pooler.",)}
_ONE_TOWER = {LAYOUT_ERNIE: "text", LAYOUT_TIMM: "vision"}
_SOURCES = {"vision": "ours, the official release, a PaddleNLP ErnieViL folder or a timm ViT .safetensors",
            "text": "ours, the official release, a PaddleNLP ErnieViL folder or a PaddleNLP ErnieModel folder"}
TIMM_CLIP_LN_EPS = 1e-5  # timm's CLIP towers: nn.LayerNorm's default eps
_WIDTH_KEY = {"vision": "vision.class_embedding", "text": "text.word_emb.weight"}


def _other(tower: str) -> str:
    return "text" if tower == "vision" else "vision"


def _describe(keys, n: int = 8) -> str:
    keys = sorted(keys)
    return f"{keys[:n]}{f' … ({len(keys)} in all)' if len(keys) > n else ''}"


def _read_file(path: Path) -> dict[str, np.ndarray]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    if path.suffix == ".pdparams":
        return load_pdparams(path)
    raise ValueError(f"{path}: unrecognised weights file type {path.suffix!r} (expected .safetensors or .pdparams; "
                     "PyTorch .bin/.pth pickles are not read: take the model's .safetensors)")


def _layout_of(path: Path, raw: Mapping[str, Any]) -> str:
    layout = key_layout(raw) or unimodal_layout(raw)
    if layout is None:
        raise ValueError(f"{path}: no image tower or text tower found: its keys match none of the layouts that hold one "
                         f"(ours, official, PaddleNLP ErnieViL / ErnieModel, timm ViT); keys: {_describe(raw)}")
    return layout


def _json(path: Optional[Path]) -> dict:
    if path is None:
        return {}
    d = json.loads(path.read_text(encoding="utf-8"))
    return d if isinstance(d, dict) else {}


def read_tower_source(path: str | os.PathLike) -> tuple[CheckpointSource, dict[str, np.ndarray]]:
    """What ``path`` holds (layout, weights, config) and its state under its own key names: a
    weights file of any layout of this module's docstring, a PaddleNLP ``ErnieModel`` or timm
    folder (a ``config.json`` that is not ErnieViL's, beside ``model_state.pdparams`` or
    ``model.safetensors``), else any folder :mod:`ernievil2.weights.find` recognises."""
    given = Path(path).expanduser()
    if not given.exists():
        raise FileNotFoundError(f"{given}: no such checkpoint file or folder")
    if given.is_file():
        raw = _read_file(given)
        layout = _layout_of(given, raw)
        beside = given.parent / (MODEL_CONFIG if layout == LAYOUT_OURS else PADDLENLP_CONFIG)
        config = beside if beside.is_file() and layout != LAYOUT_OFFICIAL else None
        return CheckpointSource(given, layout, given, config), raw
    conf = given / PADDLENLP_CONFIG
    if conf.is_file() and not (given / MODEL_CONFIG).is_file() and _json(conf).get("model_type") != "ernie_vil":
        weights = next((given / n for n in (PADDLENLP_WEIGHTS, PADDLENLP_SAFE_WEIGHTS) if (given / n).is_file()), None)
        if weights is not None:
            raw = _read_file(weights)
            return CheckpointSource(given, _layout_of(weights, raw), weights, conf), raw
    return read_stored_state(given)


def tower_state(src: CheckpointSource, raw: Mapping[str, np.ndarray], tower: str) -> tuple[dict, list[str], list[str]]:
    """``(state, ignored, left)``: the ``tower``'s tensors of a checkpoint in our names (from a
    one-tower layout, everything it holds but its ``ignored`` keys: what has no counterpart is then
    unexpected), the keys deliberately skipped, and the keys of the rest (the other tower, the
    temperature). One :class:`CheckpointMismatchError` naming the file when it has no such tower."""
    name = TOWER_NAMES[tower]
    if src.layout in _ONE_TOWER:
        if _ONE_TOWER[src.layout] != tower:
            raise CheckpointMismatchError(
                f"{src.weights}: a {src.layout} checkpoint holds the {TOWER_NAMES[_other(tower)]} only, no {name}; "
                f"model.{tower}.init_from takes {_SOURCES[tower]}")
        state, ignored = ernie_to_ours(raw, _json(src.config)) if src.layout == LAYOUT_ERNIE else timm_to_ours(raw)
        return state, ignored, []
    ignored = []
    if src.layout == LAYOUT_OFFICIAL:
        ignored = sorted(k for k in raw if k.startswith(OFFICIAL_UNUSED_PREFIXES))
        raw = {k: v for k, v in raw.items() if k not in ignored}
    state = TO_OURS[src.layout](raw)
    mine = {k: v for k, v in state.items() if k.startswith(_PREFIXES[tower])}
    if not mine:
        other = TOWER_NAMES[_other(tower)]
        holds = (f"the {other} only" if any(k.startswith(_PREFIXES[_other(tower)]) for k in state)
                 else f"neither tower; keys: {_describe(state)}")
        raise CheckpointMismatchError(f"{src.weights}: no {name} in this {src.layout} checkpoint (it holds {holds}); "
                                      f"model.{tower}.init_from needs one")
    return mine, ignored, sorted(set(state) - set(mine))


def _declared(src: CheckpointSource, tower: str) -> dict:
    """What the source's configuration says of the tower: heads, activation, text pad id."""
    d = _json(src.config)
    if src.layout == LAYOUT_OURS:
        t = d.get(tower) or {}
        return {"heads": t.get("heads"), "pad": t.get("pad_id")}
    if src.layout == LAYOUT_PADDLENLP:
        t = d.get(f"{tower}_config") or d.get(f"{tower}_config_dict") or {}
        return {"heads": t.get("num_attention_heads"), "pad": t.get("pad_token_id")}
    if src.layout == LAYOUT_ERNIE:
        return {"heads": d.get("num_attention_heads"), "act": d.get("hidden_act", "gelu"), "pad": d.get("pad_token_id")}
    if src.layout == LAYOUT_TIMM:
        return {"architecture": d.get("architecture")}
    return {}


def _check_declared(src: CheckpointSource, tower: str, cfg: Any) -> None:
    """Refuse what the weights' shapes cannot show; warn where outputs will differ from the source's."""
    said = _declared(src, tower)
    problems = []
    if said.get("heads") is not None and int(said["heads"]) != cfg.heads:
        problems.append(f"{said['heads']} attention heads, the model {cfg.heads} (model.{tower}.heads)")
    if said.get("act") not in (None, "gelu"):
        problems.append(f"hidden_act={said['act']!r}: our text tower runs GELU")
    if problems:
        raise ValueError(f"{src.config or src.weights}: its {TOWER_NAMES[tower]} does not fit the model: "
                         + "; ".join(problems))
    if said.get("pad") is not None and int(said["pad"]) != cfg.pad_id:
        log.warning("%s: pad id %s, the model's model.text.pad_id %d: padding is masked by id", src.weights,
                    said["pad"], cfg.pad_id)
    if tower == "text" and src.layout in (LAYOUT_ERNIE, LAYOUT_PADDLENLP) and cfg.ln_eps != PADDLENLP_TEXT_LN_EPS:
        log.warning("%s: PaddleNLP runs its text LayerNorms at eps %g; the model's is %g (model.text.ln_eps=%g "
                    "reproduces its outputs exactly)", src.weights, PADDLENLP_TEXT_LN_EPS, cfg.ln_eps,
                    PADDLENLP_TEXT_LN_EPS)
    if src.layout == LAYOUT_TIMM and "quickgelu" not in str(said.get("architecture") or ""):
        log.warning("%s: our image tower runs QuickGELU; timm's ViTs run GELU unless named *_clip_quickgelu_* "
                    "(the activation is not in the weights: take weights trained with QuickGELU)", src.weights)
    if src.layout == LAYOUT_TIMM and cfg.ln_eps != TIMM_CLIP_LN_EPS:
        log.warning("%s: timm's CLIP ViTs run their LayerNorms at eps %g, the model at %g (model.vision.ln_eps)",
                    src.weights, TIMM_CLIP_LN_EPS, cfg.ln_eps)


def _hints(src: CheckpointSource, raw: Mapping, error: CheckpointMismatchError) -> list[str]:
    hints = timm_hints(raw) if src.layout == LAYOUT_TIMM else []
    rows = {k: (theirs[0], ours[0]) for k, theirs, ours in error.mismatched if theirs[1:] == ours[1:] and theirs}
    if "text.word_emb.weight" in rows:
        hints.append(f"its word embedding has {rows['text.word_emb.weight'][0]} rows: train with the vocab the text "
                     "tower was trained with (model.vocab_file=...), model.text.vocab_size set to that row count")
    if "text.pos_emb.weight" in rows:
        hints.append(f"model.text.max_positions={rows['text.pos_emb.weight'][0]} matches its position embeddings")
    if "vision.positional_embedding" in rows:
        hints.append(f"its position embeddings have {rows['vision.positional_embedding'][0]} rows (1 + patches): "
                     "set model.vision.image_size / patch_size to its grid")
    return hints


def load_tower(model: ErnieViL2, tower: str, path: str | os.PathLike, strict: bool = True) -> LoadReport:
    """Load the ``tower`` (``"vision"`` or ``"text"``) of ``model`` from the checkpoint at ``path``
    (any layout of this module's docstring); the rest of ``model`` is untouched."""
    if tower not in TOWER_NAMES:
        raise ValueError(f"tower must be one of {sorted(TOWER_NAMES)}, got {tower!r}")
    src, raw = read_tower_source(path)
    state, ignored, left = tower_state(src, raw, tower)
    cfg = getattr(model.cfg, tower)
    _check_declared(src, tower, cfg)
    layer, prefix = getattr(model, tower), f"{tower}."
    fresh = []
    if src.layout in _ONE_TOWER:
        own = {prefix + k: v for k, v in layer.state_dict().items()}
        fresh = sorted(k for k in own if k.startswith(_FRESH_HEADS[tower]) and k not in state)
        state.update({k: own[k].numpy() for k in fresh})  # set to themselves: the model's init stays
    where = f"{src.weights} ({TOWER_NAMES[tower]}, {src.layout} layout)"
    width = state.get(_WIDTH_KEY[tower])
    if width is not None and np.ndim(width) and int(np.shape(width)[-1]) != cfg.width:
        where += f": its {TOWER_NAMES[tower]} is {np.shape(width)[-1]} wide, the model's {cfg.width} (model.{tower}.width)"
    try:
        report = load_state_into(layer, state, where, strict=strict, prefix=prefix)
    except CheckpointMismatchError as e:
        hints = _hints(src, raw, e)
        if not hints:
            raise
        raise CheckpointMismatchError(str(e) + "".join(f"\n  hint: {h}" for h in hints),
                                      e.missing, e.unexpected, e.mismatched) from None
    report.source, report.ignored, report.fresh = src, ignored, fresh
    report.loaded -= len(fresh)
    log.info("loaded the %s from %s (%s layout): %d tensors%s%s", TOWER_NAMES[tower], src.weights, src.layout,
             report.loaded, f"; skipped {_describe(ignored, 4)}" if ignored else "",
             f"; left out {len(left)} tensors (the {TOWER_NAMES[_other(tower)]}, temperature)" if left else "")
    if fresh:
        log.info("%s has no %s: they start fresh (the model's own init)", src.weights, ", ".join(fresh))
    return report


def init_model(model: ErnieViL2, init_from: Optional[str] = None,
               towers: Optional[Mapping[str, Optional[str]]] = None) -> list[LoadReport]:
    """A training run's initialisation: ``model.init_from`` (the whole model) first, then each
    tower's ``init_from`` (``towers``: ``{"vision": path, "text": path}``, ``None`` = none), so that a
    tower's own source wins for that tower over the whole-model one."""
    reports = [load_weights(model, init_from)] if init_from else []
    for tower, path in (towers or {}).items():
        if not path:
            continue
        if init_from:
            log.info("model.%s.init_from=%s replaces the %s of model.init_from=%s", tower, path, TOWER_NAMES[tower],
                     init_from)
        reports.append(load_tower(model, tower, path))
    return reports
