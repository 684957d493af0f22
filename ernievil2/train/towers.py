"""Locked towers (LiT; Chinese-CLIP's first stage) and their unlocking mid-run (its second stage).

``model.vision.locked`` / ``model.text.locked`` lock a whole tower: its encoder and what ends it
(the vision tower's ``ln_post``, the text tower's ``pooler``: ERNIE-ViL 2.0 has no separate
projection heads, its towers' outputs are compared as they are, so a locked tower's head is locked
with it, and its output is used as is, as LiT uses its locked image tower's). The temperature
(logit scale) always trains, as in both of Chinese-CLIP's stages. A locked tower

- has ``stop_gradient`` parameters: autograd records nothing through it (its forward keeps no
  activations for backward and its output carries no gradient), ``paddle.DataParallel`` leaves
  them out of its gradient all-reduce, and AdamW skips them and creates no state (moments, beta
  powers) for them: they are given to the optimizer like every parameter, so that unlocking needs
  no new optimizer, but they get their state at their first update only;
- runs in eval mode while the rest trains (dropout and the vision tower's patch dropout off): a
  forward pre-hook sets it at every call, since ``model.train()`` (after an evaluation) turns
  every sublayer back on.

``optim.unlock_at`` (a fraction of the run: of ``trainer.time_budget_s`` when set, else of
``trainer.max_steps``) unlocks the locked towers before the first step at which that fraction is
done; their learning rate then ramps linearly from 0 over ``optim.unlock_warmup_steps`` steps
(``(k + 1) / W`` at the ``k``-th step after unlocking, as the main warm-up), on top of the
schedule and their layer-wise factors (:func:`ernievil2.train.optim.lr_groups`). The step of the
unlock is part of the checkpoint's state (:meth:`TowerSchedule.state`): a resumed run unlocks at
the recorded step, which matters when it was decided by the clock (not reproducible across runs).
"""
from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import paddle

from ernievil2.train.optim import TOWERS, lr_groups
from ernievil2.train.parallel import unwrap

log = logging.getLogger("ernievil2")


def _eval_mode(layer: paddle.nn.Layer, inputs: Any) -> None:
    """Forward pre-hook of a locked tower: the tower and its sublayers in eval mode."""
    for sub in layer.sublayers(include_self=True):
        sub.training = False


def locked_towers(model_cfg: Any) -> list[str]:
    """The towers ``model.vision.locked`` / ``model.text.locked`` lock, in :data:`TOWERS` order."""
    return [t for t in TOWERS if bool(getattr(getattr(model_cfg, t), "locked", False))]


