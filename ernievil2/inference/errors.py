"""Errors of the inference path: :class:`InferError` (any user-facing problem) and
:class:`BadLineError` (one bad line of the upstream evaluation file, with its reason)."""
from __future__ import annotations

from typing import Optional

from ernievil2.data.formats import SEED_LINE_CHECKS

__all__ = ["REASONS", "InferError", "BadLineError"]

#: Reasons a line is bad, in the order they are checked: the upstream TSV line checks of
#: :mod:`ernievil2.data.formats` (the packer's and evaluation's too), then the image's decoding.
REASONS: dict[str, str] = {**SEED_LINE_CHECKS, "image": "undecodable image"}


class InferError(ValueError):
    """A user-facing inference error (bad input, missing vocab, bad setting)."""


class BadLineError(InferError):
    """One bad input line: ``lineno`` (1-based), ``reason`` (a key of :data:`REASONS`), ``detail``."""

    def __init__(self, lineno: int, reason: str, detail: str = "", image_id: Optional[str] = None):
        self.lineno, self.reason, self.detail, self.image_id = lineno, reason, detail, image_id
        where = f"line {lineno}" + (f" (image id {image_id!r})" if image_id else "")
        super().__init__(f"{where}: {REASONS[reason]}" + (f": {detail}" if detail else ""))
