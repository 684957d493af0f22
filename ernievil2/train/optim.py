"""AdamW with the CLIP decay rule and a cosine schedule with linear warm-up."""
from __future__ import annotations

import math

import paddle

from ernievil2.train.config import OptimSchema

EMBEDDINGS = {"word_emb", "pos_emb", "class_embedding", "positional_embedding"}


def decays(name: str, param: paddle.Tensor) -> bool:
    """Weight decay applies to matrices only: not to norms, biases, embeddings or the temperature."""
    if param.ndim < 2:
        return False  # biases, LayerNorm scales/shifts, temperature, class embedding
    return not set(name.split(".")) & EMBEDDINGS


def cosine_with_warmup(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear 0→1 over ``warmup`` steps, then cosine 1→``min_ratio`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: paddle.nn.Layer, cfg: OptimSchema, total_steps: int):
    """Returns ``(optimizer, scheduler)``; call ``scheduler.step()`` after each optimizer step."""
    scheduler = paddle.optimizer.lr.LambdaDecay(
        cfg.lr, lambda s: cosine_with_warmup(s, cfg.warmup_steps, total_steps, cfg.min_lr_ratio)
    )
    decay_names = {p.name for n, p in model.named_parameters() if decays(n, p)}
    optimizer = paddle.optimizer.AdamW(
        learning_rate=scheduler,
        beta1=cfg.beta1,
        beta2=cfg.beta2,
        epsilon=cfg.eps,
        parameters=model.parameters(),
        weight_decay=cfg.weight_decay,
        apply_decay_param_fun=lambda n: n in decay_names,
        grad_clip=paddle.nn.ClipGradByGlobalNorm(cfg.grad_clip) if cfg.grad_clip > 0 else None,
    )
    return optimizer, scheduler
