"""The shared part of the format readers: format names, the item and problem types, what a reader
is given and returns (:class:`SourceSpec`, :class:`Source`), and the rules every reader follows
(keys, captions, file checks). Standard library only (the package doc says why)."""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Union

from ernievil2.data.b64 import decode_base64

FORMATS: tuple[str, ...] = ("seed_tsv", "chinese_clip", "coco", "karpathy", "jsonl", "shards", "wds_retrieval")
"""Every format name, in one spelling (underscores)."""

DEFAULT_LANGUAGE: dict[str, str] = {"seed_tsv": "zh", "chinese_clip": "zh", "coco": "en", "karpathy": "en",
                                    "jsonl": "en"}
"""Caption language of each format when the spec gives none (jsonl: the record's ``language``
first; shards: the sample's; wds_retrieval: ``en``)."""

# Problem reasons (the packer's skip reasons use the same names).
BAD_RECORD = "bad_record"
NO_CAPTIONS = "no_captions"
BAD_BASE64 = "bad_base64"
# Reasons an image cannot be loaded (ImageLoadError.reason).
MISSING_IMAGE = "missing_image"
UNREADABLE_IMAGE = "unreadable_image"

_KEY_BAD_CHARS = re.compile(r"[^\w-]")


class FormatError(ValueError):
    """An input that cannot be read at all (missing file, wrong structure, bad options); names the file."""


class ImageLoadError(ValueError):
    """An image whose bytes cannot be had: ``reason`` is ``missing_image``, ``unreadable_image`` or
    ``bad_base64``; the message says which file or why."""

    def __init__(self, reason: str, detail: str):
        self.reason, self.detail = reason, detail
        super().__init__(detail)


@dataclass(frozen=True)
class ImageSource:
    """Where one image's bytes are: a file ``path``, a ``b64`` string (standard or URL-safe
    alphabet) or the ``data`` itself. Picklable: the packer sends it to worker processes."""

    path: str | None = None
    b64: str | None = None
    data: bytes | None = None

    def load(self) -> bytes:
        """The encoded image bytes; :class:`ImageLoadError` when they cannot be had."""
        if self.data is not None:
            return self.data
        if self.path is not None:
            try:
                with open(self.path, "rb") as f:
                    return f.read()
            except FileNotFoundError:
                raise ImageLoadError(MISSING_IMAGE, f"image file not found: {self.path}") from None
            except OSError as exn:
                raise ImageLoadError(UNREADABLE_IMAGE,
                                     f"cannot read image {self.path}: {exn.strerror or exn}") from None
        if self.b64 is not None:
            try:
                return decode_base64(self.b64)
            except ValueError as exn:
                raise ImageLoadError(BAD_BASE64, f"invalid base64: {exn}") from None
        raise ImageLoadError(MISSING_IMAGE, "no image path or data")


@dataclass
class Item:
    """One image with all its captions, before its image is loaded.

    ``key``: the sample key (package doc); ``captions``: stripped, non-empty, file order, repeats
    kept; ``language``: a language code, ``mul`` with ``meta["languages"]`` (one per caption) when
    mixed; ``objects``: object tags, most important first (``None``: the source has none);
    ``meta``: anything else kept (``image_id``, ``object_counts``, ``object_scores``, ``split``, ...);
    ``where``: the record's place, for messages. ``caption_ids``: where one text record can caption
    several images (``chinese_clip``: a texts.jsonl line with several ``image_ids``), one id per
    caption naming its record, the same in every item it captions (evaluation counts such a text
    once, with all its images); ``None``: every caption is a text of its own.
    """

    key: str
    captions: list[str]
    image: ImageSource
    where: str
    language: str = "en"
    objects: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    caption_ids: list[str] | None = None

    def load_image(self) -> bytes:
        """The encoded image (:class:`ImageLoadError` when it cannot be had)."""
        return self.image.load()

    @property
    def object_counts(self) -> dict[str, int]:
        """Instances per object name, where the source counts them (COCO boxes, jsonl counts)."""
        return dict(self.meta.get("object_counts") or {})

    @property
    def object_scores(self) -> dict[str, float]:
        """Detector / tagger score per object name (shards packed with ``--objects``/``--detections``)."""
        return dict(self.meta.get("object_scores") or {})

    def deduplicated(self) -> Item:
        """A copy with each caption once (its first place), ``meta["languages"]`` and ``caption_ids``
        kept aligned."""
        first = {c: i for i, c in reversed(list(enumerate(self.captions)))}
        keep = sorted(first.values())
        if len(keep) == len(self.captions):
            return self
        meta = dict(self.meta)
        if isinstance(meta.get("languages"), list) and len(meta["languages"]) == len(self.captions):
            meta["languages"] = [meta["languages"][i] for i in keep]
        ids = [self.caption_ids[i] for i in keep] if self.caption_ids is not None else None
        return replace(self, captions=[self.captions[i] for i in keep], meta=meta, caption_ids=ids)


@dataclass(frozen=True)
class Problem:
    """A record that gives no item: ``reason`` (:data:`BAD_RECORD`, :data:`NO_CAPTIONS`,
    :data:`BAD_BASE64`), ``where`` (package doc) and ``detail`` (why)."""

    reason: str
    where: str
    detail: str

    def __str__(self) -> str:
        return f"{self.where}: {self.detail}"


