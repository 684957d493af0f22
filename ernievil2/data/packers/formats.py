"""Input readers of the packer: one per dataset layout, each yielding one record per image.

A reader yields :class:`PackItem` (an image with all its captions) or :class:`Skipped` (a record that
cannot become a sample, with the reason and where it is). Structural problems (a missing file, a
JSON file without its top-level fields) raise :class:`PackError` naming the file.

Sample keys are the dataset's image ids (or file stems) with every character outside letters,
digits, ``_`` and ``-`` replaced by ``_`` (see :func:`sample_key`); ``--objects`` files are
matched on these keys, ``--detections`` files too (through :attr:`Source.image_keys` where the
key is not the image id: COCO).
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ernievil2.jsonl import jsonl_objects

from .images import ImageSource

# Skip reasons produced by readers.
BAD_RECORD = "bad_record"
NO_CAPTIONS = "no_captions"

FORMATS: tuple[str, ...] = ("seed-tsv", "chinese-clip", "coco", "karpathy", "jsonl")
"""Input layouts ``pack`` reads."""

_KEY_BAD_CHARS = re.compile(r"[^\w-]")
_CAPTIONS_FIELD = re.compile(r"^captions_([A-Za-z][A-Za-z_-]*)$")
_JSONL_CONSUMED = frozenset({"image", "image_id", "captions", "language", "objects", "boxes"})
_RESERVED_META = frozenset({"key", "captions", "language", "objects"})


class PackError(ValueError):
    """Input that cannot be packed at all (missing file, wrong structure, bad options)."""


class _BadRecord(ValueError):
    """One record that cannot become a sample (counted as a ``bad_record`` skip)."""


@dataclass
class PackItem:
    """One image with all of its captions, before its image is loaded."""

    key: str
    captions: list[str]
    lang: str
    source: ImageSource
    where: str
    objects: list[str] | None = None
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Skipped:
    """A record that gives no sample: ``reason`` (a short name) and ``where`` (file:line or key)."""

    reason: str
    where: str


Record = PackItem | Skipped


@dataclass(frozen=True)
class SourceSpec:
    """What to read: the format and its files.

    ``input``: the main file (seed tsv, ``imgs.tsv`` or a folder holding ``{split}_imgs.tsv``, COCO
    captions json, Karpathy json, captions jsonl). ``images``: image folder (coco, karpathy; jsonl:
    base of relative image paths, default the jsonl's folder). ``texts``: Chinese-CLIP texts jsonl
    (default beside ``imgs.tsv``). ``instances``: COCO instances json (object tags). ``language``:
    overrides the format's language. ``splits``: Karpathy splits to keep / the Chinese-CLIP split.
    """

    format: str
    input: Path
    images: Path | None = None
    texts: Path | None = None
    instances: Path | None = None
    language: str | None = None
    splits: tuple[str, ...] = ()


@dataclass
class Source:
    """An opened input: its records (lazy) and their number when known up front.

    ``image_keys``: ``str(image id) -> sample key`` for formats whose key is not the image id
    (COCO: the file-name stem), so detector results naming images by id find their samples.
    ``categories``: ``category id -> name`` of the input's own object annotations (COCO
    ``--instances``), ``None`` when it has none.
    """

    records: Iterator[Record]
    total: int | None
    notes: dict[str, Any] = field(default_factory=dict)
    image_keys: dict[str, str] = field(default_factory=dict)
    categories: dict[Any, str] | None = None


def sample_key(raw_id: Any) -> str:
    """The shard key for an image id: characters other than letters, digits, ``_``, ``-`` become ``_``;
    a key that would look like WebDataset metadata (``__x__``) gets a ``k`` prefix."""
    key = _KEY_BAD_CHARS.sub("_", str(raw_id).strip())
    if key.startswith("__") and key.endswith("__"):
        key = "k" + key
    return key


def clean_captions(captions: Iterable[Any]) -> list[str]:
    """Captions stripped, empty and non-string ones dropped, exact duplicates removed (first kept)."""
    out: dict[str, None] = {}
    for c in captions:
        if isinstance(c, str) and c.strip():
            out.setdefault(c.strip(), None)
    return list(out)


def _item(key: Any, captions: Iterable[Any], lang: str, source: ImageSource, where: str,
          objects: list[str] | None = None, meta: dict | None = None) -> Record:
    clean = clean_captions(captions)
    k = sample_key(key)
    if not k:
        return Skipped(BAD_RECORD, f"{where}: empty image id")
    if not clean:
        return Skipped(NO_CAPTIONS, f"{where} (key {k})")
    return PackItem(key=k, captions=clean, lang=lang, source=source, where=where, objects=objects, meta=meta or {})


def _require_file(path: Path | None, what: str) -> Path:
    if path is None:
        raise PackError(f"{what} is required")
    if not Path(path).is_file():
        raise PackError(f"{what} {path} does not exist or is not a file")
    return Path(path)


def _load_json(path: Path, required: tuple[str, ...]) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exn:
        raise PackError(f"{path}: cannot read JSON ({exn})") from exn
    if not isinstance(data, dict):
        raise PackError(f"{path}: top level is a {type(data).__name__}, expected an object")
    missing = [k for k in required if not isinstance(data.get(k), list)]
    if missing:
        raise PackError(f"{path}: missing list field(s) {missing}")
    return data


def _tsv_rows(path: Path, n_fields: int, maxsplit: int = -1) -> Iterator[tuple[str, list[str] | Skipped]]:
    """``("path:line", fields)`` per non-blank line of a tab-separated file (split at most
    ``maxsplit`` times; -1: at every tab); a line with another number of fields comes as a
    :class:`Skipped` record instead."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.rstrip("\r\n").split("\t", maxsplit)
            where = f"{path}:{lineno}"
            if len(parts) != n_fields:
                yield where, Skipped(BAD_RECORD, f"{where}: {len(parts)} tab-separated field(s), expected {n_fields}")
                continue
            yield where, parts


