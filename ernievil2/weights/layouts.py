"""The released ERNIE-ViL 2.0 weight layouts and ours: their file and key names, and the pure
conversion of state dicts (NumPy arrays) between them.

Finding, reading, loading and writing checkpoints are the other modules of :mod:`ernievil2.weights`;
each layout's configuration is :mod:`ernievil2.weights.configs`'s. The layouts:

``ernievil2``
    Ours: ``model.safetensors`` + ``model_config.json`` (+ ``vocab.txt``); keys ``vision.*``,
    ``text.*``, ``temperature``.
``official``
    The official ERNIE repository's ``.pdparams``: keys ``visual.*``, ``text_model.encoder_stack.*``,
    ``contrastive_loss_mm.*``; no configuration (:func:`ernievil2.weights.configs.infer_config`
    reads it off the shapes).
``paddlenlp``
    PaddleNLP's ``ErnieViLModel``: ``config.json`` + ``model_state.pdparams`` (or
    ``model.safetensors``); keys ``vision_model.*``, ``text_model.embeddings/encoder/pooler.*``.
    PaddleNLP's vision attention has separate ``q_proj``/``k_proj``/``v_proj``; ours is one fused
    ``qkv`` (q | k | v along the output axis of the Paddle ``[in, out]`` weight), so they are
    concatenated on import and split on export.

How PaddleNLP 2.8.1 actually computes (checked against ``ErnieViLModel``; parity depends on it):

* ``get_image_features`` = ``ln_post(tokens[:, 0])`` and ``get_text_features`` = the tanh pooler
  output; neither is L2-normalised (``forward`` normalises).
* Vision: pre-LN ``nn.TransformerEncoderLayer`` with QuickGELU (``hidden_act="quick_gelu"``);
  its LayerNorm eps is set from ``vision_config.layer_norm_eps`` (1e-6) by the weight-init hook.
* Text: ``ErnieModel`` post-LN with exact GELU, additive ``-1e4`` padding mask on ``pad_token_id``,
  pooler ``tanh(dense(h[:, 0]))``. Its own init hook sets **every text LayerNorm eps to 1e-12**,
  whatever ``text_config.layer_norm_eps`` says (the official code uses Paddle's default 1e-5). A
  PaddleNLP import therefore uses text ``ln_eps=1e-12`` by default so its embeddings match
  PaddleNLP's exactly; for trained weights the two eps give embeddings equal to ~1e-6.
* The text word embedding has ``padding_idx=0`` (id 0 embeds to zeros); padded positions are
  masked out of attention, so this never changes the pooled output.
"""
from __future__ import annotations

import os
import re
from typing import Callable, Mapping, Optional

import numpy as np

from ernievil2.models.config import DualEncoderConfig

LAYOUT_OURS = "ernievil2"
LAYOUT_OFFICIAL = "official"
LAYOUT_PADDLENLP = "paddlenlp"
LAYOUTS = (LAYOUT_OURS, LAYOUT_OFFICIAL, LAYOUT_PADDLENLP)

# Our files.
WEIGHTS = "model.safetensors"
MODEL_CONFIG = "model_config.json"
VOCAB = "vocab.txt"
# PaddleNLP's files.
PADDLENLP_CONFIG = "config.json"
PADDLENLP_WEIGHTS = "model_state.pdparams"
PADDLENLP_SAFE_WEIGHTS = "model.safetensors"
# The text LayerNorm eps PaddleNLP's ErnieModel really runs with (its init hook overrides the config).
PADDLENLP_TEXT_LN_EPS = 1e-12
# Tensors in the official release that no part of the dual encoder uses (a classification head).
OFFICIAL_UNUSED_PREFIXES = ("visual.classfy.",)


# --------------------------------------------------------------------------------------------
# Key tables: (our key template, their key template); {i} = layer index, {p} = weight|bias.

