"""Dataset formats: one reader per input layout, one item type, one name per format.

Everything that reads image-text data goes through this module: the packer (``launch/pack.py``,
:mod:`ernievil2.data.packers`), the evaluation sets (:mod:`ernievil2.evaluators.retrieval`) and, for the upstream
TSV's per-line parse, inference (:mod:`ernievil2.inference`). It imports nothing heavier than the
standard library (the ``shards`` reader imports :mod:`ernievil2.data.shard_reader`, and webdataset
with it, only when it is called; never paddle), so the packer's image worker processes can import it.

Formats (:data:`FORMATS`, spelled with underscores; :data:`READERS` maps each name to its reader):

* ``seed_tsv``: ``text \\t image_id \\t base64``, lines grouped by image id;
* ``chinese_clip``: ``{split}_imgs.tsv`` (``image_id \\t base64``) + ``{split}_texts.jsonl``;
* ``coco``: ``captions_*.json`` (+ ``instances_*.json`` for object tags) + an image folder;
* ``karpathy``: ``dataset_{flickr30k,coco}.json`` + an image folder;
* ``jsonl``: one JSON object per image (the layout of ``../shared/data/*/captions.jsonl``);
* ``shards``: WebDataset shards as the packer writes them (a folder, brace pattern, glob or list).

A reader takes a :class:`SourceSpec` and returns a :class:`Source` whose ``records`` are, in file
order, :class:`Item` (one image, all its captions) or :class:`Problem` (a record that gives no
item: a short ``reason``, ``where`` it is and why). The caller decides what a problem means: the
packer counts and skips it, evaluation raises. An input unusable as a whole (a missing file, JSON
without its top-level lists) raises :class:`FormatError` naming the file when the source is opened.

Keys, one rule per format, always in :func:`sample_key` form (the shard key the packer writes):
``seed_tsv`` / ``chinese_clip``: the image id; ``coco``: the file-name stem of ``images[].file_name``;
``karpathy``: the file-name stem of ``filename``; ``jsonl``: ``image_id``, else the stem of
``image``; ``shards``: the sample's key. The raw id is kept in ``meta["image_id"]`` where there is one.

Captions: the strings of the record's caption field(s), stripped, empty ones dropped, in file order,
repeats kept (evaluation counts every caption; the packer keeps one of each, :meth:`Item.deduplicated`).
Where ``where`` points: ``FILE:LINE`` for line-based files, ``FILE: images[I]`` for a JSON entry,
``SHARD: sample KEY`` for a shard sample.
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Union

from ernievil2.data.b64 import decode_base64
from ernievil2.jsonl import jsonl_objects

FORMATS: tuple[str, ...] = ("seed_tsv", "chinese_clip", "coco", "karpathy", "jsonl", "shards")
"""Every format name, in one spelling (underscores)."""

DEFAULT_LANGUAGE: dict[str, str] = {"seed_tsv": "zh", "chinese_clip": "zh", "coco": "en", "karpathy": "en",
                                    "jsonl": "en"}
"""Caption language of each format when the spec gives none (jsonl: the record's ``language``
first; shards: the sample's)."""

# Problem reasons (the packer's skip reasons use the same names).
BAD_RECORD = "bad_record"
NO_CAPTIONS = "no_captions"
BAD_BASE64 = "bad_base64"
# Reasons an image cannot be loaded (ImageLoadError.reason).
MISSING_IMAGE = "missing_image"
UNREADABLE_IMAGE = "unreadable_image"

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

_KEY_BAD_CHARS = re.compile(r"[^\w-]")
_CAPTIONS_FIELD = re.compile(r"^captions_([A-Za-z][A-Za-z_-]*)$")
_JSONL_CONSUMED = frozenset({"image", "image_id", "captions", "language", "objects", "boxes"})
_RESERVED_META = frozenset({"key", "captions", "language", "objects"})


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

    ``key``: the sample key (module doc); ``captions``: stripped, non-empty, file order, repeats
    kept; ``language``: a language code, ``mul`` with ``meta["languages"]`` (one per caption) when
    mixed; ``objects``: object tags, most important first (``None``: the source has none);
    ``meta``: anything else kept (``image_id``, ``object_counts``, ``object_scores``, ``split``, ...);
    ``where``: the record's place, for messages.
    """

    key: str
    captions: list[str]
    image: ImageSource
    where: str
    language: str = "en"
    objects: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

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
        """A copy with each caption once (its first place), ``meta["languages"]`` kept aligned."""
        first = {c: i for i, c in reversed(list(enumerate(self.captions)))}
        keep = sorted(first.values())
        if len(keep) == len(self.captions):
            return self
        meta = dict(self.meta)
        if isinstance(meta.get("languages"), list) and len(meta["languages"]) == len(self.captions):
            meta["languages"] = [meta["languages"][i] for i in keep]
        return replace(self, captions=[self.captions[i] for i in keep], meta=meta)


@dataclass(frozen=True)
class Problem:
    """A record that gives no item: ``reason`` (:data:`BAD_RECORD`, :data:`NO_CAPTIONS`,
    :data:`BAD_BASE64`), ``where`` (module doc) and ``detail`` (why)."""

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
    from this field only.
    """

    format: str
    input: str | os.PathLike | Sequence[str]
    images: str | os.PathLike | None = None
    texts: str | os.PathLike | None = None
    instances: str | os.PathLike | None = None
    language: str | None = None
    splits: tuple[str, ...] = ()
    caption_key: str | None = None


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


def _require_file(path: Any, what: str) -> Path:
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


def _nonblank_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """``(line number, raw bytes)`` of every line that is not blank."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if raw.strip():
                yield lineno, raw


def _decode_line(raw: bytes | str) -> str:
    """A line's text without its line ending; ``UnicodeDecodeError`` when not UTF-8."""
    line = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    return line.rstrip("\n").rstrip("\r")


# --------------------------------------------------------------------------------------------
# seed_tsv: text \t image_id \t base64, several lines per image allowed
# --------------------------------------------------------------------------------------------


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
        line = _decode_line(raw)
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


def read_seed_tsv(spec: SourceSpec) -> Source:
    """Seed lines grouped by image id, in first-seen order: an id's item has the texts of all its
    good lines and the image of the first one. A line is good when it passes every check of
    :data:`SEED_LINE_CHECKS` (base64 included) and has an image id; every other line is a
    :class:`Problem` (reason per :data:`SEED_LINE_REASONS`, ``bad_record`` for an empty id), in
    line order. Two passes (checks and texts, then images) keep the base64 payloads out of memory."""
    path = _require_file(spec.input, "seed_tsv input")
    language = spec.language or DEFAULT_LANGUAGE["seed_tsv"]
    captions: dict[str, list[str]] = {}
    first_line: dict[int, str] = {}  # line number -> image id whose image it gives
    problems: dict[int, Problem] = {}
    for lineno, raw in _nonblank_lines(path):
        where = f"{path}:{lineno}"
        parsed = parse_seed_line(raw, lineno)
        if isinstance(parsed, SeedLine):
            parsed = check_seed_image(parsed) or parsed
        if isinstance(parsed, LineProblem):
            problems[lineno] = Problem(SEED_LINE_REASONS[parsed.check], where, parsed.message)
        elif not parsed.image_id:
            problems[lineno] = Problem(BAD_RECORD, where, "empty image id")
        else:
            if parsed.image_id not in captions:
                first_line[lineno] = parsed.image_id
            captions.setdefault(parsed.image_id, []).append(parsed.text)

    def records() -> Iterator[Record]:
        for lineno, raw in _nonblank_lines(path):
            if lineno in problems:
                yield problems[lineno]
            elif lineno in first_line:
                image_id = first_line[lineno]
                b64 = _decode_line(raw).split("\t")[2].strip()
                yield Item(sample_key(image_id), captions[image_id], ImageSource(b64=b64), f"{path}:{lineno}",
                           language, meta={"image_id": image_id})

    return Source(records(), total=len(captions))


# --------------------------------------------------------------------------------------------
# chinese_clip: {split}_imgs.tsv (image_id \t base64) + {split}_texts.jsonl
# --------------------------------------------------------------------------------------------


def _chinese_clip_paths(spec: SourceSpec) -> tuple[Path, Path]:
    imgs = Path(spec.input)
    if imgs.is_dir():
        if len(spec.splits) != 1:
            raise FormatError(f"chinese_clip input {imgs} is a folder: name one split (--split train) to read "
                              "{split}_imgs.tsv")
        imgs = imgs / f"{spec.splits[0]}_imgs.tsv"
    imgs = _require_file(imgs, "Chinese-CLIP imgs.tsv")
    texts = spec.texts
    if texts is None:
        if not imgs.name.endswith("imgs.tsv"):
            raise FormatError(f"cannot derive the texts file from {imgs} (name does not end in imgs.tsv): pass --texts")
        texts = imgs.with_name(imgs.name[: -len("imgs.tsv")] + "texts.jsonl")
    return imgs, _require_file(texts, "Chinese-CLIP texts.jsonl")


def read_chinese_clip(spec: SourceSpec) -> Source:
    """Chinese-CLIP / PaddleNLP fine-tune data: the texts are grouped by image id first (a malformed
    texts line is a :class:`FormatError`), then ``imgs.tsv`` is streamed; each image gets every
    text that lists it (none: ``no_captions``). The base64 is decoded when the image is loaded."""
    imgs, texts_path = _chinese_clip_paths(spec)
    language = spec.language or DEFAULT_LANGUAGE["chinese_clip"]
    captions: dict[str, list[str]] = {}
    for lineno, obj in jsonl_objects(texts_path):
        where = f"{texts_path}:{lineno}"
        if isinstance(obj, str):
            raise FormatError(f"{where}: {obj}")
        text, image_ids = obj.get("text"), obj.get("image_ids")
        if not isinstance(text, str) or not isinstance(image_ids, list):
            raise FormatError(f"{where}: needs 'text' (string) and 'image_ids' (list), got keys {sorted(obj)}")
        for image_id in image_ids:
            captions.setdefault(str(image_id).strip(), []).extend(caption_strings([text]))
    notes: dict[str, Any] = {"text_image_ids": len(captions)}

    def records() -> Iterator[Record]:
        seen: set[str] = set()
        for lineno, raw in _nonblank_lines(imgs):
            where = f"{imgs}:{lineno}"
            try:
                cols = _decode_line(raw).split("\t")
            except UnicodeDecodeError as exn:
                yield Problem(BAD_RECORD, where, f"not valid UTF-8: {exn}")
                continue
            if len(cols) != 2:
                yield Problem(BAD_RECORD, where,
                              f"expected 2 tab-separated columns (image_id, base64), found {len(cols)}")
                continue
            image_id = cols[0].strip()
            seen.add(image_id)
            if not image_id:
                yield Problem(BAD_RECORD, where, "empty image id")
            elif not captions.get(image_id):
                yield Problem(NO_CAPTIONS, where, f"no text lists image id {image_id!r}")
            else:
                yield Item(sample_key(image_id), list(captions[image_id]), ImageSource(b64=cols[1].strip()), where,
                           language, meta={"image_id": image_id})
        notes["text_image_ids_without_image"] = len(set(captions) - seen)

    return Source(records(), total=None, notes=notes)


# --------------------------------------------------------------------------------------------
# coco: captions_*.json (+ instances_*.json for object tags) + image folder
# --------------------------------------------------------------------------------------------


def category_names(categories: list, path: Path) -> dict[Any, str]:
    """``id -> name`` of a COCO ``categories`` list; :class:`FormatError` naming ``path`` for an
    entry without an ``id`` (int or str) and a non-empty ``name``, or an id given two names."""
    names: dict[Any, str] = {}
    for cat in categories:
        cat_id = cat.get("id") if isinstance(cat, dict) else None
        name = cat.get("name") if isinstance(cat, dict) else None
        if isinstance(cat_id, bool) or not isinstance(cat_id, (int, str)) or not isinstance(name, str) \
                or not name.strip():
            raise FormatError(f"{path}: category {cat!r} lacks 'id' or 'name'")
        if names.get(cat_id, name.strip()) != name.strip():
            raise FormatError(f"{path}: category id {cat_id!r} is named both {names[cat_id]!r} and {name.strip()!r}")
        names[cat_id] = name.strip()
    return names


def coco_objects(instances_path: Path) -> tuple[dict[Any, Counter], dict[Any, str]]:
    """``(image id -> Counter(category name), category id -> name)`` from a COCO instances json
    (crowd boxes included)."""
    data = load_json(instances_path, ("annotations", "categories"), "COCO instances")
    names = category_names(data["categories"], instances_path)
    counts: dict[Any, Counter] = {}
    for ann in data["annotations"]:
        cat_id = ann.get("category_id") if isinstance(ann, dict) else None
        if cat_id not in names or "image_id" not in ann:
            raise FormatError(f"{instances_path}: annotation {ann.get('id', '?') if isinstance(ann, dict) else ann!r} "
                              f"has no image_id or an unknown category_id {cat_id!r}")
        counts.setdefault(ann["image_id"], Counter())[names[cat_id]] += 1
    return counts, names


def read_coco(spec: SourceSpec) -> Source:
    """COCO captions (+ optional instances: object tags, most frequent first, with counts); images
    from ``images`` (default: the captions json's folder), in ``images`` order."""
    path = _require_file(spec.input, "COCO captions json")
    data = load_json(path, ("images", "annotations"), "COCO captions")
    image_dir = Path(spec.images) if spec.images is not None else path.parent
    language = spec.language or DEFAULT_LANGUAGE["coco"]
    captions: dict[Any, list[Any]] = {}
    for ann in data["annotations"]:
        if isinstance(ann, dict) and "image_id" in ann:
            captions.setdefault(ann["image_id"], []).append(ann.get("caption"))
    objects, categories = (coco_objects(_require_file(spec.instances, "COCO instances json"))
                           if spec.instances is not None else ({}, None))
    images = data["images"]
    image_keys = {str(img["id"]): sample_key(Path(img["file_name"]).stem) for img in images
                  if isinstance(img, dict) and "id" in img and isinstance(img.get("file_name"), str)}

    def records() -> Iterator[Record]:
        for index, img in enumerate(images):
            where = f"{path}: images[{index}]"
            if not isinstance(img, dict) or "id" not in img or not isinstance(img.get("file_name"), str):
                yield Problem(BAD_RECORD, where, "needs 'id' and 'file_name'")
                continue
            key = sample_key(Path(img["file_name"]).stem)
            caps = caption_strings(captions.get(img["id"], []))
            if not key:
                yield Problem(BAD_RECORD, where, "empty file name")
                continue
            if not caps:
                yield Problem(NO_CAPTIONS, where, f"no caption (key {key})")
                continue
            meta: dict[str, Any] = {"image_id": img["id"]}
            names: list[str] | None = None
            if img["id"] in objects:
                names = [name for name, _ in objects[img["id"]].most_common()]
                meta["object_counts"] = {n: objects[img["id"]][n] for n in names}
            yield Item(key, caps, ImageSource(path=str(image_dir / img["file_name"])), where, language, names, meta)

    return Source(records(), total=len(images), image_keys=image_keys, categories=categories)


# --------------------------------------------------------------------------------------------
# karpathy: dataset_{flickr30k,coco}.json + image folder
# --------------------------------------------------------------------------------------------


def read_karpathy(spec: SourceSpec) -> Source:
    """Karpathy split json: ``images[{filename, filepath?, split, sentences[{raw}]}]``, the entries of
    ``splits`` (all when empty); image at ``images/[filepath/]filename`` (default: the json's
    folder); ``split``, ``imgid``, ``cocoid`` kept in ``meta``."""
    path = _require_file(spec.input, "Karpathy json")
    data = load_json(path, ("images",), "Karpathy split")
    image_dir = Path(spec.images) if spec.images is not None else path.parent
    language = spec.language or DEFAULT_LANGUAGE["karpathy"]
    wanted = set(spec.splits)
    entries = [(k, img) for k, img in enumerate(data["images"])
               if not wanted or (isinstance(img, dict) and img.get("split") in wanted)]

    def records() -> Iterator[Record]:
        for index, img in entries:
            where = f"{path}: images[{index}]"
            bad = next((name for name, kind in (("filename", str), ("sentences", list))
                        if not isinstance(img, dict) or not isinstance(img.get(name), kind)), None)
            if bad is not None:
                yield Problem(BAD_RECORD, where, f"missing or malformed key {bad!r}")
                continue
            key = sample_key(Path(img["filename"]).stem)
            caps = caption_strings(s.get("raw") for s in img["sentences"] if isinstance(s, dict))
            if not key:
                yield Problem(BAD_RECORD, where, "empty file name")
                continue
            if not caps:
                yield Problem(NO_CAPTIONS, where, f"no sentences (key {key})")
                continue
            folder = image_dir / img["filepath"] if isinstance(img.get("filepath"), str) else image_dir
            meta = {k: img[k] for k in ("split", "imgid", "cocoid") if k in img}
            yield Item(key, caps, ImageSource(path=str(folder / img["filename"])), where, language, meta=meta)

    return Source(records(), total=len(entries))


# --------------------------------------------------------------------------------------------
# jsonl: one object per image (the layout of ../shared/data/*/captions.jsonl)
# --------------------------------------------------------------------------------------------


class _BadRecord(ValueError):
    """One jsonl record that cannot become an item (a ``bad_record`` problem)."""


def _caption_field(record: dict, name: str) -> list[str]:
    value = record.get(name)
    if value is None:
        return []
    if isinstance(value, str):
        return caption_strings([value])
    if not isinstance(value, list):
        raise _BadRecord(f"{name!r} must be a string or a list of strings, got {type(value).__name__}")
    return caption_strings(value)


def _jsonl_captions(record: dict, spec: SourceSpec) -> tuple[list[str], str, list[str], str]:
    """``(captions, language, per-caption languages when mixed, the field(s) read)`` of one record."""
    if spec.caption_key is not None:
        m = _CAPTIONS_FIELD.match(spec.caption_key)
        language = spec.language or (m.group(1) if m else str(record.get("language") or "en"))
        return _caption_field(record, spec.caption_key), language, [], repr(spec.caption_key)
    if spec.language is not None:
        name = f"captions_{spec.language}" if f"captions_{spec.language}" in record else "captions"
        return _caption_field(record, name), spec.language, [], f"'captions_{spec.language}' or 'captions'"
    if "captions" in record:
        return _caption_field(record, "captions"), str(record.get("language") or "en"), [], "'captions'"
    by_lang = [(m.group(1), _caption_field(record, k)) for k in record if (m := _CAPTIONS_FIELD.match(k))]
    if len(by_lang) == 1:
        return by_lang[0][1], by_lang[0][0], [], f"'captions_{by_lang[0][0]}'"
    captions = [c for _, caps in by_lang for c in caps]
    languages = [lang for lang, caps in by_lang for _ in caps]
    return captions, "mul", languages, "'captions' or 'captions_XX'"


def _jsonl_objects(value: Any) -> tuple[list[str] | None, dict[str, int]]:
    """Object names (strings or ``{name, count}`` dicts) and the counts given, in record order."""
    if value is None:
        return None, {}
    if not isinstance(value, list):
        raise _BadRecord(f"'objects' must be a list, got {type(value).__name__}")
    names: list[str] = []
    counts: dict[str, int] = {}
    for obj in value:
        if isinstance(obj, str):
            name, count = obj, None
        elif isinstance(obj, dict) and isinstance(obj.get("name"), str):
            name, count = obj["name"], obj.get("count")
        else:
            raise _BadRecord(f"object entry {obj!r} is neither a string nor a {{'name': ...}} dict")
        name = name.strip()
        if not name:
            continue
        if name not in names:
            names.append(name)
        if isinstance(count, int) and not isinstance(count, bool):
            counts[name] = counts.get(name, 0) + count
    return names, counts


def read_jsonl(spec: SourceSpec) -> Source:
    """One JSON object per line: ``image`` (a path, relative to ``images`` or the jsonl's folder
    unless absolute), optional ``image_id``, captions and optional ``objects``.

    Captions: with ``caption_key``, that field only; with ``language L``, ``captions_L`` (else
    ``captions``); without either, ``captions`` (language from the record's ``language``, else
    ``en``), or every ``captions_XX`` field: one gives language ``XX``, several give ``mul`` with
    ``meta["languages"]`` per caption. Objects: strings or ``{name, count}`` dicts (counts go to
    ``meta["object_counts"]``). Other scalar fields (e.g. ``license``) are kept in ``meta``.
    """
    path = _require_file(spec.input, "jsonl input")
    base = Path(spec.images) if spec.images is not None else path.parent
    total = sum(1 for _ in _nonblank_lines(path))

    def records() -> Iterator[Record]:
        for lineno, rec in jsonl_objects(path):
            where = f"{path}:{lineno}"
            if isinstance(rec, str):
                yield Problem(BAD_RECORD, where, rec)
                continue
            image = rec.get("image")
            if not isinstance(image, str) or not image.strip():
                yield Problem(BAD_RECORD, where, "no 'image' path")
                continue
            try:
                names, counts = _jsonl_objects(rec.get("objects"))
                captions, language, languages, fields = _jsonl_captions(rec, spec)
            except _BadRecord as exn:
                yield Problem(BAD_RECORD, where, str(exn))
                continue
            image_id = rec.get("image_id")
            key = sample_key(image_id if image_id is not None and str(image_id).strip() else Path(image).stem)
            if not key:
                yield Problem(BAD_RECORD, where, "empty image id")
                continue
            if not captions:
                yield Problem(NO_CAPTIONS, where, f"no caption in {fields} (key {key})")
                continue
            meta = {k: v for k, v in rec.items() if k not in _JSONL_CONSUMED and not _CAPTIONS_FIELD.match(k)
                    and k not in _RESERVED_META and isinstance(v, (str, int, float, bool))}
            if image_id is not None:
                meta["image_id"] = image_id
            if languages:
                meta["languages"] = languages
            if counts:
                meta["object_counts"] = counts
            image_path = Path(image) if os.path.isabs(image) else base / image
            yield Item(key, captions, ImageSource(path=str(image_path)), where, language, names, meta)

    return Source(records(), total=total)


# --------------------------------------------------------------------------------------------
# shards: what the packer writes (and img2dataset shards)
# --------------------------------------------------------------------------------------------


def read_shards(spec: SourceSpec) -> Source:
    """Every sample of WebDataset shards (``input``: folder, brace pattern, glob or list), shard by
    shard in list order, decoded by :func:`~ernievil2.data.shard_reader.read_shard`; a sample that
    does not decode, or a damaged shard, is a :data:`BAD_RECORD` problem naming shard and key.
    ``language`` overrides the samples' own."""
    from ernievil2.data.sample import BadSample
    from ernievil2.data.shard_reader import list_shards, read_shard, read_sizes, shard_sizes

    try:
        urls = list_shards(spec.input)
    except (OSError, ValueError) as exn:
        raise FormatError(f"shards {spec.input}: {exn}") from None

    def records() -> Iterator[Record]:
        for url, expected in zip(urls, shard_sizes(urls)):
            damage: list[Exception] = []
            for key, sample in read_shard(url, lambda u, exn: damage.append(exn), expected):
                where = f"{url}: sample {key}"
                if isinstance(sample, BadSample):
                    yield Problem(BAD_RECORD, where, str(sample))
                else:
                    yield Item(sample.key, list(sample.captions), ImageSource(data=sample.image), where,
                               spec.language or sample.lang, sample.objects, dict(sample.meta))
            if damage:
                yield Problem(BAD_RECORD, f"{url}: damaged shard", str(damage[0]))

    return Source(records(), total=read_sizes(urls))


READERS: dict[str, Callable[[SourceSpec], Source]] = {
    "seed_tsv": read_seed_tsv,
    "chinese_clip": read_chinese_clip,
    "coco": read_coco,
    "karpathy": read_karpathy,
    "jsonl": read_jsonl,
    "shards": read_shards,
}
assert tuple(READERS) == FORMATS


def open_source(spec: SourceSpec) -> Source:
    """Open ``spec.input`` with the reader of ``spec.format`` (:class:`FormatError` for an unknown
    format or an unusable input)."""
    return READERS[check_format(spec.format)](spec)
