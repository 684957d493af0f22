"""Layouts that hold ONE tower (read by :mod:`ernievil2.weights.towers` for ``model.vision.init_from``
/ ``model.text.init_from``): their key names and the pure conversion of their state dicts (NumPy
arrays) to ours, and of our image tower to timm's.

``paddlenlp-ernie`` (a text tower)
    PaddleNLP's ``ErnieModel`` (ERNIE 3.0 and kin): ``config.json`` (``model_type: ernie``) +
    ``model_state.pdparams`` (or ``model.safetensors``); keys ``embeddings.*``, ``encoder.layers.N.*``,
    ``pooler.dense.*`` (under ``ernie.`` in its task models, whose heads outside ``ernie.`` are
    ignored). These are PaddleNLP ErnieViL's text keys without ``text_model.``, so
    :data:`~ernievil2.weights.layouts.PADDLENLP_KEYS` renames them. ERNIE 3.0 also has token-type
    and task-type embeddings, which our tower lacks: ``ErnieModel`` adds row 0 of the first
    (``token_type_ids`` default 0) and row ``task_id`` of the second (``task_type_ids`` default
    ``config.task_id``) to every position, so both rows are folded into our position embeddings:
    the same sums for every input our tower is given (it passes no token or task types).
``timm`` (an image tower)
    A timm ``VisionTransformer`` in ``.safetensors`` (the Hugging Face hub's ``timm/NAME/model.safetensors``):
    ``cls_token`` [1, 1, D] → ``class_embedding`` [D], ``pos_embed`` [1, 1 + N, D] →
    ``positional_embedding`` [1 + N, D], ``patch_embed.proj.weight`` (OIHW in both),
    ``norm_pre`` → ``ln_pre``, ``blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}``
    → ``blocks.N.{norm1, attn.qkv, attn.proj, norm2, fc1, fc2}``, ``norm`` → ``ln_post``; ``head.*``
    (a classifier, or CLIP's projection) ignored. PyTorch stores a Linear weight [out, in], Paddle
    [in, out]: every Linear weight is transposed. timm's fused ``qkv`` is q | k | v along its output
    axis, heads contiguous within each, as ours: the transpose is the whole conversion.

Structure. Our image tower is CLIP's ViT: ``ln_pre`` before the blocks, a patch conv without bias,
pre-LN blocks, the class token pooled through the final norm (timm's ``global_pool='token'`` with
``norm``, since a LayerNorm acts per token), QuickGELU. timm's CLIP towers (``pre_norm=True``:
``vit_*_clip_*``) have exactly our tensors; their activation (GELU, or QuickGELU in the
``*_clip_quickgelu_*`` models, which the OpenAI weights were trained with) and LayerNorm eps (1e-5;
ours defaults to 1e-6, ``model.vision.ln_eps``) are not in the weights. timm's ImageNet ViTs (no
``norm_pre``, a patch-conv bias), average pooling (``fc_norm``), registers, LayerScale, QK-norm and
attention pooling have no counterpart: loading them fails and :func:`timm_hints` says why.
"""
from __future__ import annotations

import re
from typing import Mapping, Optional

import numpy as np

from ernievil2.weights.layouts import PADDLENLP_KEYS, KeyMap

LAYOUT_ERNIE = "paddlenlp-ernie"
LAYOUT_TIMM = "timm"
ERNIE_PREFIX = "ernie."  # PaddleNLP's ErnieFor* task models keep the ErnieModel under it
_TOKEN_TYPE = "embeddings.token_type_embeddings.weight"
_TASK_TYPE = "embeddings.task_type_embeddings.weight"
TIMM_IGNORED_PREFIXES = ("head.",)

_ERNIE_KEY = re.compile(r"(ernie\.)?(embeddings\.word_embeddings\.weight|encoder\.layers\.\d+\..+)")
_TIMM_KEY = re.compile(r"cls_token|pos_embed|patch_embed\.proj\.weight|blocks\.\d+\.attn\.qkv\.weight")