# --------------------------------------------------------------------------------------------
# seed-tsv: text \t image_id \t base64, several lines per image allowed
# --------------------------------------------------------------------------------------------


def read_seed_tsv(spec: SourceSpec) -> Source:
    """Seed evaluation lines grouped by image id: the first line of an id gives the image, every line
    of it a caption. Two passes (texts, then images) keep the base64 payloads out of memory."""
    path = _require_file(spec.input, "seed tsv --input")
    lang = spec.language or "zh"
    captions: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = line.rstrip("\r\n").split("\t", 2)
            if len(parts) == 3:
                captions.setdefault(parts[1].strip(), []).append(parts[0])

    def records() -> Iterator[Record]:
        emitted: set[str] = set()
        for where, parts in _tsv_rows(path, 3, maxsplit=2):
            if isinstance(parts, Skipped):
                yield parts
                continue
            image_id = parts[1].strip()
            if image_id in emitted:
                continue
            emitted.add(image_id)
            yield _item(image_id, captions[image_id], lang, ImageSource(b64=parts[2]), where,
                        meta={"image_id": image_id})

    return Source(records(), total=len(captions))


# --------------------------------------------------------------------------------------------
# chinese-clip: {split}_imgs.tsv (image_id \t base64) + {split}_texts.jsonl
# --------------------------------------------------------------------------------------------


def _chinese_clip_paths(spec: SourceSpec) -> tuple[Path, Path]:
    imgs = Path(spec.input)
    if imgs.is_dir():
        if len(spec.splits) != 1:
            raise PackError(f"--input {imgs} is a folder: name one split (--split train) to read {{split}}_imgs.tsv")
        imgs = imgs / f"{spec.splits[0]}_imgs.tsv"
    imgs = _require_file(imgs, "Chinese-CLIP imgs.tsv")
    texts = spec.texts
    if texts is None:
        if not imgs.name.endswith("imgs.tsv"):
            raise PackError(f"cannot derive the texts file from {imgs} (name does not end in imgs.tsv): pass --texts")
        texts = imgs.with_name(imgs.name[: -len("imgs.tsv")] + "texts.jsonl")
    return imgs, _require_file(texts, "Chinese-CLIP texts.jsonl")


def read_chinese_clip(spec: SourceSpec) -> Source:
    """Chinese-CLIP / PaddleNLP fine-tune data: texts are grouped by image id first, then ``imgs.tsv``
    is streamed; each image gets every text that lists it."""
    imgs, texts_path = _chinese_clip_paths(spec)
    lang = spec.language or "zh"
    captions: dict[str, list[str]] = {}
    for lineno, obj in jsonl_objects(texts_path):
        where = f"{texts_path}:{lineno}"
        if isinstance(obj, str):
            raise PackError(f"{where}: {obj}")
        text, image_ids = obj.get("text"), obj.get("image_ids")
        if not isinstance(text, str) or not isinstance(image_ids, list):
            raise PackError(f"{where}: needs 'text' (string) and 'image_ids' (list), got keys {sorted(obj)}")
        for image_id in image_ids:
            captions.setdefault(str(image_id).strip(), []).append(text)
    notes: dict[str, Any] = {"text_image_ids": len(captions)}

    def records() -> Iterator[Record]:
        seen: set[str] = set()
        for where, parts in _tsv_rows(imgs, 2):
            if isinstance(parts, Skipped):
                yield parts
                continue
            image_id = parts[0].strip()
            seen.add(image_id)
            yield _item(image_id, captions.get(image_id, []), lang, ImageSource(b64=parts[1]), where,
                        meta={"image_id": image_id})
        notes["text_image_ids_without_image"] = len(set(captions) - seen)

    return Source(records(), total=None, notes=notes)


