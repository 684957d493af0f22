"""The upstream TSV line (``text \\t image_id \\t base64``): its parse and checks, shared by the
``seed_tsv`` reader (:mod:`ernievil2.data.formats.tsv`) and inference (:mod:`ernievil2.inference`)."""
from __future__ import annotations

from dataclasses import dataclass

from ernievil2.data.b64 import decode_base64
from ernievil2.data.formats.base import BAD_BASE64, BAD_RECORD, NO_CAPTIONS, decode_line

SEED_LINE_CHECKS: dict[str, str] = {
    "encoding": "not valid UTF-8",
    "columns": "wrong column count",
    "text": "empty text",
    "base64": "invalid base64",
}
"""The checks of one upstream TSV line, in the order they are made, and what failing each means."""
SEED_LINE_REASONS: dict[str, str] = {"encoding": BAD_RECORD, "columns": BAD_RECORD, "text": NO_CAPTIONS,
                                     "base64": BAD_BASE64}
"""The :class:`Problem` reason of an upstream TSV line failing each check."""


@dataclass(frozen=True)
class SeedLine:
    """One parsed upstream TSV line: 1-based ``lineno``, ``text`` and ``image_id`` (stripped), the
    base64 column (not decoded)."""

    lineno: int
    text: str
    image_id: str
    image_b64: str


@dataclass(frozen=True)
class LineProblem:
    """A seed TSV line failing ``check`` (a key of :data:`SEED_LINE_CHECKS`); ``detail`` says more
    (may be empty), ``image_id`` when the line has one."""

    lineno: int
    check: str
    detail: str = ""
    image_id: str | None = None

    @property
    def message(self) -> str:
        """What is wrong, e.g. ``invalid base64: not base64 (...) (image id 'a')``."""
        text = SEED_LINE_CHECKS[self.check] + (f": {self.detail}" if self.detail else "")
        return text + (f" (image id {self.image_id!r})" if self.image_id else "")


def parse_seed_line(raw: bytes | str, lineno: int) -> SeedLine | LineProblem:
    """Split one upstream TSV line (trailing ``\\n``/``\\r\\n`` allowed) into its three columns, checking the
    encoding, the column count and the text; the base64 is not decoded (:func:`check_seed_image`)."""
    try:
        line = decode_line(raw)
    except UnicodeDecodeError as exn:
        return LineProblem(lineno, "encoding", str(exn))
    cols = line.split("\t")
    if len(cols) != 3:
        image_id = cols[1].strip() if len(cols) > 1 else ""
        return LineProblem(lineno, "columns",
                           f"expected 3 tab-separated columns (text, image_id, base64), found {len(cols)}",
                           image_id or None)
    text, image_id, b64 = cols[0].strip(), cols[1].strip(), cols[2].strip()
    if not text:
        return LineProblem(lineno, "text", "", image_id or None)
    return SeedLine(lineno, text, image_id, b64)


def check_seed_image(line: SeedLine) -> LineProblem | None:
    """``None`` when the line's base64 column decodes, else its ``base64`` problem."""
    try:
        decode_base64(line.image_b64)
    except ValueError as exn:
        return LineProblem(line.lineno, "base64", str(exn), line.image_id or None)
    return None


