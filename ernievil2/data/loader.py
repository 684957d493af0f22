"""The training batches of one rank: a mix of shard sources behind a ``paddle.io.DataLoader``.

The trainer sees one interface, :class:`TrainData`:

- ``batches(epoch, skip_batches=0)`` yields the collated batches of ``epoch`` on this rank,
  leaving out the first ``skip_batches`` of them (the batches a resumed run consumed before its
  checkpoint). A batch is ``{name: array[batch, ...]}`` (paddle Tensors when read through the
  DataLoader). It may also carry ``"skipped"``: a ``dict[str, int]`` ``{kind: count}`` (kinds from
  :data:`ernievil2.data.sample.SKIP_KINDS`, only non-zero counts, plain Python ints) of the bad
  samples the loader worker that made the batch dropped since its previous batch; summed over
  batches these are all bad samples of the epoch. (Inside the DataLoader the counts travel as an
  int64 vector in ``SKIP_KINDS`` order; :meth:`ShardLoader.batches` turns it into the dict.)
- ``samples_per_epoch``: samples in one epoch of the whole job (None for an endless stream).

Where the data comes from: one or more :class:`StreamSource` (shards + mixing weight + exact or
resampled), read by :class:`TrainStream`. How a resumed epoch is made exact, given paddle 3.3.1's
DataLoader:

- With ``num_workers = W > 0`` paddle hands batch requests to the workers round-robin and yields
  the results in request order; a worker that runs out is dropped from the rotation. So the
  merged order is by rounds: round ``r`` holds the ``r``-th batch of every worker that has one
  (:func:`round_robin_skips` inverts it). ``W = 0`` is one reader.
- That order is only predictable if every worker's batch count is known in advance, whatever the
  bad samples: in exact-epoch mode worker ``w`` yields exactly ``n_w = raw_w // batch_size``
  batches, ``raw_w`` being the samples its shards hold (:mod:`ernievil2.data.epoch_sizes`). A
  worker that ends up short of good samples (bad samples, a truncated shard) tops its last
  batches up with the first good samples of its own stream again (logged); extra samples are
  dropped, as ``drop_last`` would.
- Resuming, paddle's worker ``j`` plays worker ``(j + p) % W``, ``p`` being the worker whose
  turn was next (paddle's rotation always starts at worker 0), and each replays its own stream up
  to its share of the consumed batches,
  checking samples with ``transform.validate`` (decode and limits, no views, no tokenizing, no
  collation, nothing sent to the main process) and starts yielding after them: ``batches(e, k)``
  equals ``batches(e, 0)[k:]``.
- An endless stream (every source resampled) is instead reseeded from ``skip_batches``: the
  resumed run continues with new draws rather than repeating the start of its epoch.

Transport: the outputs a transform declares fixed (``transform.fixed_outputs()``, the image views
of :class:`~ernievil2.data.views.MultiViewTransform`) travel from the workers through shared
:class:`~ernievil2.data.slots.BatchSlots` rather than through paddle's per-batch shared-memory
files; the batches the trainer sees are the same.
"""
from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import paddle

from ernievil2.data.device_views import ViewFinisher
from ernievil2.data.epoch_sizes import known_sizes
from ernievil2.data.loader_workers import ExitWithParent, collate_arrays, iterate_loader, loader_worker, log_in_worker
from ernievil2.data.reader_pass import ReaderPass
from ernievil2.data.sample import SKIP_KINDS, RawSample
from ernievil2.data.sampling import draw_shards, too_few_shards
from ernievil2.data.shard_reader import list_shards, read_shard
from ernievil2.data.skips import SkipCounter
from ernievil2.data.slots import SLOT_KEY, BatchSlots, SlotsClosed, slots_supported
from ernievil2.distributed import dist_info

logger = logging.getLogger(__name__)

Item = tuple[str, str, Any]  # (shard url, key, RawSample or the BadSample decoding raised)