# --------------------------------------------------------------------------------------------
# coco: captions_*.json (+ instances_*.json for object tags) + image folder
# --------------------------------------------------------------------------------------------


def category_names(categories: list, path: Path) -> dict[Any, str]:
    """``id -> name`` of a COCO ``categories`` list; raises :class:`PackError` naming ``path`` for an
    entry without an ``id`` (int or str) and a non-empty ``name``, or an id given two names."""
    names: dict[Any, str] = {}
    for cat in categories:
        cat_id = cat.get("id") if isinstance(cat, dict) else None
        name = cat.get("name") if isinstance(cat, dict) else None
        if isinstance(cat_id, bool) or not isinstance(cat_id, (int, str)) or not isinstance(name, str) \
                or not name.strip():
            raise PackError(f"{path}: category {cat!r} lacks 'id' or 'name'")
        if names.get(cat_id, name.strip()) != name.strip():
            raise PackError(f"{path}: category id {cat_id!r} is named both {names[cat_id]!r} and {name.strip()!r}")
        names[cat_id] = name.strip()
    return names


def coco_objects(instances_path: Path) -> tuple[dict[int, Counter], dict[Any, str]]:
    """``(image id -> Counter(category name), category id -> name)`` from a COCO instances json
    (crowd boxes included)."""
    data = _load_json(instances_path, ("annotations", "categories"))
    names = category_names(data["categories"], instances_path)
    counts: dict[int, Counter] = {}
    for ann in data["annotations"]:
        cat_id = ann.get("category_id") if isinstance(ann, dict) else None
        if cat_id not in names or "image_id" not in ann:
            raise PackError(f"{instances_path}: annotation {ann.get('id', '?') if isinstance(ann, dict) else ann!r} "
                            f"has no image_id or an unknown category_id {cat_id!r}")
        counts.setdefault(ann["image_id"], Counter())[names[cat_id]] += 1
    return counts, names


def _ranked(counter: Counter) -> list[str]:
    """Names by count, most frequent first (ties: first seen first)."""
    return [name for name, _ in counter.most_common()]


def read_coco(spec: SourceSpec) -> Source:
    """COCO captions (+ optional instances for object tags with counts); images from ``--images``
    (default: the captions json's folder); keys are the file-name stems, in ``images`` order."""
    path = _require_file(spec.input, "COCO captions json --input")
    data = _load_json(path, ("images", "annotations"))
    image_dir = Path(spec.images) if spec.images is not None else path.parent
    lang = spec.language or "en"
    captions: dict[Any, list[str]] = {}
    for ann in data["annotations"]:
        if isinstance(ann, dict) and "image_id" in ann and isinstance(ann.get("caption"), str):
            captions.setdefault(ann["image_id"], []).append(ann["caption"])
    objects, categories = (coco_objects(_require_file(spec.instances, "--instances")) if spec.instances is not None
                           else ({}, None))
    images = data["images"]
    image_keys = {str(img["id"]): sample_key(Path(img["file_name"]).stem) for img in images
                  if isinstance(img, dict) and "id" in img and isinstance(img.get("file_name"), str)}

    def records() -> Iterator[Record]:
        for index, img in enumerate(images):
            where = f"{path}, images[{index}]"
            if not isinstance(img, dict) or "id" not in img or not isinstance(img.get("file_name"), str):
                yield Skipped(BAD_RECORD, f"{where}: needs 'id' and 'file_name'")
                continue
            meta: dict[str, Any] = {"image_id": img["id"]}
            names: list[str] | None = None
            if img["id"] in objects:
                names = _ranked(objects[img["id"]])
                meta["object_counts"] = {n: objects[img["id"]][n] for n in names}
            yield _item(Path(img["file_name"]).stem, captions.get(img["id"], []), lang,
                        ImageSource(path=str(image_dir / img["file_name"])), where, objects=names, meta=meta)

    return Source(records(), total=len(images), image_keys=image_keys, categories=categories)


# --------------------------------------------------------------------------------------------
# karpathy: dataset_{flickr30k,coco}.json + image folder
# --------------------------------------------------------------------------------------------