_TIMM_PAIRS = [
    ("vision.class_embedding", "cls_token"),  # timm [1, 1, D]
    ("vision.positional_embedding", "pos_embed"),  # timm [1, 1 + N, D]
    ("vision.patch_embed.weight", "patch_embed.proj.weight"),
    ("vision.ln_pre.{p}", "norm_pre.{p}"),
    ("vision.blocks.{i}.norm1.{p}", "blocks.{i}.norm1.{p}"),
    ("vision.blocks.{i}.attn.qkv.{p}", "blocks.{i}.attn.qkv.{p}"),
    ("vision.blocks.{i}.attn.proj.{p}", "blocks.{i}.attn.proj.{p}"),
    ("vision.blocks.{i}.norm2.{p}", "blocks.{i}.norm2.{p}"),
    ("vision.blocks.{i}.fc1.{p}", "blocks.{i}.mlp.fc1.{p}"),
    ("vision.blocks.{i}.fc2.{p}", "blocks.{i}.mlp.fc2.{p}"),
    ("vision.ln_post.{p}", "norm.{p}"),
]
TIMM_KEYS = KeyMap(_TIMM_PAIRS)
# Our Linear weights (Paddle [in, out]; timm's are [out, in]).
_LINEAR_WEIGHT = re.compile(r"vision\.blocks\.\d+\.(attn\.qkv|attn\.proj|fc1|fc2)\.weight")

# Why a timm tensor has no counterpart in our tower: (key pattern, explanation).
_TIMM_UNMAPPABLE = [
    (r"patch_embed\.proj\.bias", "a patch-embedding bias (timm's ImageNet ViTs, pre_norm=False): our patch "
                                 "conv has none, as CLIP's"),
    (r"fc_norm\..*", "fc_norm: an average-pooled model (global_pool='avg'); our tower pools the class token "
                     "through its final norm"),
    (r"reg_token", "register tokens: our tower has none"),
    (r"blocks\.\d+\.ls[12]\..*", "LayerScale (ls1/ls2): our blocks have none"),
    (r"blocks\.\d+\.attn\.[qk]_norm\..*", "QK-norm: our attention has none"),
    (r"attn_pool\..*", "attention pooling (a MAP head): our tower pools the class token"),
]


def unimodal_layout(keys) -> Optional[str]:
    """``paddlenlp-ernie`` or ``timm`` by the key names (``None``: neither). The two-tower layouts
    (:func:`ernievil2.weights.layouts.key_layout`) are to be tried first."""
    keys = list(keys)
    if any(_ERNIE_KEY.fullmatch(k) for k in keys):
        return LAYOUT_ERNIE
    if any(_TIMM_KEY.fullmatch(k) for k in keys):
        return LAYOUT_TIMM
    return None


# --------------------------------------------------------------------------------------------
# PaddleNLP ErnieModel -> our text tower.

def ernie_to_ours(state: Mapping[str, np.ndarray], config: Optional[Mapping] = None) -> tuple[dict, list[str]]:
    """``(state, ignored)``: a PaddleNLP ``ErnieModel`` state in our ``text.*`` names, the token-type
    row 0 and task-type row ``config["task_id"]`` (default 0) folded into the position embeddings.
    With ``ernie.``-prefixed keys (a task model) the keys outside the prefix are ``ignored``. Keys
    without a counterpart keep their own name (they then show up as unexpected)."""
    prefixed = any(k.startswith(ERNIE_PREFIX) for k in state)
    ignored = sorted(k for k in state if prefixed and not k.startswith(ERNIE_PREFIX))
    inner = {k[len(ERNIE_PREFIX):] if prefixed else k: np.asarray(v) for k, v in state.items() if k not in ignored}
    out: dict[str, np.ndarray] = {}
    for key, value in inner.items():
        new = PADDLENLP_KEYS.to_ours("text_model." + key)
        out[new if new and new.startswith("text.") else (ERNIE_PREFIX + key if prefixed else key)] = value
    task_id = int((config or {}).get("task_id", 0) or 0)
    for key, row in ((_TOKEN_TYPE, 0), (_TASK_TYPE, task_id)):
        name = ERNIE_PREFIX + key if prefixed else key
        table, pos = out.get(name), out.get("text.pos_emb.weight")
        if table is None or pos is None or table.ndim != 2 or table.shape[1:] != pos.shape[1:] or row >= len(table):
            continue  # nothing to fold, or cannot: left under its own name, to be reported
        out["text.pos_emb.weight"] = (pos + table[row]).astype(pos.dtype)
        del out[name]
    return out, ignored


