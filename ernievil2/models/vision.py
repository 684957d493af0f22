"""ViT image tower of ERNIE-ViL 2.0 (SPEC §2)."""
from __future__ import annotations

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from .attention import attention, run_block
from .config import VisionConfig


class QuickGELU(nn.Layer):
    """x · σ(1.702 x), the CLIP/ERNIE-ViL activation."""

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return x * F.sigmoid(1.702 * x)


class VisionAttention(nn.Layer):
    """Self-attention with one fused ``qkv`` projection (the official layout)."""

    def __init__(self, width: int, heads: int, backend: str):
        super().__init__()
        self.heads = heads
        self.backend = backend
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        b, n, c = x.shape
        shape = [b, n, self.heads, c // self.heads]
        q, k, v = (t.reshape(shape) for t in paddle.split(self.qkv(x), 3, axis=-1))
        out = attention(q, k, v, backend=self.backend)
        return self.proj(out.reshape([b, n, c]))


class VisionBlock(nn.Layer):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: VisionConfig, backend: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, epsilon=cfg.ln_eps)
        self.attn = VisionAttention(cfg.width, cfg.heads, backend)
        self.norm2 = nn.LayerNorm(cfg.width, epsilon=cfg.ln_eps)
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.act = QuickGELU()
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class VisionTransformer(nn.Layer):
    """Patch conv (no bias) + class token + positions → ln_pre → blocks → ln_post(class token)."""

    def __init__(self, cfg: VisionConfig, backend: str = "math"):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.patch_embed = nn.Conv2D(3, w, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias_attr=False)
        scale = w**-0.5
        self.class_embedding = self.create_parameter(
            [w], default_initializer=nn.initializer.Normal(std=scale)
        )
        self.positional_embedding = self.create_parameter(
            [cfg.num_patches + 1, w], default_initializer=nn.initializer.Normal(std=scale)
        )
        self.ln_pre = nn.LayerNorm(w, epsilon=cfg.ln_eps)
        self.blocks = nn.LayerList([VisionBlock(cfg, backend) for _ in range(cfg.layers)])
        self.ln_post = nn.LayerNorm(w, epsilon=cfg.ln_eps)
        self.recompute = False  # recompute each block's activations in backward (set_recompute)
        self._init_linears()

    def _init_linears(self) -> None:
        init = nn.initializer.TruncatedNormal(std=0.02)
        for layer in self.sublayers():
            if isinstance(layer, nn.Linear):
                init(layer.weight)
                nn.initializer.Constant(0.0)(layer.bias)

    def forward(self, pixels: paddle.Tensor) -> paddle.Tensor:
        """``pixels`` [B, 3, H, W] → image embedding [B, width] (not normalised)."""
        x = self.patch_embed(pixels)  # [B, W, h, w]
        x = x.flatten(2).transpose([0, 2, 1])  # [B, N, W]
        cls = self.class_embedding.astype(x.dtype).reshape([1, 1, -1]).expand([x.shape[0], 1, -1])
        x = paddle.concat([cls, x], axis=1) + self.positional_embedding.astype(x.dtype)
        x = self.ln_pre(x)
        for block in self.blocks:
            x = run_block(block, self.recompute, x)
        return self.ln_post(x[:, 0])