def read_karpathy(spec: SourceSpec) -> Source:
    """Karpathy split json: ``images[{filename, filepath?, split, sentences[{raw}]}]``, filtered to
    ``splits`` when given; image at ``--images/[filepath/]filename``; key = file-name stem."""
    path = _require_file(spec.input, "Karpathy json --input")
    data = _load_json(path, ("images",))
    if spec.images is None:
        raise PackError("karpathy needs --images (the folder holding the image files)")
    image_dir = Path(spec.images)
    lang = spec.language or "en"
    wanted = set(spec.splits)
    images = [img for img in data["images"] if not wanted or (isinstance(img, dict) and img.get("split") in wanted)]

    def records() -> Iterator[Record]:
        for index, img in enumerate(images):
            where = f"{path}, image {index}"
            if not isinstance(img, dict) or not isinstance(img.get("filename"), str) \
                    or not isinstance(img.get("sentences"), list):
                yield Skipped(BAD_RECORD, f"{where}: needs 'filename' and 'sentences'")
                continue
            raw = [s.get("raw") if isinstance(s, dict) else None for s in img["sentences"]]
            folder = image_dir / img["filepath"] if isinstance(img.get("filepath"), str) else image_dir
            meta = {k: img[k] for k in ("split", "imgid", "cocoid") if k in img}
            yield _item(Path(img["filename"]).stem, raw, lang, ImageSource(path=str(folder / img["filename"])),
                        where, meta=meta)

    return Source(records(), total=len(images))


# --------------------------------------------------------------------------------------------
# jsonl: one object per image (the layout of ../shared/data/*/captions.jsonl)
# --------------------------------------------------------------------------------------------


def _jsonl_captions(record: dict, language: str | None) -> tuple[list[Any], str, list[str]]:
    """(captions, language, per-caption languages when several are mixed) of one jsonl record."""
    if language is not None:
        field_value = record.get(f"captions_{language}", record.get("captions"))
        return _as_list(field_value), language, []
    if "captions" in record:
        return _as_list(record["captions"]), str(record.get("language") or "en"), []
    by_lang = [(m.group(1), _as_list(v)) for k, v in record.items() if (m := _CAPTIONS_FIELD.match(k))]
    if len(by_lang) == 1:
        return by_lang[0][1], by_lang[0][0], []
    first_language: dict[str, str] = {}  # caption -> language, deduplicated across languages too
    for lang, caps in by_lang:
        for caption in clean_captions(caps):
            first_language.setdefault(caption, lang)
    return list(first_language), "mul", list(first_language.values())


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


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
    """One JSON object per line: ``image`` (path, relative to ``--images`` or the jsonl's folder),
    optional ``image_id`` (else the file stem is the key), captions and optional ``objects``.

    Captions: with ``--language L``, ``captions_L`` (else ``captions``); without it, ``captions``
    (language from the record's ``language``, else ``en``), or every ``captions_XX`` field: one such
    field gives language ``XX``, several give ``mul`` with ``meta["languages"]`` per caption.
    Objects: strings or ``{name, count}`` dicts (counts go to ``meta["object_counts"]``). Other
    scalar fields (e.g. ``license``) are kept in the sample's json.
    """
    path = _require_file(spec.input, "jsonl --input")
    base = Path(spec.images) if spec.images is not None else path.parent
    with open(path, encoding="utf-8") as f:
        total = sum(1 for line in f if line.strip())

    def records() -> Iterator[Record]:
        for lineno, rec in jsonl_objects(path):
            where = f"{path}:{lineno}"
            if isinstance(rec, str):
                yield Skipped(BAD_RECORD, f"{where}: {rec}")
                continue
            image = rec.get("image")
            if not isinstance(image, str) or not image:
                yield Skipped(BAD_RECORD, f"{where}: no 'image' path")
                continue
            try:
                names, counts = _jsonl_objects(rec.get("objects"))
            except _BadRecord as exn:
                yield Skipped(BAD_RECORD, f"{where}: {exn}")
                continue
            captions, lang, languages = _jsonl_captions(rec, spec.language)
            meta = {k: v for k, v in rec.items() if k not in _JSONL_CONSUMED and not _CAPTIONS_FIELD.match(k)
                    and k not in _RESERVED_META and isinstance(v, (str, int, float, bool))}
            image_id = rec.get("image_id")
            if image_id is not None:
                meta["image_id"] = image_id
            if languages:
                meta["languages"] = languages
            if counts:
                meta["object_counts"] = counts
            key = image_id if image_id is not None and str(image_id).strip() else Path(image).stem
            image_path = Path(image) if os.path.isabs(image) else base / image
            yield _item(key, captions, lang, ImageSource(path=str(image_path)), where, objects=names, meta=meta)

    return Source(records(), total=total)


READERS: dict[str, Callable[[SourceSpec], Source]] = {
    "seed-tsv": read_seed_tsv,
    "chinese-clip": read_chinese_clip,
    "coco": read_coco,
    "karpathy": read_karpathy,
    "jsonl": read_jsonl,
}


def open_source(spec: SourceSpec) -> Source:
    """Open ``spec.input`` with the reader of ``spec.format`` (raises :class:`PackError`)."""
    if spec.format not in READERS:
        raise PackError(f"unknown format {spec.format!r}; choose one of {', '.join(FORMATS)}")
    return READERS[spec.format](spec)
