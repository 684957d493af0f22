"""What every evaluator shares: the interface, the error for unreadable sets, the counter of a
set's skipped samples (:func:`set_skips`), a rank's share of a set's images (held as crops or
streamed), and the registry that maps an ``eval`` config list (``eval.datasets``,
``eval.classification``) to the builder of its evaluators.

Images: each rank decodes only its share of a set (:func:`shard_range`). When the largest share's
uint8 crops fit ``eval.hold_images_mb`` (:func:`holds_crops`), they are decoded once, when the
evaluator is built (:func:`decode_crops`), and held: every evaluation re-embeds them. Otherwise the
set is streamed (:class:`CropStream`): every evaluation decodes the share batch by batch, embeds each
batch and drops it, and only the embeddings stay. Both give the same vectors (the same batches go
through :mod:`ernievil2.encode`) and the same skips, found by the first pass over the images."""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from tqdm.auto import tqdm

from ernievil2.data import preprocess
from ernievil2.data.skips import SkipCounter
from ernievil2.distributed import DistInfo, first_error, gather_lists
from ernievil2.encode import embed_crop_batches

log = logging.getLogger("ernievil2.evaluators")

HOLD_IMAGES_MB = 512
"""Default of ``eval.hold_images_mb``: the MiB of uint8 crops per rank under which a set's images are
held between evaluations (above it, and at 0, they are streamed)."""

#: one image that cannot be read or decoded: ``(index in the set, where, why)``
Bad = tuple[int, str, str]


class Evaluator(Protocol):
    """``evaluator(model, step) -> list[record]``, called on every rank; every rank returns the same
    records (flat dicts with ``step``, ``dataset``, ``protocol`` and the metrics)."""

    name: str

    def __call__(self, model: Any, step: int) -> list[dict]:
        ...


class EvalDataError(ValueError):
    """An evaluation set file that cannot be read; the message names the file and line or entry."""


def set_skips(name: str, info: DistInfo | None = None) -> SkipCounter:
    """The counter of the malformed samples of evaluation set ``name`` read with ``skip_bad_samples``
    (a benchmark's shards): each counted by reason, the first few of each logged with where they are
    and why (``evaluation set NAME: skipping ...``), the totals by :meth:`~SkipCounter.finish`; quiet
    on every rank but the first, which logs for all."""
    return SkipCounter(f"evaluation set {name}", quiet=not (info or DistInfo()).is_main)