Record = Union[Item, Problem]


@dataclass(frozen=True)
class SourceSpec:
    """What to read: the ``format`` and its files and options.

    ``input``: the main file (upstream TSV; ``imgs.tsv`` or the folder holding ``{split}_imgs.tsv``;
    COCO captions json; Karpathy json; captions jsonl) or, for ``shards``, a folder, pattern or
    list of shards. ``images``: the image folder (coco, karpathy; jsonl: the base of relative
    paths), default the input's folder. ``texts``: the Chinese-CLIP texts jsonl (default beside
    ``imgs.tsv``). ``instances``: a COCO instances json (object tags). ``language``: overrides the
    format's caption language (jsonl: selects ``captions_LANG``). ``splits``: Karpathy splits to keep
    (empty: all) / the one Chinese-CLIP split of a folder. ``caption_key``: jsonl: read the captions
    from this field only. ``keep_uncaptioned``: an image that no text lists is an :class:`Item` with
    no captions instead of a ``no_captions`` :class:`Problem` (``chinese_clip``, whose images are
    listed apart from their texts: retrieval evaluation keeps them as distractors; the packer
    leaves it off, as there is nothing to train on). The other formats give a record without
    captions as a malformed one either way.
    """

    format: str
    input: str | os.PathLike | Sequence[str]
    images: str | os.PathLike | None = None
    texts: str | os.PathLike | None = None
    instances: str | os.PathLike | None = None
    language: str | None = None
    splits: tuple[str, ...] = ()
    caption_key: str | None = None
    keep_uncaptioned: bool = False


@dataclass
class Source:
    """An opened input: its records (lazy, file order) and their number when known up front.

    ``notes``: counts the reader makes on the way (Chinese-CLIP: text image ids with no image, filled
    when the records are exhausted). ``image_keys``: ``str(image id) -> key`` where the key is not
    the image id (COCO: the file-name stem), for detector results naming images by id.
    ``categories``: ``category id -> name`` of the input's own object annotations (COCO
    ``instances``), ``None`` when it has none.
    """

    records: Iterator[Record]
    total: int | None = None
    notes: dict[str, Any] = field(default_factory=dict)
    image_keys: dict[str, str] = field(default_factory=dict)
    categories: dict[Any, str] | None = None


# --------------------------------------------------------------------------------------------
# shared rules
# --------------------------------------------------------------------------------------------


def sample_key(raw_id: Any) -> str:
    """The shard key for an image id: characters other than letters, digits, ``_``, ``-`` become ``_``;
    a key that would look like WebDataset metadata (``__x__``) gets a ``k`` prefix."""
    key = _KEY_BAD_CHARS.sub("_", str(raw_id).strip())
    if key.startswith("__") and key.endswith("__"):
        key = "k" + key
    return key


def caption_strings(values: Iterable[Any]) -> list[str]:
    """The captions among ``values``: strings, stripped, empty ones dropped, repeats kept."""
    return [v.strip() for v in values if isinstance(v, str) and v.strip()]


def clean_captions(captions: Iterable[Any]) -> list[str]:
    """:func:`caption_strings` with exact repeats removed (first kept)."""
    return list(dict.fromkeys(caption_strings(captions)))


def check_format(name: str, choices: Sequence[str] = FORMATS) -> str:
    """``name`` when it is one of ``choices``; else :class:`FormatError` listing them."""
    if name in choices:
        return name
    hint = f" (format names use underscores: {name.replace('-', '_')!r})" if name.replace("-", "_") in choices else ""
    raise FormatError(f"unknown format {name!r}{hint}; choose one of: {', '.join(choices)}")


def require_file(path: Any, what: str) -> Path:
    """``path`` as a :class:`~pathlib.Path` when it is an existing file; else :class:`FormatError`
    saying ``what`` is missing."""
    if path is None:
        raise FormatError(f"{what} is required")
    if not Path(path).is_file():
        raise FormatError(f"{what} {path} does not exist or is not a file")
    return Path(path)


def load_json(path: Path, required: tuple[str, ...] = (), layout: str = "") -> dict:
    """A JSON object file holding the list fields ``required``; :class:`FormatError` naming the file
    (and line, for a syntax error) otherwise."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exn:
        raise FormatError(f"{path}:{exn.lineno}: not valid JSON: {exn.msg}") from None
    except (OSError, ValueError) as exn:
        raise FormatError(f"{path}: cannot read JSON ({exn})") from None
    if not isinstance(data, dict):
        raise FormatError(f"{path}: top level is a {type(data).__name__}, expected an object")
    missing = [k for k in required if not isinstance(data.get(k), list)]
    if missing:
        raise FormatError(f"{path}: missing list field(s) {missing}" + (f" ({layout} layout)" if layout else ""))
    return data


def nonblank_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """``(line number, raw bytes)`` of every line that is not blank."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if raw.strip():
                yield lineno, raw


def decode_line(raw: bytes | str) -> str:
    """A line's text without its line ending; ``UnicodeDecodeError`` when not UTF-8."""
    line = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    return line.rstrip("\n").rstrip("\r")

