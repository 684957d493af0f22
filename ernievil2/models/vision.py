"""ViT image tower of ERNIE-ViL 2.0, with two training-time economies: inputs at another
resolution than the native one (position embeddings resampled on the patch grid, multi-crop
style) and patch dropout (FLIP)."""
from __future__ import annotations

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from .attention import attention, run_block
from .config import VisionConfig
from .init import init_linears


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
        init_linears(self, cfg.init, std=0.02, truncated=True)

    def position_embeddings(self, grid_h: int, grid_w: int) -> paddle.Tensor:
        """``[1 + grid_h·grid_w, width]`` position embeddings for a ``grid_h × grid_w`` patch grid:
        the stored ones at the native grid, else the patch part resampled bicubically on the
        grid (the class token's row kept). The stored parameter never changes shape."""
        pos = self.positional_embedding
        native = self.cfg.image_size // self.cfg.patch_size
        if (grid_h, grid_w) == (native, native):
            return pos
        w = pos.shape[-1]
        grid = pos[1:].reshape([1, native, native, w]).transpose([0, 3, 1, 2])
        grid = F.interpolate(grid, size=[grid_h, grid_w], mode="bicubic", align_corners=False)
        return paddle.concat([pos[:1], grid.transpose([0, 2, 3, 1]).reshape([grid_h * grid_w, w])], axis=0)

    def forward(self, pixels: paddle.Tensor, patch_dropout: float = 0.0) -> paddle.Tensor:
        """``pixels`` [B, 3, H, W] (any multiple of the patch size) → image embedding [B, width]
        (not normalised). In training, ``patch_dropout`` p keeps a random
        ``max(1, round((1 - p)·N))`` of the ``N`` patch tokens of each image (FLIP), after the
        position embeddings are added; the class token is always kept. Ignored in ``eval()``."""
        x = self.patch_embed(pixels)  # [B, W, h, w]
        grid_h, grid_w = x.shape[2], x.shape[3]
        x = x.flatten(2).transpose([0, 2, 1])  # [B, N, W]
        pos = self.position_embeddings(grid_h, grid_w).astype(x.dtype)
        x = x + pos[1:]
        if self.training and patch_dropout > 0:
            x = drop_patches(x, patch_dropout)
        cls = (self.class_embedding.astype(x.dtype) + pos[0]).reshape([1, 1, -1]).expand([x.shape[0], 1, -1])
        x = self.ln_pre(paddle.concat([cls, x], axis=1))
        for block in self.blocks:
            x = run_block(block, self.recompute, x)
        return self.ln_post(x[:, 0])


def kept_patches(n: int, dropout: float) -> int:
    """How many of ``n`` patch tokens patch dropout ``dropout`` keeps: ``max(1, round((1 - p)·n))``."""
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"patch dropout must be in [0, 1), got {dropout}")
    return max(1, int(round((1.0 - dropout) * n)))


def drop_patches(x: paddle.Tensor, dropout: float) -> paddle.Tensor:
    """A random subset of :func:`kept_patches` tokens of each row of ``x`` ``[B, N, W]``, drawn
    independently per row from paddle's generator, in their original order."""
    b, n, _ = x.shape
    keep = kept_patches(n, dropout)
    if keep >= n:
        return x
    idx = paddle.argsort(paddle.rand([b, n]), axis=1)[:, :keep]
    idx = paddle.sort(idx, axis=1)
    return paddle.take_along_axis(x, idx.unsqueeze(-1).expand([b, keep, x.shape[-1]]), axis=1)
