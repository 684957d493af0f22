"""The training batches of one rank: a :class:`ShardStream` behind a ``paddle.io.DataLoader``.

The trainer sees one interface, :class:`TrainData`: ``batches(epoch, skip_batches)`` yields the
collated batches of ``epoch`` on this rank, leaving out the first ``skip_batches`` of them (the
batches a resumed run consumed before its checkpoint). A batch is ``{name: array[batch, ...]}``;
it may carry ``"skipped"``: ``{kind: count}`` of the samples dropped as bad since the previous
batch of the same loader worker (the trainer sums them into its metrics).
"""
from __future__ import annotations

from typing import Iterator, Protocol, Sequence

import paddle

from ernievil2.data.shards import ExitWithParent, ShardStream, collate_arrays, iterate_loader


class TrainData(Protocol):
    def batches(self, epoch: int, skip_batches: int = 0) -> Iterator[dict]:
        ...


class ShardLoader:
    """Batches of ``stream`` read by ``num_workers`` loader workers (0: in this process)."""

    def __init__(self, stream: ShardStream, batch_size: int, num_workers: int, world_size: int = 1):
        self.stream, self.batch_size, self.num_workers = stream, batch_size, num_workers
        # Too few shards for ranks x workers: fail here with the message (inside the loader workers
        # the main process would only see paddle's generic "Blocking queue is killed"). With
        # resampled=True the stream is endless and one "epoch" lasts until max_steps.
        stream.check_readers(num_workers, world_size)

    def batches(self, epoch: int, skip_batches: int = 0) -> Iterator[dict]:
        if skip_batches:
            raise NotImplementedError("resuming mid-epoch (skip_batches > 0) is not supported yet")
        self.stream.set_epoch(epoch)
        # A loader worker must not outlive its rank (e.g. a rank killed by SIGKILL): ExitWithParent.
        # The trainer leaves the loader mid-stream at max_steps: iterate_loader shuts it down cleanly.
        return iterate_loader(paddle.io.DataLoader(
            self.stream, batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=collate_arrays,
            drop_last=True, worker_init_fn=ExitWithParent()))


def build_train_data(shards: Sequence[str], transform, *, batch_size: int, num_workers: int, shuffle_buffer: int,
                     seed: int, resampled: bool, world_size: int) -> TrainData:
    """The configured training data of this rank."""
    stream = ShardStream(list(shards), transform=transform, shuffle_buffer=shuffle_buffer, seed=seed,
                         resampled=resampled)
    return ShardLoader(stream, batch_size, num_workers, world_size)
