"""How the model trains across ranks and in which precision: fleet strategy, sharding, AMP, recompute.

:func:`setup_parallel` turns ``trainer.*`` settings into the objects the trainer uses:

- several ranks: ``fleet.init(is_collective=True)`` with a ``DistributedStrategy`` built by
  :func:`build_strategy`; ``sharding_stage`` 0 is plain data parallel (``paddle.DataParallel``,
  which averages gradients), 1 shards the optimizer state over the ranks (fleet's
  ``DygraphShardingOptimizer``: each rank updates its share of parameters, then broadcasts them),
  2 also shards the gradients (``group_sharded_parallel(level="os_g")``; GPU only in Paddle 3.3.1);
- one process: the model itself; no paddle.distributed call at all;
- ``amp``: ``bf16``/``fp16`` autocast at ``amp_level`` O1 (per-op lists) or O2 (weights in half
  precision, fp32 master weights in the optimizer) on GPU, with a dynamic loss scaler for fp16.
  CPU trains in fp32 (bf16 matmul kernels are missing there): a requested AMP is turned off with a
  one-line notice;
- ``recompute``: every transformer block of both towers recomputes its activations in backward.
  Data parallel's gradient hooks cannot follow the blocks' re-entrant backward passes (a parameter
  is "ready" once per pass), so with recompute the backward runs without them (``no_sync``) and
  :meth:`ParallelModel.sync_gradients` averages the gradients over the ranks afterwards, as
  PaddleNLP's trainer does.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, ContextManager, Optional

import paddle

from ernievil2.distributed import DistInfo
from ernievil2.models import ErnieViL2

log = logging.getLogger("ernievil2")

AMP_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}
MEMORY_KNOBS = ("data.batch_size (per rank)", "trainer.accum_steps (keeps the global batch)",
                "trainer.recompute=true", "trainer.sharding_stage=1 or 2", "trainer.amp=bf16 trainer.amp_level=O2")


@dataclass(frozen=True)
class Precision:
    """What autocast does: ``dtype`` None = fp32."""

    dtype: Optional[str] = None  # "bfloat16" / "float16"
    level: str = "O1"

    def autocast(self) -> ContextManager[Any]:
        if self.dtype is None:
            return contextlib.nullcontext()
        return paddle.amp.auto_cast(enable=True, level=self.level, dtype=self.dtype)


def resolve_precision(amp: str, level: str, device: Optional[str] = None) -> Precision:
    """Check ``trainer.amp``/``trainer.amp_level`` and drop AMP on CPU (with a notice)."""
    if amp not in ("none", *AMP_DTYPES):
        raise ValueError(f"trainer.amp must be none, bf16 or fp16, got {amp!r}")
    if level not in ("O1", "O2"):
        raise ValueError(f"trainer.amp_level must be O1 or O2, got {level!r}")
    if amp == "none":
        return Precision()
    device = device or paddle.get_device()
    if not device.startswith("gpu"):
        log.info("trainer.amp=%s ignored on %s: training in fp32", amp, device)
        return Precision()
    return Precision(AMP_DTYPES[amp], level)


def build_strategy(info: DistInfo, sharding_stage: int) -> "paddle.distributed.fleet.DistributedStrategy":
    """The fleet strategy of ``trainer.sharding_stage``: all ranks in one data-parallel group (0)
    or in one sharding group (1; stage 2 is applied later by ``group_sharded_parallel`` over the
    same group layout as stage 0)."""
    from paddle.distributed import fleet

    if sharding_stage not in (0, 1, 2):
        raise ValueError(f"trainer.sharding_stage must be 0, 1 or 2, got {sharding_stage}")
    strategy = fleet.DistributedStrategy()
    shard = info.world_size if sharding_stage == 1 else 1
    strategy.hybrid_configs = {"dp_degree": info.world_size // shard, "mp_degree": 1, "pp_degree": 1,
                               "sharding_degree": shard}
    return strategy


_FLEET_SHARDING_STAGE: Optional[int] = None  # the stage fleet was set up with in this process


def _init_fleet(info: DistInfo, sharding_stage: int) -> None:
    """``fleet.init`` once per process (a later call must ask for the same strategy)."""
    global _FLEET_SHARDING_STAGE
    from paddle.distributed import fleet

    if _FLEET_SHARDING_STAGE is None:
        fleet.init(is_collective=True, strategy=build_strategy(info, sharding_stage))
        _FLEET_SHARDING_STAGE = sharding_stage
    elif _FLEET_SHARDING_STAGE != sharding_stage:
        raise ValueError(f"fleet is already set up with sharding stage {_FLEET_SHARDING_STAGE}, not {sharding_stage}")


@dataclass
class ParallelModel:
    """What the trainer drives: ``forward_model`` (the model or its parallel wrapper), the
    optimizer to step, the fp16 loss scaler (or None) and the autocast precision."""

    model: ErnieViL2
    forward_model: paddle.nn.Layer
    optimizer: Any
    scaler: Optional[paddle.amp.GradScaler]
    precision: Precision
    manual_sync: bool = False  # data parallel with recompute: gradients averaged by sync_gradients()

    def no_sync(self) -> ContextManager[Any]:
        """Leave gradients local for this backward (accumulation before the last micro-batch); a
        no-op where the wrapper syncs in the optimizer step (sharding) or there is no wrapper."""
        if isinstance(self.forward_model, paddle.DataParallel):
            return self.forward_model.no_sync()
        return contextlib.nullcontext()

    def sync_gradients(self) -> None:
        """With ``manual_sync``: average every parameter gradient over the ranks (what data
        parallel does in backward), in fused buckets; else nothing to do. Parameters without
        gradient (a locked tower's: ``stop_gradient`` on every rank alike) are left out, so every
        rank fuses the same buckets."""
        if self.manual_sync:
            from paddle.distributed.fleet.utils.hybrid_parallel_util import fused_allreduce_gradients

            fused_allreduce_gradients([p for p in self.model.parameters() if not p.stop_gradient], None)

    def trainable_changed(self) -> None:
        """Parameters without gradient so far now train (a locked tower was unlocked). Data
        parallel's gradient hooks cover the parameters that were trainable when it was made, so
        from now on its gradients are averaged after backward instead (:meth:`sync_gradients`), as
        with recompute; sharded optimizers check each parameter at every step."""
        if isinstance(self.forward_model, paddle.DataParallel):
            self.manual_sync = True


def setup_parallel(model: ErnieViL2, optimizer: Any, info: DistInfo, *, sharding_stage: int = 0,
                   amp: str = "none", amp_level: str = "O1", recompute: bool = False,
                   find_unused_parameters: bool = False) -> ParallelModel:
    """Wrap ``model`` and ``optimizer`` for this job (see the module docstring)."""
    precision = resolve_precision(amp, amp_level)
    model.set_recompute(recompute)
    if sharding_stage == 2 and not paddle.get_device().startswith("gpu"):
        raise ValueError("trainer.sharding_stage=2 needs GPUs (Paddle 3.3.1 shards gradients on gpu/xpu "
                         "only); use trainer.sharding_stage=1 on CPU")
    if precision.level == "O2" and precision.dtype is not None and optimizer is not None:
        model, optimizer = paddle.amp.decorate(models=model, optimizers=optimizer, level="O2",
                                               dtype=precision.dtype, master_weight=True)
    scaler = paddle.amp.GradScaler(init_loss_scaling=2.0**15) if precision.dtype == "float16" else None
    forward_model: paddle.nn.Layer = model
    if info.distributed:
        from paddle.distributed import fleet

        _init_fleet(info, sharding_stage)
        if sharding_stage == 2:
            from paddle.distributed.sharding import group_sharded_parallel

            forward_model, optimizer, scaler = group_sharded_parallel(model, optimizer, level="os_g", scaler=scaler)
        elif sharding_stage == 0:
            # What fleet.distributed_model makes for pure data parallel, with the unused-parameter
            # search set per model (fleet's strategy would fix it once per process).
            forward_model = paddle.DataParallel(model, find_unused_parameters=find_unused_parameters)
            if scaler is not None:
                scaler = fleet.distributed_scaler(scaler)
        else:
            forward_model = fleet.distributed_model(model)
            if optimizer is not None:
                optimizer = fleet.distributed_optimizer(optimizer)
            if scaler is not None:
                scaler = fleet.distributed_scaler(scaler)
    manual_sync = recompute and isinstance(forward_model, paddle.DataParallel)
    return ParallelModel(model, forward_model, optimizer, scaler, precision, manual_sync)


def unwrap(model: paddle.nn.Layer) -> ErnieViL2:
    """The dual encoder inside a parallel wrapper (or the model itself)."""
    while not isinstance(model, ErnieViL2) and hasattr(model, "_layers"):
        model = model._layers
    return model


def is_out_of_memory(exn: BaseException) -> bool:
    """True for a device allocation failure (Paddle raises MemoryError or a ResourceExhausted error)."""
    text = f"{type(exn).__name__}: {exn}"
    return isinstance(exn, MemoryError) or "ResourceExhausted" in text or "Out of memory" in text \
        or "out of memory" in text


def out_of_memory_hint() -> str:
    """The knobs that lower memory, for the out-of-memory error message."""
    return "out of device memory; lower it with: " + "; ".join(MEMORY_KNOBS)
