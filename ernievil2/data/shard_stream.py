"""Streaming shard samples across ranks and loader workers: :class:`ShardStream` and the pieces it
shares with :class:`ernievil2.data.loader.TrainStream` (:class:`SkipCounter`, :func:`draw_shards`,
:func:`buffer_shuffle`, :func:`too_few_shards`).

Streaming under paddle (docs/DISTRIBUTED.md, "Data across ranks"): ``wds.WebDataset``'s node/worker splitters read
``RANK``/``WORLD_SIZE`` and torch's worker info, neither of which paddle sets, so
:class:`ShardStream` does the split itself from the rank and world size of
:func:`ernievil2.distributed.dist_info` (the one reader of the launcher's variables) and
``paddle.io.get_worker_info()`` and only uses webdataset's low-level tar iterators.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import paddle

from ernievil2.distributed import dist_info

from .loader_workers import loader_worker, log_in_worker
from .sample import BadSample, RawSample
from .shard_reader import SkipCounter, list_shards, read_shard

logger = logging.getLogger(__name__)

def draw_shards(shards: Sequence[str], rng: np.random.Generator, read: Callable[[str], Iterable[Any]],
                is_good: Callable[[Any], bool] = lambda item: True) -> Iterator[Any]:
    """Endless: the items ``read(url)`` of shards drawn with replacement by ``rng``.

    Raises ``ValueError`` once every shard has been drawn and none gave a good item (``is_good``),
    instead of spinning for ever over unreadable data.
    """
    barren: set[str] = set()  # shards that gave no good item, while no shard has given one
    produced = False
    while True:
        url = shards[int(rng.integers(len(shards)))]
        for item in read(url):
            produced = produced or is_good(item)
            yield item
        if not produced:
            barren.add(url)
            if len(barren) == len(shards):
                raise ValueError(f"resampled stream: none of the {len(shards)} shard(s) yields a readable sample "
                                 f"(first: {shards[0]})")


def buffer_shuffle(items: Iterable[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    """Reservoir-style shuffle: keep ``size`` items, emit a random one as each new item arrives."""
    buf: list[Any] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = int(rng.integers(len(buf)))
        out, buf[j] = buf[j], item
        yield out
    while buf:
        j = int(rng.integers(len(buf)))
        buf[j], buf[-1] = buf[-1], buf[j]
        yield buf.pop()


def too_few_shards(n_shards: int, world: int, num_workers: int, what: str = "") -> str | None:
    """The error message when ``n_shards`` cannot feed ``world`` ranks x ``num_workers`` readers, else None."""
    consumers = world * num_workers
    if n_shards >= consumers:
        return None
    return (f"{what}{n_shards} shard(s) cannot feed {world} rank(s) x {num_workers} loader worker(s) "
            f"= {consumers} readers without reading a shard twice: write at least {consumers} shards, "
            f"use fewer loader workers (data.num_workers) or set data.resampled=true to draw shards "
            f"with replacement (an endless stream)")


class ShardStream(paddle.io.IterableDataset):
    """Stream samples from WebDataset shards, split without overlap across ranks and loader workers.

    Each ``__iter__`` (one per DataLoader worker) reads rank/world from the environment and the
    worker from ``paddle.io.get_worker_info()``, shuffles the shard list with
    ``np.random.default_rng([seed, epoch])`` (the same permutation everywhere) and takes
    ``shards[g::world * num_workers]`` with ``g = rank * num_workers + worker_id``: every shard is
    read by exactly one worker of one rank. Fewer shards than ``world * num_workers`` raises
    ``ValueError`` (never a hang; call :meth:`check_readers` in the main process before making a
    DataLoader with workers, since a worker's exception reaches the main process only as paddle's
    generic "Blocking queue is killed" ``SystemError``; the worker logs the real message).

    ``resampled=True`` (fewer shards than readers): each reader instead draws shards *with
    replacement* from the full list, with a generator seeded by ``(seed, epoch, g)``, and never
    ends. A stream whose every shard yields no sample raises ``ValueError`` instead of spinning.

    Samples are decoded with :func:`decode_sample`, optionally shuffled in a buffer of
    ``shuffle_buffer`` raw samples seeded by ``(seed, epoch, g)``, then passed to
    ``transform(sample, epoch)``; ``transform=None`` yields the RawSample. A sample whose decoding
    or transform raises ``ValueError`` is skipped and counted by kind in ``self.skips`` (a
    :class:`SkipCounter`; ``self.skipped`` is the total; per process: in a DataLoader each worker
    counts its own), the first few of each kind logged with shard and key. A damaged shard counts
    one ``truncated_tar`` and the stream moves on. This is the stream evaluation and vocab building
    read; training reads :class:`ernievil2.data.loader.TrainStream`.

    ``split_by_rank=False`` makes every rank read all shards (still split over loader workers).
    """

    def __init__(
        self,
        shards: str | Sequence[str],
        transform: Callable[[RawSample, int], dict] | None = None,
        shuffle_shards: bool = True,
        shuffle_buffer: int = 0,
        seed: int = 0,
        epoch: int = 0,
        split_by_rank: bool = True,
        resampled: bool = False,
    ) -> None:
        super().__init__()
        if seed < 0 or epoch < 0:
            raise ValueError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        self.shards = list_shards(shards)
        self.transform = transform
        self.shuffle_shards = shuffle_shards
        self.shuffle_buffer = int(shuffle_buffer)
        self.seed = int(seed)
        self.epoch = int(epoch)
        self.split_by_rank = bool(split_by_rank)
        self.resampled = bool(resampled)
        self.skips = SkipCounter()

    @property
    def skipped(self) -> int:
        """Bad samples (and damaged shards) skipped by the last iteration in this process."""
        return self.skips.total

    def __len__(self) -> int:
        # TypeError (not paddle's RuntimeError) so that list(stream) and length hints work.
        raise TypeError("a ShardStream has no length; read_sizes(stream.shards) gives the total sample count")

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch used for the shard permutation, the shuffle buffer and ``transform``."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def check_readers(self, num_workers: int, world: int | None = None) -> None:
        """Raise the ``ValueError`` of too few shards for ``world`` ranks (default: this job's) ×
        ``num_workers`` loader workers (0 = reading in the main process = 1 reader) here, in the
        calling process. A no-op when ``resampled``."""
        if self.resampled:
            return
        if world is None:
            world = dist_info().world_size if self.split_by_rank else 1
        self._check_split(world, max(int(num_workers), 1))

    def _check_split(self, world: int, num_workers: int) -> None:
        message = too_few_shards(len(self.shards), world, num_workers)
        if message:
            raise ValueError(message)

    def shards_for(self, rank: int, world: int, worker_id: int, num_workers: int) -> list[str]:
        """The shards one (rank, worker) reads this epoch, in reading order (without ``resampled``)."""
        self._check_split(world, num_workers)
        order = list(self.shards)
        if self.shuffle_shards:
            perm = np.random.default_rng([self.seed, self.epoch]).permutation(len(order))
            order = [order[i] for i in perm]
        return order[rank * num_workers + worker_id :: world * num_workers]

    def _decoded(self, shards: Iterable[str]) -> Iterator[tuple[str, RawSample]]:
        def damaged(url: str, exn: Exception) -> None:
            self.skips.add("truncated_tar", url, "-", repr(exn))

        for shard in shards:
            for key, sample in read_shard(shard, damaged):
                if isinstance(sample, BadSample):
                    self.skips.add_error(shard, key, sample)
                else:
                    yield shard, sample

    def _resampled(self, gid: int) -> Iterator[tuple[str, RawSample]]:
        """Endless: shards drawn with replacement by reader ``gid``'s own generator."""
        # The trailing 1 keeps this generator apart from the shuffle buffer's ([seed, epoch, gid]).
        rng = np.random.default_rng([self.seed, self.epoch, gid, 1])
        return draw_shards(self.shards, rng, lambda url: self._decoded([url]))

    def __iter__(self) -> Iterator[Any]:
        info = dist_info()
        rank, world = (info.rank, info.world_size) if self.split_by_rank else (0, 1)
        worker_id, num_workers = loader_worker()
        gid = rank * num_workers + worker_id
        self.skips = SkipCounter()
        if self.resampled:
            samples: Iterator[tuple[str, RawSample]] = self._resampled(gid)
        else:
            try:
                mine = self.shards_for(rank, world, worker_id, num_workers)
            except ValueError as exn:
                log_in_worker(f"rank {rank}: {exn}")
                raise
            samples = self._decoded(mine)
        if self.shuffle_buffer > 1:
            samples = buffer_shuffle(samples, self.shuffle_buffer, np.random.default_rng([self.seed, self.epoch, gid]))
        for url, sample in samples:
            if self.transform is None:
                yield sample
                continue
            try:
                out = self.transform(sample, self.epoch)
            except ValueError as exn:
                self.skips.add_error(url, sample.key, exn)
                continue
            yield out
        if self.skipped:
            logger.info("rank %d worker %d skipped %s this epoch", rank, worker_id, self.skips.by_kind())