class TrainData(Protocol):
    samples_per_epoch: int | None

    def batches(self, epoch: int, skip_batches: int = 0) -> Iterator[dict]:
        ...


@dataclass(frozen=True)
class StreamSource:
    """One training source: its shards, its weight in the mix and how it is read.

    ``resampled=False`` (exact epochs): every shard is read once per epoch, split over ranks and
    loader workers. ``True``: each reader draws shards with replacement, without end.
    ``num_samples``: the source's sample count, for the shards that neither a ``sizes.json`` nor an
    img2dataset ``_stats.json`` counts (:mod:`ernievil2.data.epoch_sizes`; exact sources only).
    """

    name: str
    shards: tuple[str, ...]
    weight: float = 1.0
    resampled: bool = False
    num_samples: int | None = None

    @classmethod
    def of(cls, name: str, shards: str | Sequence[str], weight: float = 1.0, resampled: bool = False,
           num_samples: int | None = None) -> StreamSource:
        """A source from a shard specification (see :func:`ernievil2.data.shard_reader.list_shards`)."""
        if not weight > 0:
            raise ValueError(f"source {name!r}: weight must be > 0, got {weight}")
        if num_samples is not None and (isinstance(num_samples, bool) or int(num_samples) != num_samples
                                        or num_samples < 1):
            raise ValueError(f"source {name!r}: num_samples must be a whole number >= 1 (or null), got {num_samples!r}")
        return cls(name, tuple(list_shards(shards)), float(weight), bool(resampled),
                   None if num_samples is None else int(num_samples))


def round_robin_skips(counts: Sequence[int], skip: int) -> tuple[list[int], int]:
    """Where paddle's DataLoader stands after its first ``skip`` batches, when loader worker ``w``
    yields ``counts[w]`` batches (round ``r`` holds the ``r``-th batch of every worker that has
    one, in worker order): how many batches of each worker were among them, and which worker makes
    the next batch (0 when none is left). ``ValueError`` when ``skip`` exceeds the total."""
    total = sum(counts)
    if skip > total:
        raise ValueError(f"cannot skip {skip} batches: the epoch has {total} on this rank ({list(counts)} by worker)")
    taken = [0] * len(counts)
    if skip == total:
        return list(counts), 0
    left = skip
    for r in itertools.count():
        for w, n in enumerate(counts):
            if n > r:
                if left == 0:
                    return taken, w
                taken[w] += 1
                left -= 1
    raise AssertionError("unreachable")


def mix(streams: Sequence[Iterator[Any]], weights: Sequence[float], endless: Sequence[bool],
        rng: np.random.Generator) -> Iterator[Any]:
    """Interleave ``streams``, picking the next one with probability proportional to its weight.

    An exhausted finite stream leaves the mix (its weight goes to the others); the mix ends when no
    finite stream is left, or never when every stream is endless. One ``rng.random()`` per pick,
    none while a single stream is left.
    """
    active = list(range(len(streams)))
    all_endless = all(endless)
    while active and (all_endless or not all(endless[i] for i in active)):
        if len(active) == 1:
            i = active[0]
        else:
            cum = np.cumsum([weights[j] for j in active])
            i = active[min(int(np.searchsorted(cum, rng.random() * cum[-1], side="right")), len(active) - 1)]
        try:
            yield next(streams[i])
        except StopIteration:
            active.remove(i)


