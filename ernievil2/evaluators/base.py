"""What every evaluator shares: the interface, the error for unreadable sets, the log of skipped
samples, and the registry that maps an ``eval`` config list (``eval.datasets``,
``eval.classification``) to the builder of its evaluators."""
from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from tqdm.auto import tqdm

from ernievil2.data import preprocess
from ernievil2.distributed import DistInfo, first_error, gather_lists

log = logging.getLogger("ernievil2.evaluators")


class Evaluator(Protocol):
    """``evaluator(model, step) -> list[record]``, called on every rank; every rank returns the same
    records (flat dicts with ``step``, ``dataset``, ``protocol`` and the metrics)."""

    name: str

    def __call__(self, model: Any, step: int) -> list[dict]:
        ...


class EvalDataError(ValueError):
    """An evaluation set file that cannot be read; the message names the file and line or entry."""


class SkipLog:
    """The malformed samples of a set read with ``skip_bad_samples`` (a benchmark's shards): each is
    counted by ``reason``, the first ``max_logged`` of each reason are logged with where they are
    (shard and key) and why, and :meth:`finish` logs the totals. ``quiet``: count only (every rank
    but the first, which logs for all)."""

    def __init__(self, name: str, max_logged: int = 5, quiet: bool = False):
        self.name, self.max_logged, self.quiet = name, max_logged, quiet
        self.counts: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, reason: str, where: str, detail: str) -> None:
        """Count one skipped sample (or damaged shard)."""
        self.counts[reason] += 1
        if not self.quiet and self.counts[reason] <= self.max_logged:
            log.warning("evaluation set %s: skipping %s: %s: %s", self.name, reason, where, detail)
            if self.counts[reason] == self.max_logged:
                log.warning("evaluation set %s: further %s skips are only counted", self.name, reason)

    def finish(self) -> None:
        """Log the totals (nothing when nothing was skipped)."""
        if self.total and not self.quiet:
            kinds = ", ".join(f"{k} {n}" for k, n in sorted(self.counts.items()))
            log.warning("evaluation set %s: skipped %d malformed sample(s) (%s)", self.name, self.total, kinds)


def decode_crops(items: Sequence[Any], start: int, stop: int, image_size: int, profile: str, info: DistInfo,
                 skip: bool = False) -> tuple[list[np.ndarray], list[tuple[int, str, str]]]:
    """The resized centre crops of ``items[start:stop]`` (each item has ``load_image()``, ``key`` and
    ``where``; every rank calls it). An image that cannot be read or decoded raises, on every rank,
    :class:`EvalDataError` naming the first one; with ``skip`` it is left out and returned, with the
    other ranks', as ``(index, where, why)`` in the second list, the same on every rank."""
    crops: list[np.ndarray] = []
    bad: list[tuple[int, str, str]] = []
    error = None
    # a bar on an interactive terminal only (tqdm's disable=None), on the first rank
    for k in tqdm(range(start, stop), desc="decode images", unit="img", leave=False,
                  disable=None if info.is_main else True):
        item = items[k]
        try:
            image = preprocess.decode(item.load_image(), profile, item.key)
            crops.append(preprocess.resize_crop(image, image_size, profile))
        except (OSError, ValueError) as exc:
            if not skip:
                error = f"{item.where}: {exc}"
                break
            bad.append((k, item.where, str(exc)))
    error = first_error(error, info)
    if error is not None:
        raise EvalDataError(error)
    return crops, (gather_lists(bad, info) if skip else [])


@dataclass(frozen=True)
class EvalContext:
    """What building any evaluator needs besides its own config entry."""

    image_size: int
    tokenizer: Any
    text_max_length: int
    info: DistInfo = DistInfo()
    batch_size: int = 256
    profile: str = "official"


Builder = Callable[[Any, EvalContext], Evaluator]
#: ``eval`` config list -> the builder of one evaluator from one of its entries, in build order.
BUILDERS: dict[str, Builder] = {}


def register(config_list: str) -> Callable[[Builder], Builder]:
    """Make the decorated function the builder of the entries of ``eval.<config_list>``."""
    def wrap(builder: Builder) -> Builder:
        if config_list in BUILDERS:
            raise ValueError(f"eval.{config_list} already has a builder: {BUILDERS[config_list].__qualname__}")
        BUILDERS[config_list] = builder
        return builder
    return wrap