# --------------------------------------------------------------------------------------------
# timm ViT <-> our image tower.

def _squeeze(value: np.ndarray, ndim: int) -> np.ndarray:
    while value.ndim > ndim and value.shape[0] == 1:
        value = value.reshape(value.shape[1:])
    return value


def timm_to_ours(state: Mapping[str, np.ndarray]) -> tuple[dict, list[str]]:
    """``(state, ignored)``: a timm ViT state in our ``vision.*`` names and Paddle shapes (Linear
    weights transposed, class token and position embeddings without their batch axis); ``head.*``
    is ``ignored``. Keys without a counterpart keep their own name (they then show up as unexpected)."""
    ignored = sorted(k for k in state if k.startswith(TIMM_IGNORED_PREFIXES))
    out: dict[str, np.ndarray] = {}
    for key, value in state.items():
        if key in ignored:
            continue
        value, new = np.asarray(value), TIMM_KEYS.to_ours(key)
        if new is None:
            out[key] = value
            continue
        if new == "vision.class_embedding":
            value = _squeeze(value, 1)
        elif new == "vision.positional_embedding":
            value = _squeeze(value, 2)
        elif _LINEAR_WEIGHT.fullmatch(new) and value.ndim == 2:
            value = np.ascontiguousarray(value.T)
        out[new] = value
    return out, ignored


def ours_to_timm(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Our image tower (the ``vision.*`` keys of ``state``; the rest is left out) in timm's key
    names and PyTorch shapes for a CLIP ViT (``pre_norm=True``, ``global_pool='token'``, no head:
    ``num_classes=0``); :func:`timm_to_ours` inverts it exactly."""
    out: dict[str, np.ndarray] = {}
    for key, value in state.items():
        if not key.startswith("vision."):
            continue
        new = TIMM_KEYS.to_theirs(key)
        if new is None:
            raise KeyError(f"no timm ViT name for parameter {key!r}")
        value = np.asarray(value)
        if key == "vision.class_embedding":
            value = value.reshape(1, 1, -1)
        elif key == "vision.positional_embedding":
            value = value[None]
        elif _LINEAR_WEIGHT.fullmatch(key):
            value = value.T
        out[new] = np.ascontiguousarray(value)
    return out


def timm_hints(state: Mapping[str, np.ndarray]) -> list[str]:
    """Why a timm state (its own key names) cannot become our image tower: one line per structural
    difference found (empty when there is none)."""
    hints = []
    for pattern, why in _TIMM_UNMAPPABLE:
        found = sorted(k for k in state if re.fullmatch(pattern, k))
        if found:
            more = f" … ({len(found)} keys)" if len(found) > 2 else ""
            hints.append(f"{', '.join(found[:2])}{more}: {why}")
    if "norm_pre.weight" not in state:
        hints.append("no norm_pre: a timm ViT built without pre_norm; our tower normalises the tokens (ln_pre) "
                     "before the blocks, as CLIP's: only timm's CLIP towers (pre_norm=True, vit_*_clip_*) map")
    if "cls_token" not in state:
        hints.append("no cls_token: a ViT without a class token; our tower pools the class token")
    pos = state.get("pos_embed")
    if pos is not None and "patch_embed.proj.weight" in state and np.ndim(pos) == 3:
        n = int(np.shape(pos)[1])
        if int(np.sqrt(n)) ** 2 == n:
            hints.append(f"pos_embed has {n} rows (a square number): no class-token row (timm's no_embed_class); "
                         "ours has one")
    return hints
