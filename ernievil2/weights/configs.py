"""Model configurations in each layout's terms: ours (``model_config.json``), PaddleNLP's
``ErnieViLConfig`` (``config.json``, both ways), and the architecture of a state dict read off its
tensor shapes (the official release carries no configuration). Pure functions of dicts; the
layouts themselves (file and key names, and what PaddleNLP really computes with, which
:func:`dual_encoder_config_from_paddlenlp` follows) are :mod:`ernievil2.weights.layouts`'s.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict
from typing import Any, Mapping

import numpy as np

from ernievil2.models.config import INIT_TEMPERATURE, DualEncoderConfig, TextConfig, VisionConfig
from ernievil2.weights.layouts import PADDLENLP_TEXT_LN_EPS

# Key under which an export records our exact DualEncoderConfig inside PaddleNLP's config.json.
EMBEDDED_CONFIG_KEY = "ernievil2_model_config"
# Attention heads cannot be read off weights; the released widths fix them.
DEFAULT_HEADS = {768: 12, 1024: 16}



def config_from_dict(d: Mapping[str, Any]) -> DualEncoderConfig:
    """Our :class:`DualEncoderConfig` from its ``model_config.json`` dict (``asdict`` of it)."""
    return DualEncoderConfig(
        vision=VisionConfig(**d["vision"]), text=TextConfig(**d["text"]),
        init_temperature=d["init_temperature"], attention=d["attention"],
    )


_PNLP_TEXT_DEFAULTS = dict(
    vocab_size=40000, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
    hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, max_position_embeddings=2048,
    type_vocab_size=0, use_task_id=False, initializer_range=0.02, pad_token_id=0, layer_norm_eps=1e-5,
)
_PNLP_VISION_DEFAULTS = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, num_channels=3,
    image_size=224, patch_size=16, hidden_act="quick_gelu", layer_norm_eps=1e-6,
)


def dual_encoder_config_from_paddlenlp(d: Mapping[str, Any], match_paddlenlp_runtime: bool = True) -> DualEncoderConfig:
    """Our :class:`DualEncoderConfig` from a PaddleNLP ``ErnieViLConfig`` ``config.json`` dict.

    ``match_paddlenlp_runtime``: use the text LayerNorm eps PaddleNLP actually computes with
    (1e-12, set by ``ErnieModel``'s init hook) instead of ``text_config.layer_norm_eps``, so the
    imported model gives PaddleNLP's embeddings exactly. A ``config.json`` written by
    :func:`ernievil2.weights.save.export_paddlenlp` carries our exact config and is returned as is.
    """
    if isinstance(d.get(EMBEDDED_CONFIG_KEY), Mapping):
        return config_from_dict(d[EMBEDDED_CONFIG_KEY])
    if d.get("model_type") not in (None, "ernie_vil"):
        raise ValueError(f"not an ErnieViL config: model_type={d.get('model_type')!r} (expected 'ernie_vil')")
    t = {**_PNLP_TEXT_DEFAULTS, **(d.get("text_config") or d.get("text_config_dict") or {})}
    v = {**_PNLP_VISION_DEFAULTS, **(d.get("vision_config") or d.get("vision_config_dict") or {})}
    problems = []
    if t["hidden_act"] != "gelu":
        problems.append(f"text_config.hidden_act={t['hidden_act']!r} (only 'gelu')")
    if t["type_vocab_size"]:
        problems.append(f"text_config.type_vocab_size={t['type_vocab_size']} (token-type embeddings are not used)")
    if t["use_task_id"]:
        problems.append("text_config.use_task_id=true (task embeddings are not used)")
    if v["hidden_act"] != "quick_gelu":
        problems.append(f"vision_config.hidden_act={v['hidden_act']!r} (only 'quick_gelu')")
    if v["num_channels"] != 3:
        problems.append(f"vision_config.num_channels={v['num_channels']} (only 3)")
    if problems:
        raise ValueError("unsupported PaddleNLP ErnieViL configuration: " + "; ".join(problems))
    text_eps = PADDLENLP_TEXT_LN_EPS if match_paddlenlp_runtime else float(t["layer_norm_eps"])
    return DualEncoderConfig(
        vision=VisionConfig(
            image_size=int(v["image_size"]), patch_size=int(v["patch_size"]), width=int(v["hidden_size"]),
            layers=int(v["num_hidden_layers"]), heads=int(v["num_attention_heads"]),
            mlp_dim=int(v["intermediate_size"]), ln_eps=float(v["layer_norm_eps"]),
        ),
        text=TextConfig(
            vocab_size=int(t["vocab_size"]), width=int(t["hidden_size"]), layers=int(t["num_hidden_layers"]),
            heads=int(t["num_attention_heads"]), ffn_dim=int(t["intermediate_size"]),
            max_positions=int(t["max_position_embeddings"]), ln_eps=text_eps,
            dropout=float(t["hidden_dropout_prob"]), attention_dropout=float(t["attention_probs_dropout_prob"]),
            pad_id=int(t["pad_token_id"]), initializer_range=float(t["initializer_range"]),
        ),
        init_temperature=float(d.get("logit_scale_init_value", INIT_TEMPERATURE)),
    )


def dual_encoder_config_to_paddlenlp(cfg: DualEncoderConfig) -> dict[str, Any]:
    """A PaddleNLP ``ErnieViLConfig`` ``config.json`` dict for ``cfg`` (plus our exact config under
    ``ernievil2_model_config``, which PaddleNLP keeps as an extra attribute)."""
    v, t = cfg.vision, cfg.text
    return {
        "architectures": ["ErnieViLModel"],
        "model_type": "ernie_vil",
        "logit_scale_init_value": cfg.init_temperature,
        "text_config": {
            "model_type": "ernie_vil_text_model",
            "vocab_size": t.vocab_size, "hidden_size": t.width, "num_hidden_layers": t.layers,
            "num_attention_heads": t.heads, "intermediate_size": t.ffn_dim, "hidden_act": "gelu",
            "hidden_dropout_prob": t.dropout, "attention_probs_dropout_prob": t.attention_dropout,
            "max_position_embeddings": t.max_positions, "type_vocab_size": 0, "task_type_vocab_size": 3,
            "use_task_id": False, "initializer_range": t.initializer_range, "pad_token_id": t.pad_id,
            "layer_norm_eps": t.ln_eps,
        },
        "vision_config": {
            "model_type": "ernie_vil_vision_model",
            "hidden_size": v.width, "intermediate_size": v.mlp_dim, "num_hidden_layers": v.layers,
            "num_attention_heads": v.heads, "num_channels": 3, "image_size": v.image_size,
            "patch_size": v.patch_size, "hidden_act": "quick_gelu", "layer_norm_eps": v.ln_eps,
            "dropout": 0.0, "attention_dropout": 0.0,
        },
        EMBEDDED_CONFIG_KEY: asdict(cfg),
    }


def _layer_count(state: Mapping[str, Any], prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    idx = {int(m.group(1)) for k in state for m in [pat.match(k)] if m}
    return max(idx) + 1 if idx else 0


def _default_heads(width: int, tower: str) -> int:
    if width not in DEFAULT_HEADS:
        raise ValueError(
            f"cannot infer the number of {tower} attention heads from the weights (width {width}; known: "
            f"{DEFAULT_HEADS}); pass config=DualEncoderConfig(...) describing the architecture"
        )
    return DEFAULT_HEADS[width]


def infer_config(
    state: Mapping[str, np.ndarray], vision_ln_eps: float = 1e-6, text_ln_eps: float = 1e-5
) -> DualEncoderConfig:
    """The architecture of an (our-named) state dict, read off its shapes. Heads follow the width
    (768 → 12, 1024 → 16); other widths need an explicit config. Defaults for the LayerNorm eps
    are the official release's (ViT 1e-6, ERNIE 1e-5)."""
    need = ["vision.patch_embed.weight", "vision.positional_embedding", "vision.blocks.0.fc1.weight",
            "text.word_emb.weight", "text.pos_emb.weight", "text.blocks.0.ffn_i.weight"]
    absent = [k for k in need if k not in state]
    if absent:
        raise ValueError(f"cannot infer the architecture: missing {absent}")
    patch = state["vision.patch_embed.weight"]  # [w, 3, p, p]
    width, p = int(patch.shape[0]), int(patch.shape[-1])
    n_pos = int(state["vision.positional_embedding"].shape[0])
    grid = math.isqrt(max(n_pos - 1, 0))
    if grid * grid != n_pos - 1:
        raise ValueError(f"vision.positional_embedding has {n_pos} rows: not 1 + a square number of patches")
    word = state["text.word_emb.weight"]
    t_width = int(word.shape[1])
    return DualEncoderConfig(
        vision=VisionConfig(
            image_size=grid * p, patch_size=p, width=width, layers=_layer_count(state, "vision.blocks."),
            heads=_default_heads(width, "vision"), mlp_dim=int(state["vision.blocks.0.fc1.weight"].shape[1]),
            ln_eps=vision_ln_eps,
        ),
        text=TextConfig(
            vocab_size=int(word.shape[0]), width=t_width, layers=_layer_count(state, "text.blocks."),
            heads=_default_heads(t_width, "text"), ffn_dim=int(state["text.blocks.0.ffn_i.weight"].shape[1]),
            max_positions=int(state["text.pos_emb.weight"].shape[0]), ln_eps=text_ln_eps,
        ),
    )