class TowerSchedule:
    """Which towers train when, and at which learning-rate factor (see the module docstring).

    ``groups``: ``{parameter name: (group, LR factor)}`` of :func:`~ernievil2.train.optim.lr_groups`
    (the factors the optimizer was built with; None: the factors the parameters carry now, grouped
    by tower), for the unlock ramp and the logged learning rates. Locks the ``locked`` towers of ``model`` when made: make it before the
    model is wrapped for data parallel (which looks for trainable parameters once)."""

    def __init__(self, model: paddle.nn.Layer, locked: Sequence[str] = (), unlock_at: Optional[float] = None,
                 unlock_warmup_steps: int = 0, groups: Optional[dict[str, tuple[str, float]]] = None):
        unknown = sorted(set(locked) - set(TOWERS))
        if unknown:
            raise ValueError(f"unknown tower(s) {unknown}: choose from {list(TOWERS)}")
        if unlock_at is not None and not 0.0 < unlock_at < 1.0:
            raise ValueError(f"optim.unlock_at must be in (0, 1) (a fraction of the run), got {unlock_at}")
        if unlock_at is not None and not locked:
            raise ValueError("optim.unlock_at is set but no tower is locked (model.vision.locked / model.text.locked)")
        if unlock_warmup_steps < 0:
            raise ValueError(f"optim.unlock_warmup_steps must be >= 0, got {unlock_warmup_steps}")
        self.model = unwrap(model)
        self.locked: list[str] = [t for t in TOWERS if t in locked]
        self.unlock_at, self.warmup_steps = unlock_at, int(unlock_warmup_steps)
        self.groups = dict(groups) if groups is not None else {
            n: (n.split(".")[0], float(p.optimize_attr.get("learning_rate", 1.0))) for n, p in self.model.named_parameters()}
        self.unlocked_at_step: Optional[int] = None
        self.ramp = 1.0  # the unlocked towers' LR factor of the step last prepared
        self._hooks = {}
        for tower in self.locked:
            layer = getattr(self.model, tower)
            for p in layer.parameters():
                p.stop_gradient = True
            self._hooks[tower] = layer.register_forward_pre_hook(_eval_mode)

    @classmethod
    def from_config(cls, model: paddle.nn.Layer, model_cfg: Any, optim_cfg: Any) -> "TowerSchedule":
        """The schedule of ``model.<tower>.locked`` and ``optim.unlock_at`` / ``unlock_warmup_steps``."""
        for tower in locked_towers(model_cfg):
            if not (getattr(model_cfg, tower).init_from or model_cfg.init_from):
                log.warning("model.%s.locked=true but neither model.%s.init_from nor model.init_from is set: the "
                            "locked tower keeps its random initialisation", tower, tower)
        return cls(model, locked_towers(model_cfg), optim_cfg.unlock_at, optim_cfg.unlock_warmup_steps,
                   lr_groups(unwrap(model), optim_cfg))

    def is_locked(self, tower: str) -> bool:
        return tower in self.locked and self.unlocked_at_step is None

    def due(self, progress: float) -> bool:
        """True when the locked towers are to be unlocked before a step at ``progress`` (the
        fraction of the run done)."""
        return self.unlock_at is not None and self.unlocked_at_step is None and progress >= self.unlock_at

    def unlock(self, step: int) -> None:
        """Let the locked towers train from step ``step`` (0-based: the ``step + 1``-th step) on."""
        for tower in self.locked:
            layer = getattr(self.model, tower)
            self._hooks.pop(tower).remove()
            for p in layer.parameters():
                p.stop_gradient = False
            for sub in layer.sublayers(include_self=True):
                sub.training = self.model.training
        self.unlocked_at_step = int(step)
        log.info("step %d: %s tower(s) unlocked (LR ramped from 0 over %d steps)", step + 1,
                 " and ".join(self.locked), self.warmup_steps)

    def prepare(self, step: int) -> None:
        """Set the learning-rate factor of the unlocked towers' parameters for step ``step``
        (0-based): their group's factor times the unlock ramp."""
        if self.unlocked_at_step is None:
            return
        k = step - self.unlocked_at_step
        self.ramp = ramp = min(1.0, (k + 1) / self.warmup_steps) if self.warmup_steps > 0 else 1.0
        for name, p in self.model.named_parameters():
            if name.split(".")[0] in self.locked:
                p.optimize_attr["learning_rate"] = self.groups.get(name, (name, 1.0))[1] * ramp

    def learning_rates(self, lr: float) -> dict[str, float]:
        """``lr/<group>``: each group's learning rate at scheduler LR ``lr`` (0 while its tower is
        locked); empty when every group trains at ``lr`` (nothing locked, no factor)."""
        if not self.locked and all(f == 1.0 for _, f in self.groups.values()):
            return {}
        out: dict[str, float] = {}
        for name, (group, factor) in self.groups.items():
            tower = name.split(".")[0]
            ramp = 0.0 if self.is_locked(tower) else self.ramp if tower in self.locked else 1.0
            out[f"lr/{group}"] = lr * factor * ramp
        return out

    def state(self) -> dict[str, Any]:
        """What a checkpoint records: the towers locked at the start and the step they were unlocked at."""
        return {"locked": list(self.locked), "unlocked_at_step": self.unlocked_at_step}

    def restore(self, saved: Optional[dict]) -> bool:
        """Unlock as a checkpoint's :meth:`state` recorded; True when it unlocked."""
        step = (saved or {}).get("unlocked_at_step")
        if step is None or not self.locked or self.unlocked_at_step is not None:
            return False
        self.unlock(int(step))
        return True
