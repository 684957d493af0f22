"""ERNIE 3.0 text tower of ERNIE-ViL 2.0."""
from __future__ import annotations

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from .attention import attention, padding_mask, run_block
from .config import TextConfig
from .init import init_linears


class TextAttention(nn.Layer):
    """Self-attention with separate q, k, v projections and an output projection."""

    def __init__(self, cfg: TextConfig, backend: str):
        super().__init__()
        self.heads = cfg.heads
        self.backend = backend
        self.dropout = cfg.attention_dropout
        self.q = nn.Linear(cfg.width, cfg.width)
        self.k = nn.Linear(cfg.width, cfg.width)
        self.v = nn.Linear(cfg.width, cfg.width)
        self.o = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: paddle.Tensor, mask: paddle.Tensor) -> paddle.Tensor:
        b, n, c = x.shape
        shape = [b, n, self.heads, c // self.heads]
        out = attention(
            self.q(x).reshape(shape), self.k(x).reshape(shape), self.v(x).reshape(shape),
            additive_mask=mask, dropout=self.dropout, training=self.training, backend=self.backend,
        )
        return self.o(out.reshape([b, n, c]))


class TextBlock(nn.Layer):
    """Post-LN transformer block: ln1(x + attn(x)), then ln2(x + ffn(x))."""

    def __init__(self, cfg: TextConfig, backend: str):
        super().__init__()
        self.attn = TextAttention(cfg, backend)
        self.ln1 = nn.LayerNorm(cfg.width, epsilon=cfg.ln_eps)
        self.ffn_i = nn.Linear(cfg.width, cfg.ffn_dim)
        self.ffn_o = nn.Linear(cfg.ffn_dim, cfg.width)
        self.ln2 = nn.LayerNorm(cfg.width, epsilon=cfg.ln_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: paddle.Tensor, mask: paddle.Tensor) -> paddle.Tensor:
        x = self.ln1(x + self.dropout(self.attn(x, mask)))
        return self.ln2(x + self.dropout(self.ffn_o(F.gelu(self.ffn_i(x)))))


class ErnieTextEncoder(nn.Layer):
    """Word + position embeddings → LayerNorm → post-LN blocks → ``tanh(Linear(h[:, 0]))``."""

    def __init__(self, cfg: TextConfig, backend: str = "math"):
        super().__init__()
        self.cfg = cfg
        self.word_emb = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos_emb = nn.Embedding(cfg.max_positions, cfg.width)
        self.ln = nn.LayerNorm(cfg.width, epsilon=cfg.ln_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.LayerList([TextBlock(cfg, backend) for _ in range(cfg.layers)])
        self.pooler = nn.Linear(cfg.width, cfg.width)
        self.recompute = False  # recompute each block's activations in backward (set_recompute)
        for emb in (self.word_emb, self.pos_emb):
            nn.initializer.Normal(std=cfg.initializer_range)(emb.weight)
        init_linears(self, cfg.init, std=cfg.initializer_range)

    def forward(self, input_ids: paddle.Tensor) -> paddle.Tensor:
        """``input_ids`` [B, L] (right-padded with ``pad_id``) → pooled text embedding [B, width]."""
        seq_len = input_ids.shape[1]
        if seq_len > self.cfg.max_positions:
            raise ValueError(f"text length {seq_len} exceeds max_positions {self.cfg.max_positions}")
        positions = paddle.arange(seq_len, dtype="int64").unsqueeze(0)
        x = self.dropout(self.ln(self.word_emb(input_ids) + self.pos_emb(positions)))
        mask = padding_mask(input_ids, self.cfg.pad_id, x.dtype)
        for block in self.blocks:
            x = run_block(block, self.recompute, x, mask)
        return paddle.tanh(self.pooler(x[:, 0]))
