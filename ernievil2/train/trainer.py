"""The training loop: forward the views the loss needs, step, log, evaluate, checkpoint, resume.

Several ranks (``python -m paddle.distributed.launch``): the model is wrapped for the job by
:func:`ernievil2.train.parallel.setup_parallel` (data parallel, which averages parameter gradients
over ranks — with the loss's gather-with-gradient that is the single-process gradient of the global
batch, see :mod:`ernievil2.distributed` — or sharded optimizer state); logged loss values are
averaged over ranks; every rank runs the evaluators (which shard the embedding work and gather),
and rank 0 alone writes logs and checkpoints (the run logger of the other ranks writes no file).

Gradient accumulation (``accum_steps = k``) keeps every negative of the ``k`` loader batches
(open_clip's scheme): the features of all ``k`` micro-batches are first computed without
gradient and cached; then each micro-batch is forwarded again with gradient, its fresh features
put in place of its cached ones, and the loss over all ``k`` micro-batches is backpropagated. The
sum of the ``k`` backward passes is the gradient of the loss over the ``k``-fold batch: each pass
carries ``dL/df_j · df_j/dθ`` for its own micro-batch ``j``. The temperature takes its gradient in
the last pass only (it would otherwise be counted ``k`` times); dropout replays the RNG state of
the caching pass; gradients stay local (``no_sync``) until the last micro-batch.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import paddle

from ernievil2.data.device_views import ViewFinisher
from ernievil2.data.loader import TrainData
from ernievil2.data.views import IMAGE_VIEWS
from ernievil2.distributed import DistInfo, check_parameters_in_sync
from ernievil2.evaluators import Evaluator
from ernievil2.losses import MultiViewLoss
from ernievil2.models import ErnieViL2
from ernievil2.train.checkpoint_manager import CheckpointManager
from ernievil2.train.config import TrainerSchema
from ernievil2.train.loggers import RunLogger
from ernievil2.train.parallel import ParallelModel, is_out_of_memory, out_of_memory_hint, setup_parallel
from ernievil2.train.schedule import EvalSchedule, ThroughputMeter, TrainClock
from ernievil2.train.step import (
    TEXT_VIEWS,
    as_device_tensor,
    bad_sample_counts,
    encode_views,
    full_precision,
    global_grad_norm,
    merge_micro_batches,
)
from ernievil2.train.towers import TowerSchedule
from ernievil2.train.training_checkpoint import TrainingState, load_training_checkpoint, write_training_checkpoint

log = logging.getLogger("ernievil2")

class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row: the run stopped."""


