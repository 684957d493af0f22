"""One loader reader's pass over its share of the training stream (:class:`ReaderPass`), used by
:class:`ernievil2.data.loader.TrainStream` in each loader worker."""
from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from ernievil2.data.sample import RawSample
from ernievil2.data.sampling import buffer_shuffle
from ernievil2.data.skips import SkipCounter

logger = logging.getLogger("ernievil2.data.loader")


class ReaderPass:
    """One reader's good samples of one epoch, in order, with its phase and position explicit.

    ``checking``: samples are only validated (no views made), as when skipping the batches a
    resumed run already consumed; ``position``: samples yielded so far (a sample's row in its
    batch is ``position % batch_size``, told to a transform with auxiliary rows);
    ``first_pass_done``: the reader's stream has been read once. In exact mode a reader whose
    stream holds fewer good samples than its ``needed`` share reads it again from the start.
    ``stream``: the :class:`~ernievil2.data.loader.TrainStream` being read."""

    def __init__(self, stream: Any, epoch: int, gid: int, readers: int, salt: int, needed: int | None):
        self.stream, self.epoch, self.gid, self.readers, self.salt = stream, epoch, gid, readers, salt
        self.skips = SkipCounter()
        self.checking = False
        self.position = 0
        self.first_pass_done = False
        self._good = self._good_samples(needed)

    def take(self, n: int) -> list:
        """The next ``n`` outputs (fewer at the end of a finite stream); None for each sample while checking."""
        out: list = []
        if n == 0:
            return out
        for item in self._good:
            out.append(item)
            if len(out) == n:
                break
        return out

    def _decoded(self) -> Iterator[tuple[str, RawSample]]:
        for url, key, sample in self.stream.raw_items(self.epoch, self.gid, self.readers, self.salt, self.skips):
            if isinstance(sample, RawSample):
                yield url, sample
            else:
                self.skips.add_error(url, key, sample)

    def _pass(self) -> Iterator[dict | None]:
        """One pass over the reader's stream: each good sample's views, or None while checking."""
        stream = self.stream
        samples: Iterator[tuple[str, RawSample]] = self._decoded()
        if stream.shuffle_buffer > 1:
            samples = buffer_shuffle(samples, stream.shuffle_buffer, stream.reader_rng(self.epoch, self.gid, 3, self.salt))
        validate = getattr(stream.transform, "validate", None)
        by_row = stream.transform_aux_rows() is not None
        for url, sample in samples:
            try:
                if self.checking and validate is not None:
                    validate(sample)
                    out = None
                elif self.checking:
                    stream.transform(sample, self.epoch)
                    out = None
                elif by_row:
                    out = stream.transform(sample, self.epoch, row=self.position % stream.batch_size)
                else:
                    out = stream.transform(sample, self.epoch)
            except ValueError as exn:
                self.skips.add_error(url, sample.key, exn)
                continue
            self.position += 1
            yield out

    def _good_samples(self, needed: int | None) -> Iterator[dict | None]:
        """The first pass, then (exact mode) further passes over the same stream as long as needed."""
        got = 0
        for out in self._pass():
            got += 1
            yield out
        self.first_pass_done = True
        if needed is None or got >= needed:
            return
        batch_size = self.stream.batch_size
        if got == 0:
            logger.error("reader %d: no good sample in epoch %d (see the skip warnings)", self.gid, self.epoch)
            return
        logger.warning("reader %d: %d good samples for %d batches of %d in epoch %d: the last %d are "
                       "repeated from the start of its stream", self.gid, got, needed // batch_size,
                       batch_size, self.epoch, needed - got)
        self.skips.muted = True  # the bad samples of a repeated pass were counted the first time
        while True:
            yield from self._pass()
