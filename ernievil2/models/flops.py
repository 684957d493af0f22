"""Model FLOPs of the towers and of a training step's views (matmuls only, 2 FLOPs per multiply-add;
backward counted as twice the forward, the usual MFU convention)."""
from __future__ import annotations

from typing import Optional

from ernievil2.models.config import DualEncoderConfig, TextConfig, VisionConfig


def vision_forward_flops(v: VisionConfig, image_size: Optional[int] = None, keep: float = 1.0) -> float:
    """One image through the ViT at ``image_size`` (default native), ``keep`` of its patch tokens
    kept (patch dropout; the patch embedding still sees every patch)."""
    side = (image_size or v.image_size) // v.patch_size
    patches = side * side
    n = 1 + max(1, round(keep * patches))
    blocks = v.layers * (2 * n * (4 * v.width**2 + 2 * v.width * v.mlp_dim) + 4 * n * n * v.width)
    return float(blocks + 2 * patches * 3 * v.patch_size**2 * v.width)


def text_forward_flops(t: TextConfig, tokens: int) -> float:
    """One text of ``tokens`` tokens through the ERNIE tower (and its pooler)."""
    blocks = t.layers * (2 * tokens * (4 * t.width**2 + 2 * t.width * t.ffn_dim) + 4 * tokens**2 * t.width)
    return float(blocks + 2 * t.width**2)


def view_flops_per_sample(cfg: DualEncoderConfig, views: dict[str, float], *, text_len: int,
                          aux_image_size: Optional[int] = None, patch_dropout: Optional[dict[str, float]] = None,
                          objects_len: Optional[int] = None) -> dict[str, float]:
    """Forward + backward FLOPs per training sample of each view, ``views`` mapping a view name
    (``image``, ``image_view1/2``, ``caption``, ``text_view``, ``objects``) to the share of rows that
    carry it (``loss.aux_fraction`` for the auxiliary ones). SimCLR views are at ``aux_image_size``;
    texts are ``text_len`` tokens, object-tags texts ``objects_len`` (None: ``text_len``)."""
    drops = patch_dropout or {}
    out = {}
    for view, share in views.items():
        if view.startswith("image"):
            size = aux_image_size if view != "image" else None
            f = vision_forward_flops(cfg.vision, size, 1.0 - float(drops.get(view, 0.0)))
        else:
            f = text_forward_flops(cfg.text, objects_len if view == "objects" and objects_len else text_len)
        out[view] = 3.0 * share * f
    return out
