"""One WebDataset sample as tar members and back: the shard layout, :func:`sample_to_members` and :func:`decode_sample`.

Layout (img2dataset-compatible, one sample = three tar members sharing a key):

- ``KEY.jpg`` / ``KEY.png`` / ``KEY.webp``: the encoded image bytes, as given;
- ``KEY.txt``: the first caption, UTF-8;
- ``KEY.json``: ``{"key", "captions": [...], "language", "objects": [...] (absent when the sample
  has no object tags), **meta}``.

img2dataset's own shards read the same way: ``KEY.txt`` is the caption, ``KEY.json`` its metadata
(``url``, ``caption``, ``status``, ``width``, ... — no ``captions``, no ``language``: the language is
then guessed from the caption's script).

A ``sizes.json`` beside the shards maps each shard file name to its number of samples
(:class:`~ernievil2.data.shard_writer.ShardWriter` writes it, :func:`~ernievil2.data.shard_reader.shard_sizes`
reads it).
"""
from __future__ import annotations

import json
from typing import Any

from .caption_language import guess_language
from .sample import BadSample, RawSample

IMAGE_EXTS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
"""Image member suffixes recognised when reading, in order of preference."""

_RESERVED_JSON_KEYS = frozenset({"key", "captions", "language", "objects"})


def _validate_key(key: str) -> None:
    if not isinstance(key, str) or not key:
        raise ValueError(f"sample key must be a non-empty string, got {key!r}")
    if "." in key:
        raise ValueError(f"sample key {key!r} contains '.', which WebDataset uses to split key from extension")
    if "/" in key or "\\" in key:
        raise ValueError(f"sample key {key!r} contains a path separator")
    if key.startswith("__") and key.endswith("__"):
        raise ValueError(f"sample key {key!r} looks like WebDataset metadata (__...__) and would be skipped")


def sample_to_members(sample: RawSample, image_ext: str = "jpg") -> list[tuple[str, bytes]]:
    """The ``(member name, bytes)`` triple one sample is stored as, in write order."""
    _validate_key(sample.key)
    ext = image_ext.lower().lstrip(".")
    if ext not in IMAGE_EXTS:
        raise ValueError(f"image_ext must be one of {IMAGE_EXTS}, got {image_ext!r} (key {sample.key!r})")
    if not isinstance(sample.image, (bytes, bytearray, memoryview)) or len(sample.image) == 0:
        raise ValueError(f"sample {sample.key!r} has no image bytes")
    captions = [str(c) for c in sample.captions]
    if not captions or not captions[0].strip():
        raise ValueError(f"sample {sample.key!r} has no caption")
    clash = _RESERVED_JSON_KEYS.intersection(sample.meta or {})
    if clash:
        raise ValueError(f"sample {sample.key!r}: meta uses reserved json field(s) {sorted(clash)}")
    record: dict[str, Any] = {"key": sample.key, "captions": captions, "language": sample.lang}
    if sample.objects is not None:
        record["objects"] = [str(o) for o in sample.objects]
    record.update(sample.meta or {})
    payload = json.dumps(record, ensure_ascii=False, sort_keys=False).encode("utf-8")
    return [
        (f"{sample.key}.{ext}", bytes(sample.image)),
        (f"{sample.key}.txt", captions[0].encode("utf-8")),
        (f"{sample.key}.json", payload),
    ]


def _object_names(objects: Any, where: str) -> list[str]:
    if not isinstance(objects, list):
        raise BadSample("bad_json", f"{where}: 'objects' must be a list, got {type(objects).__name__}")
    names: list[str] = []
    for obj in objects:
        if isinstance(obj, str):
            name = obj
        elif isinstance(obj, dict) and isinstance(obj.get("name"), str):
            name = obj["name"]
        else:
            raise BadSample("bad_json", f"{where}: object entry {obj!r} is neither a string nor a {{'name': ...}} dict")
        name = name.strip()
        if name:
            names.append(name)
    return names


def _captions(raw: dict, record: dict, where: str) -> list[str]:
    """The non-empty captions of a sample; :class:`BadSample` ``no_caption`` / ``bad_caption``."""
    given = False
    if isinstance(record.get("captions"), list) and record["captions"]:
        given = True
        captions = [c.strip() for c in record["captions"] if isinstance(c, str) and c.strip()]
        if captions:
            return captions
    if raw.get("txt") is not None:
        given = True
        txt = raw["txt"]
        try:
            text = txt.decode("utf-8") if isinstance(txt, (bytes, bytearray)) else str(txt)
        except UnicodeDecodeError as exn:
            raise BadSample("bad_caption", f"{where}: txt is not UTF-8 ({exn})") from exn
        if text.strip():
            return [text.strip()]
    if isinstance(record.get("caption"), str):
        given = True
        if record["caption"].strip():
            return [record["caption"].strip()]
    if given:
        raise BadSample("bad_caption", f"{where}: empty caption")
    raise BadSample("no_caption", f"{where}: no caption (no txt member, no json captions)")


def decode_sample(raw: dict) -> RawSample:
    """Turn a WebDataset-grouped dict (``__key__``, ``__url__``, image, ``txt``, ``json``) into a RawSample.

    Captions come from ``json["captions"]`` when present and non-empty, else from ``txt`` (else
    img2dataset's ``json["caption"]``). The language is ``json["language"]`` (or ``"lang"``, or LAION's
``"LANGUAGE"`` column as ``--save_additional_columns`` keeps it; lower-cased), else
    guessed from the captions' script (:func:`~ernievil2.data.caption_language.guess_language`:
    img2dataset's json names none). Object tags come from ``json["objects"]`` (strings or
    ``{"name", "count"}`` dicts → names); absent → ``None``. Unrecognised json fields become ``meta``.
    Raises :class:`BadSample` (a ``ValueError``) naming shard and key, of kind ``no_image``,
    ``bad_json`` (does not parse, not an object, malformed objects), ``no_caption`` or
    ``bad_caption`` (empty, or ``txt`` not UTF-8).
    """
    key = str(raw.get("__key__", "?"))
    url = str(raw.get("__url__", "?"))
    where = f"shard {url}, key {key}"
    image = None
    for ext in IMAGE_EXTS:
        if raw.get(ext):
            image = raw[ext]
            break
    if image is None:
        raise BadSample("no_image", f"{where}: no image (looked for {', '.join(IMAGE_EXTS)})")

    record: dict[str, Any] = {}
    if raw.get("json") is not None:
        data = raw["json"]
        try:
            record = json.loads(data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data)
        except ValueError as exn:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise BadSample("bad_json", f"{where}: json does not parse ({exn})") from exn
        if not isinstance(record, dict):
            raise BadSample("bad_json", f"{where}: json is a {type(record).__name__}, not an object")

    captions = _captions(raw, record, where)
    objects = _object_names(record["objects"], where) if record.get("objects") is not None else None
    named = record.get("language") or record.get("lang") or record.get("LANGUAGE")  # LAION's column, upper case
    lang = str(named).lower() if named else guess_language(" ".join(captions))
    meta = {k: v for k, v in record.items() if k not in _RESERVED_JSON_KEYS}
    return RawSample(key=key, image=bytes(image), captions=captions, objects=objects, lang=str(lang), meta=meta)