_PADDLENLP_PAIRS = [
    ("temperature", "temperature"),
    ("vision.class_embedding", "vision_model.class_embedding"),
    ("vision.patch_embed.weight", "vision_model.conv1.weight"),
    ("vision.positional_embedding", "vision_model.positional_embedding.weight"),
    ("vision.ln_pre.{p}", "vision_model.ln_pre.{p}"),
    ("vision.ln_post.{p}", "vision_model.ln_post.{p}"),
    ("vision.blocks.{i}.norm1.{p}", "vision_model.transformer.layers.{i}.norm1.{p}"),
    ("vision.blocks.{i}.norm2.{p}", "vision_model.transformer.layers.{i}.norm2.{p}"),
    ("vision.blocks.{i}.attn.proj.{p}", "vision_model.transformer.layers.{i}.self_attn.out_proj.{p}"),
    ("vision.blocks.{i}.fc1.{p}", "vision_model.transformer.layers.{i}.linear1.{p}"),
    ("vision.blocks.{i}.fc2.{p}", "vision_model.transformer.layers.{i}.linear2.{p}"),
    # vision.blocks.{i}.attn.qkv <-> self_attn.{q,k,v}_proj: fused / split separately.
    ("text.word_emb.weight", "text_model.embeddings.word_embeddings.weight"),
    ("text.pos_emb.weight", "text_model.embeddings.position_embeddings.weight"),
    ("text.ln.{p}", "text_model.embeddings.layer_norm.{p}"),
    ("text.blocks.{i}.attn.q.{p}", "text_model.encoder.layers.{i}.self_attn.q_proj.{p}"),
    ("text.blocks.{i}.attn.k.{p}", "text_model.encoder.layers.{i}.self_attn.k_proj.{p}"),
    ("text.blocks.{i}.attn.v.{p}", "text_model.encoder.layers.{i}.self_attn.v_proj.{p}"),
    ("text.blocks.{i}.attn.o.{p}", "text_model.encoder.layers.{i}.self_attn.out_proj.{p}"),
    ("text.blocks.{i}.ln1.{p}", "text_model.encoder.layers.{i}.norm1.{p}"),
    ("text.blocks.{i}.ffn_i.{p}", "text_model.encoder.layers.{i}.linear1.{p}"),
    ("text.blocks.{i}.ffn_o.{p}", "text_model.encoder.layers.{i}.linear2.{p}"),
    ("text.blocks.{i}.ln2.{p}", "text_model.encoder.layers.{i}.norm2.{p}"),
    ("text.pooler.{p}", "text_model.pooler.dense.{p}"),
]

_OFFICIAL_PAIRS = [
    ("temperature", "contrastive_loss_mm.temperature_b"),
    ("vision.class_embedding", "visual.class_embedding"),  # official (1, 1, w)
    ("vision.patch_embed.weight", "visual.patch_embed.proj.weight"),
    ("vision.positional_embedding", "visual.positional_embedding"),  # official (1, n + 1, w)
    ("vision.ln_pre.{p}", "visual.norm_pre.{p}"),
    ("vision.ln_post.{p}", "visual.norm_post.{p}"),
    ("vision.blocks.{i}.norm1.{p}", "visual.blocks.{i}.norm1.{p}"),
    ("vision.blocks.{i}.attn.qkv.{p}", "visual.blocks.{i}.attn.qkv.{p}"),  # fused q|k|v, as ours
    ("vision.blocks.{i}.attn.proj.{p}", "visual.blocks.{i}.attn.proj.{p}"),
    ("vision.blocks.{i}.norm2.{p}", "visual.blocks.{i}.norm2.{p}"),
    ("vision.blocks.{i}.fc1.{p}", "visual.blocks.{i}.mlp.fc1.{p}"),
    ("vision.blocks.{i}.fc2.{p}", "visual.blocks.{i}.mlp.fc2.{p}"),
    ("text.word_emb.weight", "text_model.word_emb.weight"),
    ("text.pos_emb.weight", "text_model.pos_emb.weight"),
    ("text.ln.{p}", "text_model.ln.{p}"),
    ("text.blocks.{i}.attn.q.{p}", "text_model.encoder_stack.block.{i}.attn.q.{p}"),
    ("text.blocks.{i}.attn.k.{p}", "text_model.encoder_stack.block.{i}.attn.k.{p}"),
    ("text.blocks.{i}.attn.v.{p}", "text_model.encoder_stack.block.{i}.attn.v.{p}"),
    ("text.blocks.{i}.attn.o.{p}", "text_model.encoder_stack.block.{i}.attn.o.{p}"),
    ("text.blocks.{i}.ln1.{p}", "text_model.encoder_stack.block.{i}.ln1.{p}"),
    ("text.blocks.{i}.ffn_i.{p}", "text_model.encoder_stack.block.{i}.ffn.i.{p}"),
    ("text.blocks.{i}.ffn_o.{p}", "text_model.encoder_stack.block.{i}.ffn.o.{p}"),
    ("text.blocks.{i}.ln2.{p}", "text_model.encoder_stack.block.{i}.ln2.{p}"),
    ("text.pooler.{p}", "text_model.pooler.{p}"),
]


