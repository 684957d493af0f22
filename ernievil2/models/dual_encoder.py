"""The ERNIE-ViL 2.0 dual encoder: ViT + ERNIE in one embedding space with a learnable temperature."""
from __future__ import annotations

import math
from typing import Sequence, Union

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from .attention import resolve_backend
from .config import DualEncoderConfig
from .text import ErnieTextEncoder
from .vision import VisionTransformer

MAX_LOGIT_SCALE = 100.0


class ErnieViL2(nn.Layer):
    """Dual encoder; ``encode_image``/``encode_text`` return L2-normalised embeddings."""

    def __init__(self, cfg: DualEncoderConfig):
        super().__init__()
        self.cfg = cfg
        backend = resolve_backend(cfg.attention)
        self.vision = VisionTransformer(cfg.vision, backend)
        self.text = ErnieTextEncoder(cfg.text, backend)
        self.temperature = self.create_parameter(
            [1], default_initializer=nn.initializer.Constant(cfg.init_temperature)
        )

    def encode_image(self, pixels: paddle.Tensor, normalize: bool = True, patch_dropout: float = 0.0) -> paddle.Tensor:
        """Image embeddings of ``pixels`` [B, 3, H, W]; ``patch_dropout`` applies in training only."""
        emb = self.vision(pixels, patch_dropout)
        return F.normalize(emb, axis=-1) if normalize else emb

    def encode_text(self, input_ids: paddle.Tensor, normalize: bool = True) -> paddle.Tensor:
        emb = self.text(input_ids)
        return F.normalize(emb, axis=-1) if normalize else emb

    def set_recompute(self, enabled: bool) -> None:
        """Recompute every transformer block of both towers in backward (saves activation memory)."""
        self.vision.recompute = self.text.recompute = bool(enabled)

    @property
    def logit_scale(self) -> paddle.Tensor:
        """``exp(t)``: the factor applied to cosine similarities."""
        return self.temperature.exp()

    @paddle.no_grad()
    def clamp_logit_scale(self, max_scale: float = MAX_LOGIT_SCALE) -> None:
        """Clamp ``t`` in place so the logit scale stays ≤ ``max_scale`` (call after each step)."""
        self.temperature.set_value(paddle.clip(self.temperature, 0.0, math.log(max_scale)))

    def forward(self, pixels: Union[None, paddle.Tensor, Sequence[paddle.Tensor]] = None,
                input_ids: Union[None, paddle.Tensor, Sequence[paddle.Tensor]] = None, with_logit_scale: bool = True,
                patch_dropout: Union[float, Sequence[float]] = 0.0):
        """``(image embeddings, text embeddings, logit scale)``; an embedding is ``None`` when its
        input is, the logit scale when ``with_logit_scale`` is false. ``pixels`` may be a list of
        image groups (e.g. views at different resolutions), each its own tower pass with its own
        ``patch_dropout`` (a list of the same length), the embeddings concatenated in order; so may
        ``input_ids`` (e.g. texts of different lengths, each group trimmed to its own). The
        trainer goes through ``forward`` so that ``paddle.DataParallel`` sees it; every tensor it
        returns must then receive a gradient, hence the option to leave out a logit scale the loss
        does not use."""
        image = None
        if isinstance(pixels, paddle.Tensor):
            image = self.encode_image(pixels, patch_dropout=float(patch_dropout))
        elif pixels is not None:
            drops = [float(patch_dropout)] * len(pixels) if isinstance(patch_dropout, (int, float)) else list(patch_dropout)
            if len(drops) != len(pixels):
                raise ValueError(f"{len(pixels)} image groups but {len(drops)} patch dropout values")
            image = paddle.concat([self.encode_image(p, patch_dropout=d) for p, d in zip(pixels, drops)])
        text = None
        if isinstance(input_ids, paddle.Tensor):
            text = self.encode_text(input_ids)
        elif input_ids is not None:
            text = paddle.concat([self.encode_text(ids) for ids in input_ids])
        return image, text, self.logit_scale if with_logit_scale else None


def build_model(cfg: DualEncoderConfig) -> ErnieViL2:
    """Build a randomly initialised dual encoder from its configuration."""
    return ErnieViL2(cfg)
