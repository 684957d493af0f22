"""Data-parallel plumbing: process-group set-up, a feature gather that keeps gradients, guards.

Under ``python -m paddle.distributed.launch`` the rank and world size come from
``PADDLE_TRAINER_ID`` / ``PADDLE_TRAINERS_NUM`` (``RANK``/``WORLD_SIZE`` are not set, and
are ignored: the process group ``init_parallel_env()`` joins is Paddle's). :func:`dist_info` is the
one reader of those variables: the training loop, the evaluators, the data pipeline (which splits
shards by rank) and ``launch/train.py`` all ask it. In a single process nothing here calls a
collective: ``init_parallel_env()`` would do nothing and any collective would raise, so every
helper checks the world size first.

Why the gather needs its own backward (docs/DISTRIBUTED.md, "What is guaranteed"):
``paddle.distributed.all_gather`` returns tensors without gradient, so the negatives from other
ranks would train nothing. :class:`AllGatherWithGrad` concatenates the features of all ranks in
forward; in backward it sums the incoming gradient over ranks (every rank's loss may use every
rank's features) and returns this rank's slice. With the local loss of :mod:`ernievil2.losses`
(each rank: its own rows against all columns, the job's loss being the mean over ranks) the
gradient of this rank's features is then ``W · dL/dx``, and
``paddle.DataParallel``, which *averages* parameter gradients over ranks (Paddle 3.3.1, checked by
``tests/test_distributed.py``), turns it into exactly the single-process gradient ``dL/dθ`` of the
global batch. The global variant (every rank computes the full ``W·B × W·B`` loss) gives the same
per-rank ``W · dL/dx`` and hence the same result; see :class:`ernievil2.losses.LossConfig`.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import paddle
import paddle.distributed as dist
from paddle.autograd import PyLayer

from ernievil2.losses import FeatureExchange


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def dist_info() -> DistInfo:
    """This process's place in the job, from the Paddle launcher's environment (no set-up): rank
    ``PADDLE_TRAINER_ID`` (default 0), world size ``PADDLE_TRAINERS_NUM`` (default 1), local rank
    ``PADDLE_LOCAL_RANK``, else ``PADDLE_RANK_IN_NODE``, else the rank. The only reader of these
    variables; ``ValueError`` when they are inconsistent."""
    env = os.environ
    world = int(env.get("PADDLE_TRAINERS_NUM", "1"))
    rank = int(env.get("PADDLE_TRAINER_ID", "0"))
    local = int(env.get("PADDLE_LOCAL_RANK", env.get("PADDLE_RANK_IN_NODE", str(rank))))
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"invalid PADDLE_TRAINER_ID={rank} / PADDLE_TRAINERS_NUM={world}")
    return DistInfo(rank, world, local)


def init_distributed() -> DistInfo:
    """Join the process group when the launcher started several ranks; idempotent.

    World size 1 (a plain ``python launch/train.py``, or the launcher with one process) calls no
    paddle.distributed function at all.
    """
    info = dist_info()
    if info.distributed and not dist.is_initialized():
        dist.init_parallel_env()
    return info


def barrier() -> None:
    """Wait for every rank; a no-op in a single process."""
    if dist_info().distributed:
        dist.barrier()


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Run the block on rank 0 first, then on the other ranks (which may reuse what rank 0 made,
    e.g. a cached data set on a shared file system). A no-op in a single process."""
    info = dist_info()
    if info.distributed and not info.is_main:
        dist.barrier()
    yield
    if info.distributed and info.is_main:
        dist.barrier()


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank ``src``'s ``obj`` on every rank (pickled); returns ``obj`` itself in a single process."""
    if not dist_info().distributed:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


class AllGatherWithGrad(PyLayer):
    """Concatenate ``x`` of all ranks along axis 0, keeping the gradient path to every owner.

    Forward: ``all_gather`` + ``concat`` (every rank must pass the same shape). Backward: the
    incoming gradient is all-reduced (summed) over ranks, since the loss of every rank may depend on
    this rank's rows, and this rank's slice is returned.
    """

    @staticmethod
    def forward(ctx, x: paddle.Tensor, rank: int, world_size: int) -> paddle.Tensor:
        ctx.rank, ctx.world_size = rank, world_size
        parts: list[paddle.Tensor] = []
        dist.all_gather(parts, x)
        return paddle.concat(parts, axis=0)

    @staticmethod
    def backward(ctx, grad: paddle.Tensor) -> paddle.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return paddle.split(grad, ctx.world_size, axis=0)[ctx.rank]


class DistributedExchange(FeatureExchange):
    """Features cross ranks through :class:`AllGatherWithGrad`; sums through ``all_reduce``.

    At world size 1 it behaves exactly like the base :class:`FeatureExchange` and calls no collective.
    """

    def __init__(self, info: Optional[DistInfo] = None):
        info = info or dist_info()
        self.rank, self.world_size = info.rank, info.world_size

    def gather(self, x: paddle.Tensor) -> paddle.Tensor:
        if self.world_size == 1:
            return x
        return AllGatherWithGrad.apply(x, self.rank, self.world_size)

    def sum(self, x: paddle.Tensor) -> paddle.Tensor:
        if self.world_size == 1:
            return x
        out = x.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    def gather_values(self, x: paddle.Tensor) -> paddle.Tensor:
        if self.world_size == 1:
            return x
        parts: list[paddle.Tensor] = []
        dist.all_gather(parts, x.detach())
        return paddle.concat(parts, axis=0)


def parameter_digest(model: paddle.nn.Layer) -> str:
    """SHA-256 (hex, 16 digits) of every parameter's bytes, in ``named_parameters`` order."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode("utf-8"))
        h.update(np.ascontiguousarray(p.numpy()).tobytes())
    return h.hexdigest()[:16]


def check_parameters_in_sync(model: paddle.nn.Layer) -> str:
    """Compare :func:`parameter_digest` across ranks; raises ``RuntimeError`` naming the ranks whose
    parameters differ from rank 0's. Returns the digest (no collective in a single process)."""
    digest = parameter_digest(model)
    info = dist_info()
    if not info.distributed:
        return digest
    everyone: list[str] = []
    dist.all_gather_object(everyone, digest)
    differ = [r for r, d in enumerate(everyone) if d != everyone[0]]
    if differ:
        raise RuntimeError(f"parameters diverged across ranks: digests {everyone} (ranks {differ} differ from rank 0)")
    return digest


def shard_range(n: int, info: DistInfo) -> tuple[int, int]:
    """Rank ``info.rank``'s contiguous slice ``[a, b)`` of ``n`` items (sizes differ by at most 1)."""
    return n * info.rank // info.world_size, n * (info.rank + 1) // info.world_size


def gather_rows(local: np.ndarray, info: DistInfo) -> np.ndarray:
    """Rows of every rank in rank order (``all_gather_object``: slices may differ in size)."""
    if not info.distributed:
        return local
    parts: list[np.ndarray] = []
    dist.all_gather_object(parts, local)
    return np.concatenate(parts)


def gather_lists(local: list, info: DistInfo) -> list:
    """Every rank's list concatenated in rank order, on every rank (``all_gather_object``)."""
    if not info.distributed:
        return list(local)
    parts: list[list] = []
    dist.all_gather_object(parts, list(local))
    return [x for part in parts for x in part]


def first_error(error: Optional[str], info: DistInfo) -> Optional[str]:
    """The first rank's error, on every rank (``all_gather_object``), so that all ranks stop alike."""
    if not info.distributed:
        return error
    errors: list[Optional[str]] = []
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e is not None), None)