def _template_regex(template: str) -> re.Pattern:
    pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(pattern)


class KeyMap:
    """Rename keys between two layouts given (ours, theirs) templates."""

    def __init__(self, pairs: list[tuple[str, str]]):
        self._to_ours = [(_template_regex(theirs), ours) for ours, theirs in pairs]
        self._to_theirs = [(_template_regex(ours), theirs) for ours, theirs in pairs]

    @staticmethod
    def _rename(key: str, table) -> Optional[str]:
        for regex, target in table:
            m = regex.fullmatch(key)
            if m:
                return target.format(**m.groupdict())
        return None

    def to_ours(self, key: str) -> Optional[str]:
        return self._rename(key, self._to_ours)

    def to_theirs(self, key: str) -> Optional[str]:
        return self._rename(key, self._to_theirs)


PADDLENLP_KEYS = KeyMap(_PADDLENLP_PAIRS)
_OFFICIAL_KEYS = KeyMap(_OFFICIAL_PAIRS)
_PNLP_QKV = re.compile(r"vision_model\.transformer\.layers\.(\d+)\.self_attn\.(q|k|v)_proj\.(weight|bias)")


def _squeeze_leading(v: np.ndarray, ndim: int) -> np.ndarray:
    """Drop leading size-1 axes down to ``ndim`` axes (the official (1, 1, w) / (1, n, w) params)."""
    while v.ndim > ndim and v.shape[0] == 1:
        v = v.reshape(v.shape[1:])
    return v


