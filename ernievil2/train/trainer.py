"""The training loop: forward the views the loss needs, step, log, evaluate, save.

Several ranks (``python -m paddle.distributed.launch``): the model is wrapped in
``paddle.DataParallel`` (which averages parameter gradients over ranks; with the loss's
gather-with-gradient that is the single-process gradient of the global batch, see
:mod:`ernievil2.distributed`), logged loss values are averaged over ranks, and only rank 0
evaluates and writes checkpoints (the run logger of the other ranks writes no file).
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
import paddle

from ernievil2.checkpoint import save_checkpoint
from ernievil2.data.loader import TrainData
from ernievil2.distributed import DistInfo, check_parameters_in_sync
from ernievil2.evaluation import Evaluator, trim_padding
from ernievil2.losses import MultiViewLoss
from ernievil2.models import ErnieViL2
from ernievil2.train.loggers import RunLogger

log = logging.getLogger("ernievil2")

IMAGE_VIEWS = ("image", "image_view1", "image_view2")
TEXT_VIEWS = {"caption": "caption_ids", "text_view": "text_view_ids", "objects": "objects_ids"}


def _tensor(x: Any) -> paddle.Tensor:
    return x if isinstance(x, paddle.Tensor) else paddle.to_tensor(np.asarray(x))


def unwrap(model: paddle.nn.Layer) -> ErnieViL2:
    """The dual encoder inside a ``paddle.DataParallel`` wrapper (or the model itself)."""
    return model._layers if isinstance(model, paddle.DataParallel) else model


def encode_views(
    model: ErnieViL2 | paddle.DataParallel, batch: dict, views: Sequence[str], with_logit_scale: bool = True
) -> tuple[dict[str, paddle.Tensor], Optional[paddle.Tensor]]:
    """Embed the requested views in one ``model(pixels, ids)`` call: all image views go through
    the image tower together, all text views through the text tower together (padding columns
    trimmed). Returns the features by view and the logit scale (None unless ``with_logit_scale``).
    Going through ``forward`` lets a ``paddle.DataParallel`` wrapper prepare its gradient
    all-reduce."""
    img_keys = [v for v in IMAGE_VIEWS if v in views]
    txt_keys = [v for v in TEXT_VIEWS if v in views]
    pixels = paddle.concat([_tensor(batch[k]) for k in img_keys]) if img_keys else None
    ids = None
    if txt_keys:
        ids = np.concatenate([np.asarray(_tensor(batch[TEXT_VIEWS[k]]).numpy()) for k in txt_keys])
        ids = paddle.to_tensor(trim_padding(ids, unwrap(model).cfg.text.pad_id))
    image_emb, text_emb, logit_scale = model(pixels, ids, with_logit_scale=with_logit_scale)
    feats: dict[str, paddle.Tensor] = {}
    if img_keys:
        feats.update(zip(img_keys, paddle.split(image_emb, len(img_keys))))
    if txt_keys:
        feats.update(zip(txt_keys, paddle.split(text_emb, len(txt_keys))))
    return feats, logit_scale


def global_grad_norm(model: paddle.nn.Layer) -> float:
    sq = [float((p.grad.astype("float32") ** 2).sum()) for p in model.parameters() if p.grad is not None]
    return math.sqrt(sum(sq))


class Trainer:
    """Runs ``max_steps`` optimizer steps over ``data.batches(epoch)``; evaluators run every
    ``eval_every`` steps (0: never mid-run) and at the end; a checkpoint is written at the end.

    ``dist`` (default: one process) with ``world_size > 1`` wraps ``model`` in
    ``paddle.DataParallel``; ``data`` must then yield this rank's share of the data, and the
    evaluators, the checkpoint and the logger's files are rank 0's business (pass no evaluators
    and a non-writing logger elsewhere). Parameters are checked to be identical on all ranks at
    the end (a digest comparison; :func:`ernievil2.distributed.check_parameters_in_sync`).
    """

    def __init__(
        self,
        model: ErnieViL2,
        loss: MultiViewLoss,
        optimizer: paddle.optimizer.Optimizer,
        scheduler: paddle.optimizer.lr.LRScheduler,
        data: TrainData,
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
        dist: Optional[DistInfo] = None,
    ):
        self.model, self.loss, self.optimizer, self.scheduler = model, loss, optimizer, scheduler
        self.dist = dist or DistInfo()
        if self.dist.world_size != loss.exchange.world_size:
            raise ValueError(f"{self.dist.world_size} rank(s) but the loss exchanges features over "
                             f"{loss.exchange.world_size}: build the loss with DistributedExchange")
        self.forward_model: paddle.nn.Layer = model
        if self.dist.distributed:
            views = loss.required_views
            both_towers = any(v in IMAGE_VIEWS for v in views) and any(v in TEXT_VIEWS for v in views)
            # A tower (or the temperature) the loss does not use gets no gradient: DataParallel
            # must then look for such parameters in every step.
            self.forward_model = paddle.DataParallel(
                model, find_unused_parameters=not (both_towers and loss.uses_logit_scale))
        self.data, self.evaluators, self.logger = data, list(evaluators), logger
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
        """Forward and backward of one batch (gradients all-reduced over ranks); returns the loss
        and its terms, averaged over ranks: the values of the global batch's loss."""
        uses_scale = self.loss.uses_logit_scale
        feats, logit_scale = encode_views(self.forward_model, batch, self.loss.required_views, uses_scale)
        mask = _tensor(batch["has_objects"]) if "objects" in feats else None
        out = self.loss(feats, logit_scale if uses_scale else self.model.logit_scale.detach(), mask)
        out["loss"].backward()
        values = paddle.stack([v.detach().reshape([]) for v in out.values()])
        ex = self.loss.exchange
        values = (ex.sum(values) / ex.world_size).numpy()
        return {k: float(v) for k, v in zip(out, values)}

    def _agree(self, flag: bool) -> bool:
        """True when ``flag`` is true on any rank (so that all ranks stop at the same step)."""
        if not self.dist.distributed:
            return flag
        return bool(self.loss.exchange.sum(paddle.to_tensor([1.0 if flag else 0.0])).item() > 0)

    def fit(self) -> list[dict]:
        """Train; returns the evaluation records of the final evaluation."""
        start = time.perf_counter()
        window_start, window_samples = start, 0
        epoch = 0
        self.model.train()
        final: list[dict] = []
        while self.step < self.max_steps:
            got_batch = False
            for batch in self.data.batches(epoch):
                got_batch = True
                terms = self.train_step(batch)
                grad_norm = global_grad_norm(self.model) if (self.step + 1) % self.log_every == 0 else None
                self.optimizer.step()
                self.optimizer.clear_grad()
                self.model.clamp_logit_scale()
                lr = self.scheduler.get_lr()
                self.scheduler.step()
                self.step += 1
                # Samples of the whole job (every rank steps through a batch of the same size).
                rows = int(np.asarray(batch["caption_ids"]).shape[0]) if "caption_ids" in batch else 0
                window_samples += rows * self.dist.world_size
                if grad_norm is not None:
                    now = time.perf_counter()
                    scalars = {**terms, "lr": lr, "logit_scale": self.model.logit_scale.item(),
                               "grad_norm": grad_norm, "samples_per_s": window_samples / (now - window_start),
                               "epoch": epoch}
                    self.history.append({"step": self.step, **scalars})
                    self.logger.log_train(self.step, scalars)
                    window_start, window_samples = now, 0
                out_of_time = self.max_minutes is not None and self._agree(
                    time.perf_counter() - start > 60 * self.max_minutes)
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
        if self.save_checkpoint and self.dist.is_main:
            out = save_checkpoint(self.model, self.run_dir / "checkpoints" / f"step_{self.step:07d}",
                                  self.checkpoint_files)
            log.info("checkpoint written to %s", out)
        if self.dist.distributed:
            # Also the point where the other ranks wait for rank 0's evaluation and checkpoint.
            digest = check_parameters_in_sync(self.model)
            log.info("rank %d: parameters identical on all %d ranks (digest %s)", self.dist.rank,
                     self.dist.world_size, digest)
        log.info("trained %d steps in %.1f s", self.step, time.perf_counter() - start)
        return final