class Trainer:
    """Runs ``settings.max_steps`` optimizer steps over ``data.batches(epoch, skip)``.

    One step consumes ``settings.accum_steps`` loader batches. Evaluators run every
    ``eval_every`` steps and every ``eval_every_s`` training seconds (0: never mid-run) and at the
    end (``eval_at_end``); with ``settings.time_budget_s`` the run stops when that many training
    seconds (:class:`TrainClock`) are spent and the scheduler is told the elapsed seconds; checkpoints are written
    every ``settings.checkpoint_every`` steps and at the end (``save_checkpoint``), the last
    ``keep_last`` and the best by ``best_metric`` kept, with a ``latest`` pointer; ``resume``
    (``"latest"`` or a path) continues from one. A non-finite loss skips its update; after
    ``nan_patience`` in a row the run stops naming the last good checkpoint.

    ``dist`` (default: one process) with ``world_size > 1``: ``data`` must yield this rank's share
    of the data and ``logger`` must write no file except on rank 0. Parameters are checked to be
    identical on all ranks at the end (:func:`ernievil2.distributed.check_parameters_in_sync`).
    Image views arrive as uint8 pixels; ``finish_views`` (default: ImageNet mean/std) turns them
    into the model's input on the device. ``towers`` (made before the trainer: it locks towers
    before data parallel wraps the model) locks, unlocks and ramps the towers
    (:mod:`ernievil2.train.towers`); default: nothing locked.
    """

    def __init__(
        self,
        model: ErnieViL2,
        loss: MultiViewLoss,
        optimizer: Optional[paddle.optimizer.Optimizer],
        scheduler: Optional[paddle.optimizer.lr.LRScheduler],
        data: Optional[TrainData],
        evaluators: Sequence[Evaluator],
        logger: Optional[RunLogger],
        run_dir: str | Path,
        settings: Optional[TrainerSchema] = None,
        *,
        log_every: int = 20,
        eval_every: int = 0,
        eval_every_s: float = 0.0,
        eval_at_end: bool = True,
        checkpoint_files: Optional[dict] = None,
        config: Optional[dict] = None,
        dist: Optional[DistInfo] = None,
        finish_views: Optional[ViewFinisher] = None,
        towers: Optional[TowerSchedule] = None,
    ):
        self.settings = settings or TrainerSchema()
        s = self.settings
        if s.accum_steps < 1:
            raise ValueError(f"trainer.accum_steps must be >= 1, got {s.accum_steps}")
        self.model, self.loss, self.scheduler = model, loss, scheduler
        self.dist = dist or DistInfo()
        if self.dist.world_size != loss.exchange.world_size:
            raise ValueError(f"{self.dist.world_size} rank(s) but the loss exchanges features over "
                             f"{loss.exchange.world_size}: build the loss with DistributedExchange")
        self.towers = towers or TowerSchedule(model)
        if self.towers.unlock_at is not None and s.sharding_stage == 2:
            raise ValueError("optim.unlock_at needs trainer.sharding_stage 0 or 1 (stage 2 fixes the trainable "
                             "parameters when it is set up)")
        views = loss.required_views
        both_towers = any(v in IMAGE_VIEWS for v in views) and any(v in TEXT_VIEWS for v in views)
        # A tower (or the temperature) the loss does not use gets no gradient: data parallel must
        # then look for such parameters in every step.
        self.parallel: ParallelModel = setup_parallel(
            model, optimizer, self.dist, sharding_stage=s.sharding_stage, amp=s.amp, amp_level=s.amp_level,
            recompute=s.recompute, find_unused_parameters=not (both_towers and loss.uses_logit_scale))
        self.forward_model = self.parallel.forward_model
        self.optimizer = self.parallel.optimizer
        self.data, self.evaluators, self.logger = data, list(evaluators), logger
        self.finish_views = finish_views or ViewFinisher()
        self.run_dir = Path(run_dir)
        self.max_steps = s.max_steps
        self.log_every, self.eval_every, self.eval_at_end = log_every, eval_every, eval_at_end
        self.eval_every_s = float(eval_every_s)
        self.clock = TrainClock()
        self.checkpoint_files, self.config = checkpoint_files or {}, config
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", keep_last=s.keep_last,
                                             best_metric=s.best_metric, best_mode=s.best_mode)
        self.step = 0
        self.samples_seen = 0
        self.epoch = 0
        self.batches_in_epoch = 0
        self.nan_streak = 0
        self.nan_total = 0
        self.bad_samples: dict[str, int] = {}
        self.history: list[dict] = []
        self.last_checkpoint: Optional[Path] = None

    # -- one step ---------------------------------------------------------------------------------

    def train_step(self, batches: dict | Sequence[dict], progress: float = 0.0) -> dict[str, float]:
        """Forward and backward of one optimizer step's micro-batches (a batch or a list of
        ``accum_steps`` of them; gradients all-reduced over ranks once, after the last). Returns
        the loss and its terms over all micro-batches, averaged over ranks: the values of the
        global batch's loss. ``progress``: the fraction of training done (``loss.aux_from`` / ``aux_until``)."""
        micro = [batches] if isinstance(batches, dict) else list(batches)
        views = self.loss.views_at(progress)
        uses_scale = self.loss.uses_logit_scale
        b_rows = int(micro[0][TEXT_VIEWS.get(views[0], views[0])].shape[0])
        rows = {v: self.loss.rows(v, b_rows) for v in self.loss.aux_views if v in views}
        lead = min(rows.values(), default=b_rows)
        drops = self.loss.cfg.patch_dropout

        def encode(model: paddle.nn.Layer, b: dict, with_scale: bool):
            return encode_views(model, b, views, with_scale, self.finish_views, rows, drops)

        mask = tags = None
        if "objects" in views:
            with_tags = self.loss.cfg.objects_true_texts != "negative"
            merged = merge_micro_batches([{"m": as_device_tensor(b["has_objects"]), **({
                "i": as_device_tensor(b["objects_tags"]), "t": as_device_tensor(b["objects_text_tags"])} if with_tags else {})}
                for b in micro], lead)
            mask, tags = merged["m"], ((merged["i"], merged["t"]) if with_tags else None)
        precision = self.parallel.precision
        cached: list[dict[str, paddle.Tensor]] = []
        rng_states: list[Any] = []
        if len(micro) > 1:
            with paddle.no_grad():
                for b in micro:
                    rng_states.append(paddle.get_rng_state())
                    with precision.autocast():
                        feats, _ = encode(self.model, b, False)
                    cached.append({k: v.detach() for k, v in feats.items()})
        out: dict[str, paddle.Tensor] = {}
        for j, b in enumerate(micro):
            last = j == len(micro) - 1
            if rng_states:
                paddle.set_rng_state(rng_states[j])
            with (contextlib.nullcontext() if last and not self.parallel.manual_sync else self.parallel.no_sync()):
                with precision.autocast():
                    feats, scale = encode(self.forward_model, b, uses_scale and last)
                if cached:
                    feats = merge_micro_batches([feats if i == j else c for i, c in enumerate(cached)], lead)
                if scale is None:
                    scale = self.model.logit_scale.detach()
                out = self.loss(feats, full_precision(scale), mask, progress, tags)
                loss = out["loss"]
                (self.parallel.scaler.scale(loss) if self.parallel.scaler is not None else loss).backward()
        self.parallel.sync_gradients()
        values = paddle.stack([v.detach().reshape([]) for v in out.values()])
        ex = self.loss.exchange
        values = (ex.sum(values) / ex.world_size).numpy()
        return {k: float(v) for k, v in zip(out, values)}

    def _apply_update(self) -> None:
        if self.parallel.scaler is not None:
            self.parallel.scaler.step(self.optimizer)
            self.parallel.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.clear_grad()
        self.model.clamp_logit_scale()

    def train_seconds(self) -> float:
        """Training seconds so far: rank 0's clock on every rank (so that all ranks follow one
        schedule and stop at the same step)."""
        seconds = self.clock.seconds()
        if not self.dist.distributed:
            return seconds
        mine = paddle.to_tensor([seconds if self.dist.is_main else 0.0], dtype="float64")
        return float(self.loss.exchange.sum(mine).item())

    def _agree(self, flag: bool) -> bool:
        """True when ``flag`` is true on any rank (so that all ranks stop at the same step)."""
        if not self.dist.distributed:
            return flag
        return bool(self.loss.exchange.sum(paddle.to_tensor([1.0 if flag else 0.0])).item() > 0)

    # -- evaluation and checkpoints ---------------------------------------------------------------

    def evaluate(self) -> list[dict]:
        """Run every evaluator (on every rank; they shard and gather); rank 0's logger records."""
        seconds = round(self.train_seconds(), 3)
        records = [{**r, "train_seconds": seconds} for ev in self.evaluators for r in ev(self.model, self.step)]
        if self.logger is not None:
            self.logger.log_eval(records)
        return records

    def _state(self) -> TrainingState:
        return TrainingState(
            step=self.step, samples_seen=self.samples_seen,
            data_state={"epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch},
            extra={"nan_total": self.nan_total, "bad_samples": dict(self.bad_samples),
                   "wandb_run_id": getattr(self.logger, "run_id", None),
                   "world_size": self.dist.world_size, "accum_steps": self.settings.accum_steps,
                   "train_seconds": self.clock.seconds(),  # rank 0's (save runs there alone)
                   "towers": self.towers.state()},
        )

    def save(self, records: Sequence[dict] = ()) -> Optional[Path]:
        """Write a checkpoint of the current step (rank 0), keyed metrics from ``records``."""
        if not self.dist.is_main:
            return None
        metrics = {f"{r['dataset']}/{r['protocol']}/{k}": v for r in records for k, v in r.items()
                   if isinstance(v, (int, float)) and k != "step"}
        # With sharded optimizer state (stage >= 1) rank 0 holds only its share: the checkpoint
        # then carries weights and training state but no optimizer (a resume restarts its moments).
        optimizer = self.optimizer if self.settings.sharding_stage == 0 else None
        state = self._state()

        def write(tmp: Path) -> None:
            write_training_checkpoint(tmp, model=self.model, optimizer=optimizer, scheduler=self.scheduler,
                                     scaler=self.parallel.scaler, state=state, config=self.config,
                                     files=self.checkpoint_files)

        self.last_checkpoint = self.checkpoints.save(self.step, write, metrics or None)
        log.info("checkpoint written to %s", self.last_checkpoint)
        return self.last_checkpoint

    def resume(self, where: str) -> None:
        """Continue from checkpoint ``where`` (``"latest"`` = the newest in this run dir, or a
        checkpoint/run dir): weights, optimizer, scheduler, scaler, counters, data position, RNG."""
        path = self.checkpoints.resolve(where)
        optimizer = self.optimizer if self.settings.sharding_stage == 0 else None
        state = load_training_checkpoint(path, model=self.model, optimizer=optimizer, scheduler=self.scheduler,
                                         scaler=self.parallel.scaler, restore_rng=self.dist.is_main)
        if not self.dist.is_main:
            paddle.seed(self.settings.seed + self.dist.rank + 7919 * state.step)
        saved_world = state.extra.get("world_size", self.dist.world_size)
        saved_accum = state.extra.get("accum_steps", self.settings.accum_steps)
        if (saved_world, saved_accum) != (self.dist.world_size, self.settings.accum_steps):
            log.warning("resuming a run saved with %d rank(s) x accum %d on %d rank(s) x accum %d: the data "
                        "position is counted in this rank's batches, so the stream will not line up exactly",
                        saved_world, saved_accum, self.dist.world_size, self.settings.accum_steps)
        self.step, self.samples_seen = state.step, state.samples_seen
        self.epoch = int(state.data_state.get("epoch", 0))
        self.batches_in_epoch = int(state.data_state.get("batches_in_epoch", 0))
        self.nan_total = int(state.extra.get("nan_total", 0))
        self.clock = TrainClock(float(state.extra.get("train_seconds", 0.0)))
        self.bad_samples = {k: int(v) for k, v in state.extra.get("bad_samples", {}).items()}
        if self.towers.restore(state.extra.get("towers")):
            self.parallel.trainable_changed()
        self.last_checkpoint = path
        log.info("resumed from %s at step %d (epoch %d, %d batches into it)", path, self.step, self.epoch,
                 self.batches_in_epoch)

    # -- the loop ---------------------------------------------------------------------------------

    def _epoch_batches(self) -> Iterator[tuple[dict, float]]:
        """This epoch's remaining batches with the seconds spent waiting for each."""
        it = iter(self.data.batches(self.epoch, self.batches_in_epoch))
        try:
            while True:
                t0 = time.perf_counter()
                batch = next(it, None)
                if batch is None:
                    return
                yield batch, time.perf_counter() - t0
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    def _handle_non_finite(self, terms: dict[str, float]) -> None:
        self.optimizer.clear_grad()
        self.nan_total += 1
        self.nan_streak += 1
        log.warning("step %d: non-finite loss (%s): update skipped (%d in a row, %d in all)", self.step + 1,
                    ", ".join(f"{k} {v:.4g}" for k, v in terms.items()), self.nan_streak, self.nan_total)
        if self.nan_streak >= self.settings.nan_patience:
            where = self.last_checkpoint or "none written yet"
            raise NonFiniteLossError(
                f"{self.nan_streak} non-finite losses in a row at step {self.step + 1}: stopping. Last good "
                f"checkpoint: {where} (resume=PATH from it, e.g. with a lower optim.lr or trainer.amp=none)")

    def fit(self) -> list[dict]:
        """Train; returns the evaluation records of the final evaluation."""
        try:
            return self._fit()
        except Exception as exn:
            if is_out_of_memory(exn):
                raise RuntimeError(f"step {self.step + 1}: {out_of_memory_hint()}") from exn
            raise

    def _fit(self) -> list[dict]:
        s = self.settings
        start = time.perf_counter()
        self.clock.start()
        schedule = EvalSchedule(self.eval_every, self.eval_every_s, self.clock.elapsed)
        meter = ThroughputMeter(self.dist.world_size)
        seconds = self.clock.elapsed if self._needs_seconds() else None
        self.model.train()
        final: list[dict] = []
        while self.step < self.max_steps:
            got_batch = False
            resumed_mid_epoch = self.batches_in_epoch > 0
            pending: list[dict] = []
            for batch, waited in self._epoch_batches():
                got_batch = True
                self.batches_in_epoch += 1
                meter.waited(waited)
                for kind, n in bad_sample_counts(batch).items():
                    self.bad_samples[kind] = self.bad_samples.get(kind, 0) + n
                pending.append(batch)
                if len(pending) < s.accum_steps:
                    continue
                seconds = self._optimizer_step(pending, seconds, meter)
                pending = []
                if s.time_budget_s and seconds >= s.time_budget_s:
                    log.info("training-time budget of %.1f s spent at step %d: stopping", s.time_budget_s, self.step)
                    self.max_steps = self.step
                if self.step >= self.max_steps:
                    break
                with self.clock.paused():
                    records: list[dict] = []
                    if schedule.due(self.step, seconds):
                        records = self.evaluate()
                        schedule.evaluated(seconds)
                    if s.save_checkpoint and s.checkpoint_every and self.step % s.checkpoint_every == 0:
                        self.save(records)
            if self.step >= self.max_steps:
                break
            if not got_batch and not resumed_mid_epoch:
                raise RuntimeError("the training stream yielded no batch: check data.train_shards and bad-sample logs")
            self.epoch += 1
            self.batches_in_epoch = 0
        with self.clock.paused():
            if self.eval_at_end and self.evaluators:
                final = self.evaluate()
            if s.save_checkpoint:
                self.save(final)
        if self.dist.distributed:
            # Also the point where the other ranks wait for rank 0's checkpoint.
            digest = check_parameters_in_sync(self.model)
            log.info("rank %d: parameters identical on all %d ranks (digest %s)", self.dist.rank,
                     self.dist.world_size, digest)
        log.info("trained %d steps in %.1f s (%.1f s of training)", self.step, time.perf_counter() - start,
                 self.clock.elapsed)
        return final

    def _optimizer_step(self, pending: list[dict], seconds: Optional[float], meter: ThroughputMeter) -> Optional[float]:
        """One optimizer step over the ``pending`` micro-batches: forward/backward, the update (or a
        skip on a non-finite loss), the schedule, counters and the log line. Returns the training
        seconds after it (None when nothing needs them)."""
        progress = self._progress(seconds)
        self.prepare_step(progress)
        terms = self.train_step(pending, progress)
        rows = sum(int(b["caption_ids"].shape[0]) for b in pending if "caption_ids" in b)
        tagged = sum(float(np.asarray(b["has_objects"]).sum()) for b in pending if "has_objects" in b)
        grad_norm = None
        if math.isfinite(terms["loss"]):
            self.nan_streak = 0
            grad_norm = global_grad_norm(self.model) if (self.step + 1) % self.log_every == 0 else None
            self._apply_update()
        else:
            self._handle_non_finite(terms)
        lr = self.scheduler.get_lr()
        seconds = self.train_seconds() if self._needs_seconds() else None
        if self.settings.time_budget_s:
            self.scheduler.elapsed_s = seconds
        self.scheduler.step()
        self.step += 1
        self.samples_seen += rows * self.dist.world_size
        meter.stepped(rows, tagged)
        if self.step % self.log_every == 0:
            window = meter.scalars()
            scalars = {**terms, "lr": lr, **self.towers.learning_rates(lr),  # lr/<group>: layer decay, locks
                       "logit_scale": self.model.logit_scale.item(),
                       "train_seconds": self.clock.seconds(),
                       **({"aux_weight": self.loss.aux_weight(self._progress(seconds))}
                          if self.loss.cfg.aux_until is not None or self.loss.cfg.aux_from is not None else {}),
                       "grad_norm": grad_norm if grad_norm is not None else float("nan"),
                       "samples_per_s": window["samples_per_s"], "data_wait_s": window["data_wait_s"],
                       "epoch": self.epoch, "samples_seen": self.samples_seen,
                       # share of this rank's samples with object tags (the objects term's rows)
                       "objects_frac": window["objects_frac"],
                       "nonfinite_steps": self.nan_total,
                       **{f"bad/{kind}": n for kind, n in sorted(self.bad_samples.items())}}
            self.history.append({"step": self.step, **scalars})
            if self.logger is not None:
                self.logger.log_train(self.step, scalars)
        return seconds

    def prepare_step(self, progress: float) -> None:
        """Before the next step (at ``progress``, the fraction of the run done): unlock the locked
        towers when ``optim.unlock_at`` is reached (the same step on every rank: progress follows
        rank 0's clock) and set the unlocked towers' LR factors for the step."""
        if self.towers.due(progress):
            self.towers.unlock(self.step)
            self.parallel.trainable_changed()
        self.towers.prepare(self.step)

    def _needs_seconds(self) -> bool:
        return bool(self.settings.time_budget_s or self.eval_every_s)

    def _progress(self, seconds: Optional[float]) -> float:
        """Fraction of training done before the next step: of the time budget, else of max_steps."""
        budget = self.settings.time_budget_s
        if budget:
            return min(1.0, (seconds or 0.0) / budget)
        return self.step / max(1, self.settings.max_steps)

