"""Readers of the JSON formats, images as files in a folder: ``coco`` (captions json + optional
instances json for object tags), ``karpathy`` (``dataset_{flickr30k,coco}.json``) and ``jsonl`` (one
object per image)."""
from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ernievil2.data.formats.base import (
    BAD_RECORD,
    DEFAULT_LANGUAGE,
    NO_CAPTIONS,
    FormatError,
    ImageSource,
    Item,
    Problem,
    Record,
    Source,
    SourceSpec,
    caption_strings,
    load_json,
    nonblank_lines,
    require_file,
    sample_key,
)
from ernievil2.jsonl import jsonl_objects

_CAPTIONS_FIELD = re.compile(r"^captions_([A-Za-z][A-Za-z_-]*)$")
_JSONL_CONSUMED = frozenset({"image", "image_id", "captions", "language", "objects", "boxes"})
_RESERVED_META = frozenset({"key", "captions", "language", "objects"})


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
    path = require_file(spec.input, "COCO captions json")
    data = load_json(path, ("images", "annotations"), "COCO captions")
    image_dir = Path(spec.images) if spec.images is not None else path.parent
    language = spec.language or DEFAULT_LANGUAGE["coco"]
    captions: dict[Any, list[Any]] = {}
    for ann in data["annotations"]:
        if isinstance(ann, dict) and "image_id" in ann:
            captions.setdefault(ann["image_id"], []).append(ann.get("caption"))
    objects, categories = (coco_objects(require_file(spec.instances, "COCO instances json"))
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
    path = require_file(spec.input, "Karpathy json")
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
    path = require_file(spec.input, "jsonl input")
    base = Path(spec.images) if spec.images is not None else path.parent
    total = sum(1 for _ in nonblank_lines(path))

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

