"""Shared batch slots: how loader workers hand their big fixed-shape arrays to the trainer.

``paddle.io.DataLoader`` (3.3.1) moves every numpy array of a batch from a worker to the main
process by copying it into a ``DenseTensor``, then into a new shared-memory file that the main
process maps: three copies and fresh pages on both sides for every batch. For the image views
(three ``[B, S, S, 3]`` uint8 arrays, 14 MB a batch of 32 at 224 px) that transport cost as much
as decoding the JPEGs.

:class:`BatchSlots` is one anonymous shared memory mapping made by the main process before the
loader forks its workers, so every worker writes into the same pages the main process reads.
Worker ``w`` has ``depth`` slots and writes its ``n``-th batch into slot ``n % depth``, after
waiting until the main process has taken its batch ``n - depth``; through the DataLoader it sends
only ``[w, n]``. The main process copies the arrays out of the slot (:meth:`BatchSlots.take`) as
the batch arrives, then marks it taken. The pages are reused, so they are faulted in once.

Order and deadlock: the DataLoader delivers each worker's batches in the order it made them, so a
worker waits only for a batch that is already ahead of it in the pipeline. Shutting the loader
down, the main process first calls :meth:`BatchSlots.close`: a worker waiting for a slot then
stops (paddle joins its workers without a timeout).
"""
from __future__ import annotations

import mmap
import multiprocessing
import time
from collections.abc import Mapping, Sequence

import numpy as np
import paddle

__all__ = ["SLOT_KEY", "BatchSlots", "SlotsClosed", "slots_supported"]

#: The batch key under which a worker sends ``[worker, batch number]`` instead of the slot's arrays.
SLOT_KEY = "__slot__"
_ALIGN = 64  # bytes: every array and control word starts on its own cache line


class SlotsClosed(RuntimeError):
    """The main process closed the slots (the loader is shutting down)."""


def slots_supported() -> bool:
    """Whether loader workers share memory mapped before they start (they are forked)."""
    return multiprocessing.get_start_method(allow_none=False) == "fork"


def _check(key: str, array: np.ndarray, shape: tuple[int, ...], dtype: np.dtype, what: str) -> None:
    if array.shape != tuple(shape) or array.dtype != dtype:
        raise ValueError(f"{what} {key!r} is {array.dtype} {list(array.shape)}, but the layout "
                         f"(the transform's fixed_outputs()) declares {dtype} {list(shape)}")


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


class BatchSlots:
    """``depth`` slots per worker for the arrays of ``layout`` (``{key: (shape per sample, dtype)}``)
    of batches of ``batch_size`` rows; see the module docstring."""

    def __init__(self, num_workers: int, depth: int, batch_size: int,
                 layout: Mapping[str, tuple[Sequence[int], np.dtype]]):
        if num_workers < 1 or depth < 1 or batch_size < 1 or not layout:
            raise ValueError(f"need num_workers, depth, batch_size >= 1 and a layout; got {num_workers}, {depth}, "
                             f"{batch_size}, {dict(layout)}")
        self.num_workers, self.depth, self.batch_size = int(num_workers), int(depth), int(batch_size)
        self.layout = {k: ((self.batch_size, *map(int, shape)), np.dtype(dtype)) for k, (shape, dtype) in layout.items()}
        self.offsets: dict[str, int] = {}
        size = 0
        for key, (shape, dtype) in self.layout.items():
            self.offsets[key] = size
            size += _aligned(int(np.prod(shape)) * dtype.itemsize)
        self.slot_bytes = size
        # control words: taken[w] (batches of worker w the main process took) and closed, a line each
        self._control_bytes = _ALIGN * (self.num_workers + 1)
        # MAP_SHARED | MAP_ANONYMOUS: forked children share these pages with this process
        self._mem = mmap.mmap(-1, self._control_bytes + self.num_workers * self.depth * self.slot_bytes)
        self._words = np.frombuffer(self._mem, dtype=np.int64, count=self._control_bytes // 8)
        self._stride = _ALIGN // 8

    def __reduce__(self):
        raise TypeError("BatchSlots live in memory shared by forking; they cannot be sent to another process")

    # -- control words -----------------------------------------------------------------------------
    def _taken(self, worker: int) -> int:
        return int(self._words[worker * self._stride])

    @property
    def closed(self) -> bool:
        return bool(self._words[self.num_workers * self._stride])

    def close(self) -> None:
        """Main process: stop the workers' waits (call before shutting the loader down)."""
        self._words[self.num_workers * self._stride] = 1

    # -- slots -------------------------------------------------------------------------------------
    def arrays(self, worker: int, n: int) -> dict[str, np.ndarray]:
        """The arrays of the slot that batch ``n`` of ``worker`` uses (views, not copies)."""
        if not 0 <= worker < self.num_workers:
            raise ValueError(f"worker {worker} out of range (0..{self.num_workers - 1})")
        base = self._control_bytes + (worker * self.depth + n % self.depth) * self.slot_bytes
        return {key: np.frombuffer(self._mem, dtype=dtype, count=int(np.prod(shape)),
                                   offset=base + self.offsets[key]).reshape(shape)
                for key, (shape, dtype) in self.layout.items()}

    def put(self, worker: int, n: int, samples: Sequence[Mapping[str, np.ndarray]]) -> np.ndarray:
        """Worker: write the layout's arrays of ``samples`` (batch ``n`` of ``worker``) into its slot,
        once the main process took batch ``n - depth``; returns the ``[worker, n]`` descriptor to send.
        Raises :class:`SlotsClosed` when the main process closed the slots while waiting."""
        if len(samples) != self.batch_size:
            raise ValueError(f"a slot holds batches of {self.batch_size} rows, got {len(samples)}")
        for key, out in self._wait_for(worker, n).items():
            rows = [s[key] for s in samples]
            for row in rows:
                _check(key, row, out.shape[1:], out.dtype, "sample output")
            np.stack(rows, out=out)
        return np.array([worker, n], dtype=np.int64)

    def put_batch(self, worker: int, n: int, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
        """:meth:`put` for arrays already collated (``[batch_size, ...]`` each)."""
        for key, out in self._wait_for(worker, n).items():
            _check(key, arrays[key], out.shape, out.dtype, "batch array")
            out[...] = arrays[key]
        return np.array([worker, n], dtype=np.int64)

    def _wait_for(self, worker: int, n: int) -> dict[str, np.ndarray]:
        pause = 1e-4
        while self._taken(worker) < n - self.depth + 1:
            if self.closed:
                raise SlotsClosed("the loader is shutting down")
            time.sleep(pause)
            pause = min(2 * pause, 5e-3)
        return self.arrays(worker, n)

    def take(self, descriptor: np.ndarray | paddle.Tensor) -> dict[str, paddle.Tensor]:
        """Main process: copy the arrays of the batch ``descriptor`` names out of its slot (as paddle
        CPU Tensors; the trainer moves what it needs to the device) and mark it taken. Batches of a worker must be taken in order."""
        worker, n = (int(v) for v in np.asarray(descriptor.numpy() if hasattr(descriptor, "numpy") else descriptor))
        if n != self._taken(worker):
            raise RuntimeError(f"batch {n} of loader worker {worker} arrived, expected batch {self._taken(worker)}")
        # on the host: the ids are trimmed and the photometric draws read there before anything moves
        out = {key: paddle.to_tensor(view, place=paddle.CPUPlace()) for key, view in self.arrays(worker, n).items()}
        self._words[worker * self._stride] = n + 1
        return out
