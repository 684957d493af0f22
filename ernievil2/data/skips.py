"""One counter of skipped samples (:class:`SkipCounter`) for every reader that skips bad data: the
training loader, the filter's scorer and the evaluation sets read with ``skip_bad_samples``.
Imports numpy and the standard library only (no paddle, no webdataset)."""
from __future__ import annotations

import logging
from collections import Counter

import numpy as np

from ernievil2.data.sample import SKIP_KINDS, BadSample

logger = logging.getLogger(__name__)

MAX_LOGGED = 5
"""Skips of one kind logged, with where and why, before the rest are only counted."""


class SkipCounter:
    """Counts skipped samples by kind and logs the first ``max_logged`` of each kind with where the
    sample is and why it is skipped; ``finish()`` logs the totals.

    Kinds: training data is counted by the kinds of :data:`~ernievil2.data.sample.SKIP_KINDS`, whose
    fixed order is that of the loader batches' count vector (:meth:`take`); evaluation sets count
    free-form reasons: the format readers' :class:`~ernievil2.data.formats.Problem` reasons
    (``bad_record``, ``no_captions``, ``bad_base64``), ``missing_image``, ``undecodable_image`` and the
    classification shards' ``no_image``, ``no_label``, ``bad_label``, ``bad_sample``, ``damaged_shard``.

    ``name``: the prefix of every log line (``"evaluation set X"`` gives ``evaluation set X: skipping
    ...``; empty: none). ``quiet``: count, log nothing (every evaluation rank but the first, which
    logs for all). ``muted``: neither count nor log (a re-read of data already counted).
    """

    def __init__(self, name: str = "", max_logged: int = MAX_LOGGED, quiet: bool = False) -> None:
        self.name, self.max_logged, self.quiet = name, max_logged, quiet
        self.muted = False
        self.counts: Counter[str] = Counter()
        self._taken: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def by_kind(self) -> dict[str, int]:
        """``{kind: count}`` of the non-zero totals: :data:`SKIP_KINDS` in their order, then any other
        kinds in name order."""
        order = [k for k in SKIP_KINDS if self.counts[k]] + sorted(k for k in self.counts if k not in SKIP_KINDS)
        return {k: self.counts[k] for k in order if self.counts[k]}

    def _log(self, message: str, *args: object) -> None:
        if self.name:
            logger.warning("%s: " + message, self.name, *args)
        else:
            logger.warning(message, *args)

    def add(self, kind: str, where: str, detail: str | Exception) -> None:
        """Count one skipped sample of ``kind``, ``where`` it is and why (``detail``)."""
        if self.muted:
            return
        self.counts[kind] += 1
        n = self.counts[kind]
        if not self.quiet and n <= self.max_logged:
            self._log("skipping %s: %s: %s", kind, where, detail)
            if n == self.max_logged:
                self._log("further %s skips are only counted", kind)

    def add_error(self, url: str, key: str, exn: ValueError) -> None:
        """Count a ``ValueError`` raised for sample ``key`` of shard ``url``: its ``kind`` if a
        :class:`~ernievil2.data.sample.BadSample`, else ``other``."""
        self.add(exn.kind if isinstance(exn, BadSample) else "other", f"sample {key} of shard {url}", exn)

    def add_damage(self, url: str, error: str | Exception) -> None:
        """Count a shard that ends early or is not a tar (``truncated_tar``, once per shard)."""
        self.add("truncated_tar", f"shard {url}", error)

    def take(self) -> np.ndarray:
        """The counts since the previous call as an int64 vector in :data:`SKIP_KINDS` order (what a
        loader batch reports); ``ValueError`` when a kind outside it was counted (it has no place)."""
        stray = sorted(k for k in self.counts if k not in SKIP_KINDS)
        if stray:
            raise ValueError(f"skip kinds {stray} are not in SKIP_KINDS {SKIP_KINDS}")
        new = np.asarray([self.counts[k] - self._taken[k] for k in SKIP_KINDS], dtype=np.int64)
        self._taken = Counter(self.counts)
        return new

    def finish(self) -> None:
        """Log the totals by kind (nothing when nothing was skipped, or ``quiet``)."""
        if self.total and not self.quiet:
            kinds = ", ".join(f"{k} {n}" for k, n in sorted(self.counts.items()) if n)
            self._log("skipped %d malformed sample(s) (%s)", self.total, kinds)
