"""AdamW with the CLIP decay rule and a cosine schedule with linear warm-up, run on steps or on
the elapsed fraction of a training-time budget; each parameter's learning-rate factor (layer-wise
decay, the temperature's own scale) rides on the parameter (:func:`lr_groups`)."""
from __future__ import annotations

import math
from typing import Optional

import paddle

from ernievil2.train.config import OptimSchema

EMBEDDINGS = {"word_emb", "pos_emb", "class_embedding", "positional_embedding"}
TOWERS = ("vision", "text")
#: The layers of each tower at depth 0 for layer-wise LR decay: its embeddings and their norm.
EMBEDDING_LAYERS = {"vision": {"patch_embed", "class_embedding", "positional_embedding", "ln_pre"},
                    "text": {"word_emb", "pos_emb", "ln"}}


def decays(name: str, param: paddle.Tensor) -> bool:
    """Weight decay applies to matrices only: not to norms, biases, embeddings or the temperature."""
    if param.ndim < 2:
        return False  # biases, LayerNorm scales/shifts, temperature, class embedding
    return not set(name.split(".")) & EMBEDDINGS


def layer_depth(tower: str, name: str, layers: int) -> int:
    """Depth of parameter ``name`` of ``tower`` (its name inside the tower, ``blocks.3.fc1.weight``)
    for layer-wise LR decay: 0 for the embeddings (:data:`EMBEDDING_LAYERS`), ``i + 1`` for block
    ``i``, ``layers + 1`` for what follows the blocks (vision ``ln_post``, text ``pooler``)."""
    parts = name.split(".")
    if parts[0] == "blocks":
        return int(parts[1]) + 1
    return 0 if parts[0] in EMBEDDING_LAYERS[tower] else layers + 1


def tower_decay(cfg: OptimSchema, tower: str) -> float:
    """The layer-wise LR decay of ``tower``: ``optim.<tower>_layer_decay``, else ``optim.layer_decay``."""
    own = getattr(cfg, f"{tower}_layer_decay", None)
    decay = cfg.layer_decay if own is None else own
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"optim layer decay of the {tower} tower must be in (0, 1], got {decay}")
    return float(decay)


def lr_groups(model: paddle.nn.Layer, cfg: OptimSchema) -> dict[str, tuple[str, float]]:
    """``{parameter name: (group, LR factor)}``: a tower parameter at depth ``d`` of ``L + 1``
    (:func:`layer_depth`) trains at ``lr · decay^(L + 1 − d)`` (:func:`tower_decay`; groups
    ``vision_emb``, ``vision_block0`` … ``vision_head``, the same for ``text``; one group named
    after the tower when it has no decay); the temperature (group ``temperature``) at
    ``lr · optim.temperature_lr_scale``."""
    out: dict[str, tuple[str, float]] = {}
    for name, _ in model.named_parameters():
        tower, _, inner = name.partition(".")
        if tower not in TOWERS:
            out[name] = ("temperature", float(cfg.temperature_lr_scale)) if name == "temperature" else (name, 1.0)
            continue
        decay, layers = tower_decay(cfg, tower), len(getattr(model, tower).blocks)
        if decay == 1.0:
            out[name] = (tower, 1.0)
            continue
        depth = layer_depth(tower, inner, layers)
        label = "emb" if depth == 0 else "head" if depth == layers + 1 else f"block{depth - 1}"
        out[name] = (f"{tower}_{label}", decay ** (layers + 1 - depth))
    return out


def cosine_with_warmup(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear 0→1 over ``warmup`` steps, then cosine 1→``min_ratio`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def cosine_on_budget(step: int, warmup: int, fraction: float, min_ratio: float) -> float:
    """LR multiplier of a run with a training-time budget: linear 0→1 over ``warmup`` steps, times
    the cosine 1→``min_ratio`` over the elapsed ``fraction`` of the budget (clipped to [0, 1]), so a
    run stopped by time has annealed like one stopped by steps, however fast its steps are."""
    ramp = (step + 1) / warmup if warmup > 0 and step < warmup else 1.0
    progress = min(1.0, max(0.0, fraction))
    return ramp * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class WarmupCosine(paddle.optimizer.lr.LRScheduler):
    """Cosine schedule with linear warm-up: over ``total_steps`` steps (:func:`cosine_with_warmup`),
    or, with ``time_budget_s``, over the training seconds the trainer reports in
    :attr:`elapsed_s` before each ``step()`` (:func:`cosine_on_budget`). ``elapsed_s`` is part of
    the state, so a resumed run continues the schedule."""

    def __init__(self, lr: float, warmup_steps: int, total_steps: int, min_ratio: float = 0.0,
                 time_budget_s: Optional[float] = None):
        if time_budget_s is not None and time_budget_s <= 0:
            raise ValueError(f"trainer.time_budget_s must be > 0, got {time_budget_s}")
        self.warmup_steps, self.total_steps, self.min_ratio = int(warmup_steps), int(total_steps), float(min_ratio)
        self.time_budget_s = time_budget_s
        self.elapsed_s = 0.0
        super().__init__(lr)

    def state_keys(self) -> None:
        self.keys = ["last_epoch", "last_lr", "elapsed_s"]

    def set_state_dict(self, state_dict: dict) -> None:
        # a checkpoint written before the time budget existed has no elapsed_s
        super().set_state_dict({"elapsed_s": 0.0, **state_dict})

    def multiplier(self, step: int) -> float:
        if self.time_budget_s is None:
            return cosine_with_warmup(step, self.warmup_steps, self.total_steps, self.min_ratio)
        return cosine_on_budget(step, self.warmup_steps, self.elapsed_s / self.time_budget_s, self.min_ratio)

    def get_lr(self) -> float:
        return self.base_lr * self.multiplier(self.last_epoch)


def build_optimizer(model: paddle.nn.Layer, cfg: OptimSchema, total_steps: int, time_budget_s: Optional[float] = None):
    """Returns ``(optimizer, scheduler)``; call ``scheduler.step()`` after each optimizer step (with a
    time budget, after setting ``scheduler.elapsed_s``). Each parameter's LR factor of
    :func:`lr_groups` (layer-wise decay, ``optim.temperature_lr_scale``) is set as its
    ``optimize_attr["learning_rate"]``, which Paddle multiplies into the scheduler's LR at every
    step (one flat parameter list: fleet's sharded optimizer takes no parameter groups). Every
    parameter is given, a locked tower's too: Paddle skips ``stop_gradient`` parameters and makes
    no state for them until they train (ernievil2.train.towers)."""
    scheduler = WarmupCosine(cfg.lr, cfg.warmup_steps, total_steps, cfg.min_lr_ratio, time_budget_s)
    decay_names = {p.name for n, p in model.named_parameters() if decays(n, p)}
    params: list = list(model.parameters())
    groups = lr_groups(model, cfg)
    for name, param in model.named_parameters():
        param.optimize_attr["learning_rate"] = groups[name][1]
    optimizer = paddle.optimizer.AdamW(
        learning_rate=scheduler,
        beta1=cfg.beta1,
        beta2=cfg.beta2,
        epsilon=cfg.eps,
        parameters=params,
        weight_decay=cfg.weight_decay,
        apply_decay_param_fun=lambda n: n in decay_names,
        grad_clip=paddle.nn.ClipGradByGlobalNorm(cfg.grad_clip) if cfg.grad_clip > 0 else None,
    )
    return optimizer, scheduler
