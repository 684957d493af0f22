"""How the training stream (:class:`ernievil2.data.loader.TrainStream`) samples shards: drawing them
with replacement (:func:`draw_shards`), a shuffle buffer (:func:`buffer_shuffle`) and the message for
too few shards to split over the readers (:func:`too_few_shards`). Imports no paddle."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np


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