def official_to_ours(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Official ERNIE-repo keys → ours. Unknown keys are kept under their own name (they then show
    up as unexpected when loading)."""
    out: dict[str, np.ndarray] = {}
    for key, value in state.items():
        new = _OFFICIAL_KEYS.to_ours(key)
        value = np.asarray(value)
        if new == "vision.class_embedding":
            value = _squeeze_leading(value, 1)
        elif new == "vision.positional_embedding":
            value = _squeeze_leading(value, 2)
        elif new == "temperature":
            value = value.reshape(-1) if value.size == 1 else value
        out[new or key] = value
    return out


def paddlenlp_to_ours(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """PaddleNLP ``ErnieViLModel`` keys → ours; vision ``q/k/v_proj`` are fused into ``qkv``
    (concatenated along the output axis: axis 1 of the ``[in, out]`` weight, axis 0 of the bias).
    Unknown keys, and q/k/v parts whose siblings are missing, are kept under their own name."""
    out: dict[str, np.ndarray] = {}
    parts: dict[tuple[str, str], dict[str, tuple[str, np.ndarray]]] = {}
    for key, value in state.items():
        value = np.asarray(value)
        m = _PNLP_QKV.fullmatch(key)
        if m:
            layer, which, kind = m.groups()
            parts.setdefault((layer, kind), {})[which] = (key, value)
            continue
        new = PADDLENLP_KEYS.to_ours(key)
        if new == "temperature":
            value = value.reshape(-1) if value.size == 1 else value
        out[new or key] = value
    for (layer, kind), got in parts.items():
        shapes = {which: v.shape for which, (_, v) in got.items()}
        if set(got) == {"q", "k", "v"} and len(set(shapes.values())) == 1:
            out[f"vision.blocks.{layer}.attn.qkv.{kind}"] = np.concatenate(
                [got[w][1] for w in ("q", "k", "v")], axis=-1
            )
        else:  # cannot fuse: leave the pieces to be reported
            for key, value in got.values():
                out[key] = value
    return out


def ours_to_paddlenlp(state: Mapping[str, np.ndarray], cfg: DualEncoderConfig) -> dict[str, np.ndarray]:
    """Our keys → PaddleNLP ``ErnieViLModel`` keys; the fused vision ``qkv`` is split in three."""
    out: dict[str, np.ndarray] = {}
    qkv = re.compile(r"vision\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)")
    width = cfg.vision.width
    for key, value in state.items():
        value = np.asarray(value)
        m = qkv.fullmatch(key)
        if m:
            layer, kind = m.groups()
            if value.shape[-1] != 3 * width:
                raise ValueError(f"{key}: shape {list(value.shape)} does not end in 3 * vision.width = {3 * width}")
            for which, piece in zip(("q", "k", "v"), np.split(value, 3, axis=-1)):
                out[f"vision_model.transformer.layers.{layer}.self_attn.{which}_proj.{kind}"] = np.ascontiguousarray(piece)
            continue
        new = PADDLENLP_KEYS.to_theirs(key)
        if new is None:
            raise KeyError(f"no PaddleNLP ErnieViLModel name for parameter {key!r}")
        out[new] = value
    return out


# --------------------------------------------------------------------------------------------
# Layouts by key names.

def key_layout(keys) -> Optional[str]:
    """The layout whose key names ``keys`` use (``None``: none of them)."""
    keys = list(keys)
    if any(k.startswith(("visual.", "text_model.encoder_stack.", "contrastive_loss_mm.")) for k in keys):
        return LAYOUT_OFFICIAL
    if any(k.startswith(("vision_model.", "text_model.encoder.", "text_model.embeddings.")) for k in keys):
        return LAYOUT_PADDLENLP
    if any(k.startswith(("vision.", "text.")) for k in keys):
        return LAYOUT_OURS
    return None


#: Each layout's state dict → ours.
TO_OURS: dict[str, Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]] = {
    LAYOUT_OURS: dict,
    LAYOUT_OFFICIAL: official_to_ours,
    LAYOUT_PADDLENLP: paddlenlp_to_ours,
}


# --------------------------------------------------------------------------------------------
# Vocab.

def plain_vocab_text(vocab_file: str | os.PathLike) -> str:
    """The vocab as PaddleNLP's tokenizers read it: one token per line, line number = id. The
    released ERNIE vocab is ``token<TAB>id`` (and lists ``$`` twice, at ids 12084 and 18005): the
    tokens are written in id order, keeping every id."""
    by_id: dict[int, str] = {}
    with open(vocab_file, encoding="utf-8") as f:
        for lineno, line in enumerate(f):
            line = line.rstrip("\n").rstrip("\r")
            token, sep, idx = line.rpartition("\t")
            if not (sep and idx.isdigit()):
                token, idx = line, str(lineno)
            if token:
                by_id[int(idx)] = token
    if sorted(by_id) != list(range(len(by_id))):
        raise ValueError(f"{vocab_file}: token ids are not 0..{len(by_id) - 1} without gaps; cannot write a plain vocab")
    return "".join(f"{by_id[i]}\n" for i in range(len(by_id)))
