"""Multi-head attention through Paddle's fused kernel where the device has one, exact math elsewhere."""
from __future__ import annotations

import math
from typing import Optional

import paddle
import paddle.nn.functional as F


def resolve_backend(backend: str) -> str:
    """``auto`` → ``sdpa`` (fused / flash attention) on GPU, ``math`` on CPU."""
    if backend != "auto":
        return backend
    return "sdpa" if paddle.device.is_compiled_with_cuda() and "gpu" in paddle.device.get_device() else "math"


def attention(
    q: paddle.Tensor,
    k: paddle.Tensor,
    v: paddle.Tensor,
    additive_mask: Optional[paddle.Tensor] = None,
    dropout: float = 0.0,
    training: bool = False,
    backend: str = "math",
) -> paddle.Tensor:
    """Scaled dot-product attention on ``[batch, seq, heads, head_dim]`` tensors.

    ``additive_mask`` broadcasts to ``[batch, heads, seq_q, seq_k]`` and is added to the scores
    (0 keeps a key, a large negative value drops it). Returns ``[batch, seq, heads, head_dim]``.
    """
    if backend == "sdpa":
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=additive_mask, dropout_p=dropout if training else 0.0, training=training
        )
    scale = 1.0 / math.sqrt(q.shape[-1])
    qh = q.transpose([0, 2, 1, 3])
    kh = k.transpose([0, 2, 1, 3])
    vh = v.transpose([0, 2, 1, 3])
    scores = paddle.matmul(qh * scale, kh, transpose_y=True)
    if additive_mask is not None:
        scores = scores + additive_mask
    probs = F.softmax(scores, axis=-1)
    if dropout > 0.0 and training:
        probs = F.dropout(probs, p=dropout, training=True)
    return paddle.matmul(probs, vh).transpose([0, 2, 1, 3])


def padding_mask(input_ids: paddle.Tensor, pad_id: int, dtype: str) -> paddle.Tensor:
    """Additive ``[batch, 1, 1, seq]`` mask: ``-1e4`` on padding positions (as ERNIE/PaddleNLP), 0 elsewhere."""
    return ((input_ids == pad_id).astype(dtype) * -1e4).unsqueeze([1, 2])


def run_block(block: paddle.nn.Layer, recompute: bool, *args: paddle.Tensor) -> paddle.Tensor:
    """``block(*args)``; with ``recompute`` (in training, with gradients on) its activations are not
    kept but recomputed in backward (``paddle.distributed.fleet.utils.recompute``, which also
    replays the dropout RNG state), trading one extra block forward for activation memory."""
    if recompute and block.training and paddle.is_grad_enabled():
        from paddle.distributed.fleet.utils import recompute as _recompute

        return _recompute(block, *args)
    return block(*args)
