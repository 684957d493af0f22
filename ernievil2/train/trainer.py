"""The single-process training loop: forward the views the loss needs, step, log, evaluate, save."""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
import paddle

from ernievil2.checkpoint import save_checkpoint
from ernievil2.evaluation import Evaluator, trim_padding
from ernievil2.losses import MultiViewLoss
from ernievil2.models import ErnieViL2
from ernievil2.train.loggers import RunLogger

log = logging.getLogger("ernievil2")

IMAGE_VIEWS = ("image", "image_view1", "image_view2")
TEXT_VIEWS = {"caption": "caption_ids", "text_view": "text_view_ids", "objects": "objects_ids"}


def _tensor(x: Any) -> paddle.Tensor:
    return x if isinstance(x, paddle.Tensor) else paddle.to_tensor(np.asarray(x))


def encode_views(model: ErnieViL2, batch: dict, views: Sequence[str]) -> dict[str, paddle.Tensor]:
    """Embed the requested views; all image views go through the image tower in one forward, all
    text views through the text tower in one forward (padding columns trimmed)."""
    feats: dict[str, paddle.Tensor] = {}
    img_keys = [v for v in IMAGE_VIEWS if v in views]
    if img_keys:
        emb = model.encode_image(paddle.concat([_tensor(batch[k]) for k in img_keys]))
        feats.update(zip(img_keys, paddle.split(emb, len(img_keys))))
    txt_keys = [v for v in TEXT_VIEWS if v in views]
    if txt_keys:
        ids = np.concatenate([np.asarray(_tensor(batch[TEXT_VIEWS[k]]).numpy()) for k in txt_keys])
        emb = model.encode_text(paddle.to_tensor(trim_padding(ids, model.cfg.text.pad_id)))
        feats.update(zip(txt_keys, paddle.split(emb, len(txt_keys))))
    return feats


def global_grad_norm(model: paddle.nn.Layer) -> float:
    sq = [float((p.grad.astype("float32") ** 2).sum()) for p in model.parameters() if p.grad is not None]
    return math.sqrt(sum(sq))


class Trainer:
    """Runs ``max_steps`` optimizer steps over ``batches(epoch)``; evaluators run every
    ``eval_every`` steps (0: never mid-run) and at the end; a checkpoint is written at the end."""

    def __init__(
        self,
        model: ErnieViL2,
        loss: MultiViewLoss,
        optimizer: paddle.optimizer.Optimizer,
        scheduler: paddle.optimizer.lr.LRScheduler,
        batches: Callable[[int], Iterable[dict]],
        evaluators: Sequence[Evaluator],
        logger: RunLogger,
        run_dir: str | Path,
        max_steps: int,
        log_every: int = 20,
        eval_every: int = 0,
        eval_at_end: bool = True,
        max_minutes: Optional[float] = None,
        save_checkpoint: bool = True,
        checkpoint_files: Optional[dict] = None,
    ):
        self.model, self.loss, self.optimizer, self.scheduler = model, loss, optimizer, scheduler
        self.batches, self.evaluators, self.logger = batches, list(evaluators), logger
        self.run_dir = Path(run_dir)
        self.max_steps, self.log_every, self.eval_every = max_steps, log_every, eval_every
        self.eval_at_end, self.max_minutes = eval_at_end, max_minutes
        self.save_checkpoint, self.checkpoint_files = save_checkpoint, checkpoint_files or {}
        self.step = 0
        self.history: list[dict] = []

    def evaluate(self) -> list[dict]:
        records = [r for ev in self.evaluators for r in ev(self.model, self.step)]
        self.logger.log_eval(records)
        return records

    def train_step(self, batch: dict) -> dict[str, float]:
        feats = encode_views(self.model, batch, self.loss.required_views)
        mask = _tensor(batch["has_objects"]) if "objects" in feats else None
        out = self.loss(feats, self.model.logit_scale, mask)
        out["loss"].backward()
        return {k: float(v) for k, v in out.items()}

    def fit(self) -> list[dict]:
        """Train; returns the evaluation records of the final evaluation."""
        start = time.perf_counter()
        window_start, window_samples = start, 0
        epoch = 0
        self.model.train()
        final: list[dict] = []
        while self.step < self.max_steps:
            got_batch = False
            for batch in self.batches(epoch):
                got_batch = True
                terms = self.train_step(batch)
                grad_norm = global_grad_norm(self.model) if (self.step + 1) % self.log_every == 0 else None
                self.optimizer.step()
                self.optimizer.clear_grad()
                self.model.clamp_logit_scale()
                lr = self.scheduler.get_lr()
                self.scheduler.step()
                self.step += 1
                window_samples += int(np.asarray(batch["caption_ids"]).shape[0]) if "caption_ids" in batch else 0
                if grad_norm is not None:
                    now = time.perf_counter()
                    scalars = {**terms, "lr": lr, "logit_scale": self.model.logit_scale.item(),
                               "grad_norm": grad_norm, "samples_per_s": window_samples / (now - window_start),
                               "epoch": epoch}
                    self.history.append({"step": self.step, **scalars})
                    self.logger.log_train(self.step, scalars)
                    window_start, window_samples = now, 0
                out_of_time = self.max_minutes is not None and time.perf_counter() - start > 60 * self.max_minutes
                if out_of_time:
                    log.info("time budget of %.1f min spent at step %d: stopping", self.max_minutes, self.step)
                    self.max_steps = self.step
                if self.step >= self.max_steps:
                    break
                if self.eval_every and self.step % self.eval_every == 0:
                    self.evaluate()
            if not got_batch:
                raise RuntimeError("the training stream yielded no batch: check data.train_shards and bad-sample logs")
            epoch += 1
        if self.eval_at_end and self.evaluators:
            final = self.evaluate()
        if self.save_checkpoint:
            out = save_checkpoint(self.model, self.run_dir / "checkpoints" / f"step_{self.step:07d}",
                                  self.checkpoint_files)
            log.info("checkpoint written to %s", out)
        log.info("trained %d steps in %.1f s", self.step, time.perf_counter() - start)
        return final