def holds_crops(n_images: int, image_size: int, info: DistInfo, hold_mb: float | None) -> bool:
    """Whether a set of ``n_images`` is held as crops: the largest rank's share, as uint8 crops of
    ``image_size``, fits ``hold_mb`` MiB (``None``: always held; 0: never). The same answer on every
    rank (the two modes call different collectives)."""
    if hold_mb is None:
        return True
    if hold_mb < 0:
        raise ValueError(f"eval.hold_images_mb must be >= 0 (0: always stream), got {hold_mb}")
    share = -(-n_images // info.world_size)
    return hold_mb > 0 and share * image_size * image_size * 3 <= hold_mb * 2**20


def _crop(item: Any, image_size: int, profile: str) -> np.ndarray:
    return preprocess.resize_crop(preprocess.decode(item.load_image(), profile, item.key), image_size, profile)


def count_undecodable(skips: SkipCounter | None, bad: Sequence[Bad]) -> None:
    """Count every image of ``bad`` in ``skips`` (when given) as ``undecodable_image``."""
    for _, where, detail in bad if skips is not None else ():
        skips.add("undecodable_image", where, detail)


def decode_crops(items: Sequence[Any], start: int, stop: int, image_size: int, profile: str, info: DistInfo,
                 skip: bool = False) -> tuple[list[np.ndarray], list[Bad]]:
    """The resized centre crops of ``items[start:stop]`` (each item has ``load_image()``, ``key`` and
    ``where``; every rank calls it). An image that cannot be read or decoded raises, on every rank,
    :class:`EvalDataError` naming the first one; with ``skip`` it is left out and returned, with the
    other ranks', as ``(index, where, why)`` in the second list, the same on every rank."""
    crops: list[np.ndarray] = []
    bad: list[Bad] = []
    error = None
    # a bar on an interactive terminal only (tqdm's disable=None), on the first rank
    for k in tqdm(range(start, stop), desc="decode images", unit="img", leave=False,
                  disable=None if info.is_main else True):
        item = items[k]
        try:
            crops.append(_crop(item, image_size, profile))
        except (OSError, ValueError) as exc:
            if not skip:
                error = f"{item.where}: {exc}"
                break
            bad.append((k, item.where, str(exc)))
    error = first_error(error, info)
    if error is not None:
        raise EvalDataError(error)
    return crops, (gather_lists(bad, info) if skip else [])


class CropStream:
    """A rank's share of a set's images, streamed: every pass (:meth:`embed`) decodes them batch by
    batch, embeds each batch and drops it. Only ``items`` (this share's: an image path, or the
    encoded bytes the reader holds) and the embeddings stay, never the crops.

    ``items`` are images ``start`` … of the set. The first pass finds the images that cannot be read
    or decoded, as :func:`decode_crops` does for a held set: the first one raises
    :class:`EvalDataError` on every rank; with ``skips`` each is counted there (``undecodable_image``,
    then the totals are logged) and left out, and :meth:`embed` returns every rank's, the same on
    every rank. Later passes leave them out without decoding them."""

    def __init__(self, items: Sequence[Any], start: int, image_size: int, profile: str, info: DistInfo,
                 skips: SkipCounter | None = None):
        self.items, self.start = list(items), start
        self.image_size, self.profile, self.info, self.skips = image_size, profile, info, skips
        self.bad: list[Bad] | None = None  # every rank's unreadable images, known after the first pass

    def embed(self, model: Any, batch_size: int) -> tuple[np.ndarray, list[Bad] | None]:
        """This rank's image embeddings (the share less its unreadable images, in order) and, on the
        first pass, every rank's unreadable images (``[]`` without ``skips``; ``None`` on later
        passes). Every rank calls it (collectives)."""
        found: list[Bad] = []
        errors: list[str] = []
        out = embed_crop_batches(model, self._batches(batch_size, found, errors), batch_size, self.profile)
        error = first_error(errors[0] if errors else None, self.info)
        if error is not None:
            raise EvalDataError(error)
        if self.bad is not None:
            return out, None
        self.bad = gather_lists(found, self.info) if self.skips is not None else []
        count_undecodable(self.skips, self.bad)
        if self.skips is not None:
            self.skips.finish()
        return out, self.bad

    def _batches(self, batch_size: int, found: list[Bad], errors: list[str]) -> Iterator[np.ndarray]:
        """uint8 crops ``[<= batch_size, S, S, 3]``: the share's readable images in order, in the
        batches :func:`ernievil2.encode.embed_crops` cuts from the held crops. Stops at the first
        error (recorded in ``errors``)."""
        known = {k for k, _, _ in self.bad or ()}
        batch: list[np.ndarray] = []
        for k, item in tqdm(enumerate(self.items, self.start), total=len(self.items), desc="decode + embed images",
                            unit="img", leave=False, disable=None if self.info.is_main else True):
            if k in known:
                continue
            try:
                batch.append(_crop(item, self.image_size, self.profile))
            except (OSError, ValueError) as exc:
                if self.skips is None or self.bad is not None:
                    errors.append(f"{item.where}: {exc}" + ("" if self.bad is None else " (it decoded at the first "
                                                             "evaluation)"))
                    return
                found.append((k, item.where, str(exc)))
                continue
            if len(batch) == batch_size:
                stacked, batch = np.stack(batch), []  # the single crops go before the batch is embedded
                yield stacked
        if batch:
            stacked, batch = np.stack(batch), []
            yield stacked


@dataclass(frozen=True)
class EvalContext:
    """What building any evaluator needs besides its own config entry."""

    image_size: int
    tokenizer: Any
    text_max_length: int
    info: DistInfo = DistInfo()
    batch_size: int = 256
    profile: str = "official"
    hold_images_mb: float | None = HOLD_IMAGES_MB  # held crops' budget per rank (holds_crops); None: always held


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