class TrainStream(paddle.io.IterableDataset):
    """Collated training batches of this rank from a weighted mix of :class:`StreamSource`.

    Per reader (loader worker ``w`` of rank ``r``; ``g = r * W + w`` of ``R = world * W``): the
    shards of each exact source, permuted by ``(seed, epoch, source)``, are split ``[g::R]``; a
    resampled source draws shards by ``(seed, epoch, g, source)``. Samples are decoded
    (:func:`decode_sample`), the sources mixed by weight (:func:`mix`, seeded by ``(seed, epoch,
    g)``), shuffled in a buffer of ``shuffle_buffer`` samples, passed to ``transform(sample,
    epoch)`` and collated ``batch_size`` at a time. Bad samples are counted by kind and dropped
    (the first few of each kind logged with shard and key); a damaged shard counts one
    ``truncated_tar`` and the reader moves on. See the module docstring for the batch count per
    worker and resuming. :meth:`set_position` chooses the epoch and the batches to leave out.

    ``transform.validate(sample)`` (optional) must raise what ``transform`` would raise for a bad
    sample, without the work of making it; without it a resume runs ``transform`` on the samples
    it skips. ``sizes_cache``: where shard sizes counted by reading are cached (see
    :func:`ernievil2.data.epoch_sizes.known_sizes`; None: not cached).
    """

    def __init__(
        self,
        sources: Sequence[StreamSource],
        transform: Callable[[RawSample, int], dict],
        batch_size: int,
        shuffle_buffer: int = 0,
        seed: int = 0,
        split_by_rank: bool = True,
        finisher: ViewFinisher | None = None,
        sizes_cache: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        if not sources:
            raise ValueError("a training stream needs at least one source")
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique, got {names}")
        if batch_size < 1 or shuffle_buffer < 0 or seed < 0:
            raise ValueError(f"need batch_size >= 1, shuffle_buffer >= 0, seed >= 0; got {batch_size}, "
                             f"{shuffle_buffer}, {seed}")
        self.sources = list(sources)
        self.transform = transform
        self.batch_size = int(batch_size)
        self.shuffle_buffer = int(shuffle_buffer)
        self.seed = int(seed)
        self.split_by_rank = bool(split_by_rank)
        self.epoch = 0
        self.skip_batches = 0
        self.slots: BatchSlots | None = None  # set by ShardLoader for its loader workers
        self.finisher = finisher
        self.endless = all(s.resampled for s in self.sources)
        # Samples per shard of the exact sources (what fixes each worker's batch count); a shard in
        # ``estimated`` (from num_samples) is not checked for ending early.
        self.sizes, self.estimated = known_sizes(self.sources, sizes_cache)

    # ------------------------------------------------------------------ planning (any process)
    def set_position(self, epoch: int, skip_batches: int = 0) -> None:
        """Read ``epoch`` next, leaving out its first ``skip_batches`` batches on this rank."""
        if epoch < 0 or skip_batches < 0:
            raise ValueError(f"epoch and skip_batches must be >= 0, got {epoch}, {skip_batches}")
        self.epoch, self.skip_batches = int(epoch), int(skip_batches)

    def _rank_world(self) -> tuple[int, int]:
        if not self.split_by_rank:
            return 0, 1
        info = dist_info()
        return info.rank, info.world_size

    def check_readers(self, num_workers: int, world: int | None = None) -> None:
        """``ValueError`` unless every exact source has a shard for each of ``world`` (default:
        this job's) ranks x ``num_workers`` loader workers (0 counts as 1)."""
        world = self._rank_world()[1] if world is None else world
        for src in self.sources:
            message = None if src.resampled else too_few_shards(len(src.shards), world, max(int(num_workers), 1),
                                                                f"source {src.name!r}: ")
            if message:
                raise ValueError(message)

    def _exact_shards(self, index: int, epoch: int, gid: int, readers: int) -> list[str]:
        src = self.sources[index]
        world = self._rank_world()[1]
        message = too_few_shards(len(src.shards), world, max(readers // world, 1), f"source {src.name!r}: ")
        if message:
            raise ValueError(message)
        perm = np.random.default_rng([self.seed, epoch, index]).permutation(len(src.shards))
        return [src.shards[i] for i in perm[gid::readers]]

    def reader_rng(self, epoch: int, gid: int, purpose: int, salt: int, *extra: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch, gid, purpose, salt, *extra])

    def raw_samples(self, epoch: int, gid: int, readers: int, salt: int = 0) -> int:
        """Raw samples reader ``gid`` of ``readers`` takes from its sources in ``epoch`` (exact mode)."""
        counts = [sum(self.sizes[u] for u in self._exact_shards(i, epoch, gid, readers))
                  for i, s in enumerate(self.sources) if not s.resampled]
        if all(not s.resampled for s in self.sources):
            return sum(counts)
        # Exact and resampled sources mixed: replay the mixer's draws over the counts.
        it = iter(counts)
        streams = [itertools.repeat(None) if s.resampled else itertools.repeat(None, next(it)) for s in self.sources]
        return sum(1 for _ in self._mix(streams, epoch, gid, salt))

    def batches_of_rank(self, epoch: int, num_workers: int) -> list[int] | None:
        """Batches each loader worker of this rank yields in ``epoch``; None for an endless stream."""
        if self.endless:
            return None
        rank, world = self._rank_world()
        nw = max(int(num_workers), 1)
        return [self.raw_samples(epoch, rank * nw + w, world * nw) // self.batch_size for w in range(nw)]

    def samples_per_epoch(self, num_workers: int, world: int | None = None) -> int | None:
        """Raw samples one epoch reads over the whole job (``world`` ranks, default this job's, x
        ``num_workers``); None for an endless stream. Exact sources alone: the samples of their shards."""
        if self.endless:
            return None
        if all(not s.resampled for s in self.sources):
            return sum(self.sizes[u] for s in self.sources for u in s.shards)
        readers = (self._rank_world()[1] if world is None else world) * max(int(num_workers), 1)
        return sum(self.raw_samples(0, g, readers) for g in range(readers))

    # ------------------------------------------------------------------ reading (in the reader)
    def _mix(self, streams: Sequence[Iterator[Any]], epoch: int, gid: int, salt: int) -> Iterator[Any]:
        return mix(streams, [s.weight for s in self.sources], [s.resampled for s in self.sources],
                   self.reader_rng(epoch, gid, 2, salt))

    def raw_items(self, epoch: int, gid: int, readers: int, salt: int, skips: SkipCounter) -> Iterator[Item]:
        """One pass over this reader's raw samples, decoded (bad ones as their BadSample), mixed."""

        def damaged(url: str, exn: Exception) -> None:
            skips.add_damage(url, exn if isinstance(exn, ValueError) else repr(exn))

        def read(url: str) -> Iterator[Item]:
            for key, sample in read_shard(url, damaged, None if url in self.estimated else self.sizes.get(url)):
                yield url, key, sample

        streams: list[Iterator[Item]] = []
        for i, src in enumerate(self.sources):
            if src.resampled:
                streams.append(draw_shards(list(src.shards), self.reader_rng(epoch, gid, 1, salt, i), read,
                                           is_good=lambda item: isinstance(item[2], RawSample)))
            else:
                streams.append(itertools.chain.from_iterable(map(read, self._exact_shards(i, epoch, gid, readers))))
        return self._mix(streams, epoch, gid, salt)

    def transform_aux_rows(self) -> int | None:
        """Leading rows of each batch that get the transform's auxiliary views (None: every row)."""
        return getattr(self.transform, "aux_rows", None)

    def __iter__(self) -> Iterator[dict]:
        rank, world = self._rank_world()
        wid, nw = loader_worker()
        gid, readers = rank * nw + wid, world * nw
        epoch, skip = self.epoch, self.skip_batches
        try:
            if self.endless:
                n_batches, done, salt = None, 0, skip
            else:
                if skip:
                    counts = self.batches_of_rank(epoch, nw) or []
                    taken, first = round_robin_skips(counts, skip)
                    role = (wid + first) % nw
                    gid = rank * nw + role
                    n_batches, done = counts[role], taken[role]
                else:
                    n_batches, done = self.raw_samples(epoch, gid, readers) // self.batch_size, 0
                salt = 0
        except ValueError as exn:
            log_in_worker(f"rank {rank}: {exn}")
            raise
        reader = ReaderPass(self, epoch, gid, readers, salt,
                             None if n_batches is None else n_batches * self.batch_size)
        reader.checking = done > 0
        reader.take(done * self.batch_size)
        reader.checking = False
        reader.skips.take()  # the skipped batches' bad samples were reported before the checkpoint
        slots = self.slots if paddle.io.get_worker_info() is not None else None
        sent = 0
        while n_batches is None or done < n_batches:
            samples = reader.take(self.batch_size)
            if len(samples) < self.batch_size:
                break
            try:
                batch = self._ship(samples, slots, wid, sent)
            except SlotsClosed:
                return
            batch["skipped"] = reader.skips.take()
            done += 1
            sent += 1
            yield batch
        # The bad data of the samples left unread (e.g. a damaged end of shard) is still reported:
        # check them without making views, then send the counts alone (ShardLoader.batches adds
        # them to a batch; a count-only item does not disturb the order of the batches).
        reader.checking = True
        while not reader.first_pass_done and reader.take(1):
            pass
        pending = reader.skips.take()
        if pending.any():
            yield {"skipped": pending}

    def _ship(self, samples: list[dict], slots: BatchSlots | None, worker: int, n: int) -> dict:
        """Batch ``n`` of this reader as it leaves it: finished by ``finisher`` when set, its fixed
        arrays written into ``slots`` (only their ``[worker, n]`` left in the batch) when given."""
        if self.finisher is None:
            if slots is None:
                return collate_arrays(samples)
            descriptor = slots.put(worker, n, samples)
            batch = collate_arrays([{k: v for k, v in s.items() if k not in slots.layout} for s in samples])
        else:
            aux_rows = self.transform_aux_rows()
            rows = {} if aux_rows is None else {v: aux_rows for v in getattr(self.transform, "aux_views", ())}
            batch = self.finisher.finish_batch(collate_arrays(samples), rows)
            if slots is None:
                return batch
            descriptor = slots.put_batch(worker, n, {k: batch.pop(k) for k in slots.layout})
        batch[SLOT_KEY] = descriptor
        return batch


def _with_skip_dicts(batches: Iterator[dict]) -> Iterator[dict]:
    """Turn each batch's ``skipped`` count vector into ``{kind: count}`` (left out when all zero).

    Count-only items (a worker's last counts) are added to the batch before them, or to the next
    one when none came yet; batches are therefore passed on one item late.
    """

    def finish(batch: dict, counts: np.ndarray) -> dict:
        by_kind = {kind: int(n) for kind, n in zip(SKIP_KINDS, counts) if n}
        if by_kind:
            batch["skipped"] = by_kind
        return batch

    held: dict | None = None
    counts = np.zeros(len(SKIP_KINDS), dtype=np.int64)  # of the held batch (or of the next one)
    try:
        for item in batches:
            vector = item.pop("skipped", None)
            new = np.zeros_like(counts)
            if vector is not None:
                new = np.asarray(vector.numpy() if hasattr(vector, "numpy") else vector, dtype=np.int64).reshape(-1)
            if not item:  # counts only
                counts += new
                continue
            if held is not None:
                yield finish(held, counts)
                counts = np.zeros_like(counts)
            held, counts = item, counts + new
        if held is not None:
            yield finish(held, counts)
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()


def _from_slots(items: Iterator[dict], slots: BatchSlots) -> Iterator[dict]:
    """Put each batch's slot arrays back in the batch as it arrives (copied out; the slot is reused)."""
    for item in items:
        descriptor = item.pop(SLOT_KEY, None)
        if descriptor is not None:
            item.update(slots.take(descriptor))
        yield item


def _closing(batches: Iterator[dict], slots: BatchSlots | None) -> Iterator[dict]:
    """``batches``, closing ``slots`` before the loader shuts down (a worker waiting for a slot stops)."""
    try:
        for batch in batches:
            yield batch
    finally:
        if slots is not None:
            slots.close()
        close = getattr(batches, "close", None)
        if close is not None:
            close()


class ShardLoader:
    """:class:`TrainData` of ``stream`` read by ``num_workers`` loader workers (0: in this process).

    With workers, the transform's fixed outputs travel through :class:`BatchSlots` of ``slot_depth``
    slots per worker: as many batches ahead as the DataLoader's default prefetch (2 per worker).
    Shared memory: workers x slot_depth x batch_size x one sample's fixed outputs (0.45 MB at 224 px).
    """

    slot_depth = 2

    def __init__(self, stream: TrainStream, num_workers: int, world_size: int = 1):
        self.stream, self.num_workers = stream, int(num_workers)
        # Too few shards for ranks x workers: fail here with the message (inside the loader workers
        # the main process would only see paddle's generic "Blocking queue is killed").
        stream.check_readers(num_workers, world_size)
        self.samples_per_epoch: int | None = stream.samples_per_epoch(num_workers, world_size)
        self._slots_logged = False

    def batches_per_epoch(self, epoch: int) -> int | None:
        """Batches this rank yields in ``epoch`` (None for an endless stream)."""
        counts = self.stream.batches_of_rank(epoch, self.num_workers)
        return None if counts is None else sum(counts)

    def batches(self, epoch: int, skip_batches: int = 0) -> Iterator[dict]:
        """This rank's batches of ``epoch`` after the first ``skip_batches`` (see the module docstring)."""
        self.stream.set_position(epoch, skip_batches)
        # A loader worker must not outlive its rank (e.g. a rank killed by SIGKILL): ExitWithParent.
        # The trainer leaves the loader mid-stream at max_steps: iterate_loader shuts it down cleanly.
        slots = self._slots()
        self.stream.slots = slots  # before the DataLoader forks its workers
        loader = paddle.io.DataLoader(self.stream, batch_size=None, num_workers=self.num_workers,
                                      worker_init_fn=ExitWithParent())
        items = iterate_loader(loader)
        if slots is not None:
            items = _from_slots(items, slots)
        return _closing(_with_skip_dicts(items), slots)

    def _slots(self) -> BatchSlots | None:
        fixed = getattr(self.stream.transform, "fixed_outputs", None)
        layout = fixed() if fixed is not None and self.num_workers > 0 and slots_supported() else None
        if not layout:
            return None
        if self.stream.finisher is not None:
            layout = self.stream.finisher.finished_layout(layout)
        slots = BatchSlots(self.num_workers, self.slot_depth, self.stream.batch_size, layout)
        if not self._slots_logged:
            self._slots_logged = True
            logger.info("loader: %d workers x %d batch slots of %.1f MB in shared memory", self.num_workers,
                        self.slot_depth, slots.slot_bytes / 2**20)
        return slots


def build_train_data(sources: Sequence[StreamSource], transform: Callable[[RawSample, int], dict], *,
                     batch_size: int, num_workers: int, shuffle_buffer: int, seed: int,
                     world_size: int, finisher: ViewFinisher | None = None,
                     sizes_cache: str | os.PathLike | None = None) -> ShardLoader:
    """The configured training data of this rank (``finisher``: finish the image views in the
    reader, for a model on the CPU; see :class:`~ernievil2.data.device_views.ViewFinisher`;
    ``sizes_cache``: the file caching shard sizes counted by reading, e.g. ``RUN_DIR/shard_sizes.json``)."""
    stream = TrainStream(sources, transform, batch_size, shuffle_buffer=shuffle_buffer, seed=seed,
                         finisher=finisher, sizes_cache=sizes_cache)
    return ShardLoader(stream, num_workers, world_size)
