"""Reader of the upstream evaluation file: UTF-8, one pair per line,
``text \\t image_id \\t base64(image)`` (standard or URL-safe base64, padding optional).

:func:`iter_seed_batches` yields the good lines in order as preprocessed batches, the images
decoded by a thread pool. Bad lines — wrong column count, invalid UTF-8, empty text, invalid
base64, undecodable image — raise :class:`BadLineError` naming the 1-based line number and the
reason, or, with ``skip_bad_lines=True``, are left out, counted per reason and listed in a
:class:`SkipReport`.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from ernievil2.data import formats as data_formats
from ernievil2.data.b64 import decode_base64
from ernievil2.data.formats import LineProblem, SeedLine
from ernievil2.data.preprocess import PROFILES, preprocess
from ernievil2.inference.errors import REASONS, BadLineError, InferError

__all__ = [
    "SeedLine", "SkipReport", "PreparedBatch", "parse_seed_line", "decode_base64", "load_record_image",
    "iter_seed_batches",
]


def parse_seed_line(raw: bytes | str, lineno: int) -> SeedLine:
    """One line through :func:`ernievil2.data.formats.parse_seed_line` (encoding, column count,
    text; stripped text and id), or :class:`BadLineError`. The base64 is decoded later
    (:func:`load_record_image`). Blank lines are not skipped: every input line is one output line."""
    parsed = data_formats.parse_seed_line(raw, lineno)
    if isinstance(parsed, LineProblem):
        raise BadLineError(lineno, parsed.check, parsed.detail, parsed.image_id)
    return parsed


def load_record_image(record: SeedLine, profile: str, size: int) -> np.ndarray:
    """The preprocessed ``[3, size, size]`` image of ``record``, or :class:`BadLineError`."""
    try:
        data = decode_base64(record.image_b64)
    except ValueError as exc:
        raise BadLineError(record.lineno, "base64", str(exc), record.image_id) from None
    try:
        return preprocess(data, profile, size, key=record.image_id)
    except ValueError as exc:
        raise BadLineError(record.lineno, "image", str(exc), record.image_id) from None


@dataclass
class SkipReport:
    """Lines left out with ``skip_bad_lines=true``."""

    skipped: list[BadLineError] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.skipped)

    @property
    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for err in self.skipped:
            out[err.reason] = out.get(err.reason, 0) + 1
        return out

    def summary(self, max_items: int = 20) -> str:
        if not self.skipped:
            return "no line skipped"
        per = ", ".join(f"{REASONS[r]}: {n}" for r, n in sorted(self.counts.items(), key=lambda kv: list(REASONS).index(kv[0])))
        lines = [f"skipped {len(self.skipped)} bad line(s) ({per}):"]
        for err in self.skipped[:max_items]:
            lines.append(f"  line {err.lineno}\timage id {err.image_id or '-'}\t{REASONS[err.reason]}")
        if len(self.skipped) > max_items:
            lines.append(f"  ... and {len(self.skipped) - max_items} more")
        return "\n".join(lines)

    def to_tsv(self) -> str:
        rows = ["line\timage_id\treason\tdetail"]
        for e in self.skipped:
            detail = " ".join(e.detail.split())
            rows.append(f"{e.lineno}\t{e.image_id or ''}\t{e.reason}\t{detail}")
        return "\n".join(rows) + "\n"


@dataclass
class PreparedBatch:
    linenos: list[int]
    texts: list[str]
    image_ids: list[str]
    pixels: np.ndarray  # float32 [B, 3, S, S]


def iter_seed_batches(
    path: str | os.PathLike,
    batch_size: int,
    profile: str,
    image_size: int,
    skip_bad_lines: bool = False,
    report: Optional[SkipReport] = None,
    num_workers: int = 0,
    progress: bool = True,
) -> Iterator[PreparedBatch]:
    """Read an upstream evaluation file in order and yield preprocessed batches of its good lines.

    A bad line raises :class:`BadLineError` (``skip_bad_lines=False``) or is appended to
    ``report`` and left out. Images are decoded by ``num_workers`` threads (OpenCV and PIL
    release the GIL); the order of lines is kept.
    """
    if batch_size < 1:
        raise InferError(f"batch_size must be >= 1, got {batch_size}")
    if profile not in PROFILES:
        raise InferError(f"unknown profile {profile!r}; choose one of {list(PROFILES)}")
    path = Path(path)
    if not path.is_file():
        raise InferError(f"test file not found: {path}")
    report = report if report is not None else SkipReport()
    from tqdm.auto import tqdm

    def reject(err: BadLineError) -> None:
        if not skip_bad_lines:
            raise err
        report.skipped.append(err)

    def prepare(records: list[SeedLine]) -> Optional[PreparedBatch]:
        def one(rec: SeedLine):
            try:
                return load_record_image(rec, profile, image_size)
            except BadLineError as err:
                return err

        results = list(pool.map(one, records)) if pool is not None else [one(r) for r in records]
        keep, pixels = [], []
        for rec, res in zip(records, results):
            if isinstance(res, BadLineError):
                reject(res)
            else:
                keep.append(rec)
                pixels.append(res)
        if not keep:
            return None
        return PreparedBatch(
            [r.lineno for r in keep], [r.text for r in keep], [r.image_id for r in keep], np.stack(pixels)
        )

    with ExitStack() as stack:
        pool = stack.enter_context(ThreadPoolExecutor(num_workers)) if num_workers > 0 else None
        f = stack.enter_context(open(path, "rb"))
        bar = stack.enter_context(
            tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc="infer", disable=not progress)
        )
        pending: list[SeedLine] = []
        for lineno, raw in enumerate(f, start=1):
            bar.update(len(raw))
            try:
                pending.append(parse_seed_line(raw, lineno))
            except BadLineError as err:
                reject(err)
            if len(pending) == batch_size:
                batch = prepare(pending)
                pending = []
                if batch is not None:
                    yield batch
        if pending:
            batch = prepare(pending)
            if batch is not None:
                yield batch
