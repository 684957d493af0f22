"""Readers of the TSV formats, images as base64 columns: ``seed_tsv`` (upstream, lines grouped by image
id) and ``chinese_clip`` (``{split}_imgs.tsv`` + ``{split}_texts.jsonl``)."""
from __future__ import annotations

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
    decode_line,
    nonblank_lines,
    require_file,
    sample_key,
)
from ernievil2.data.formats.seed_lines import (
    SEED_LINE_REASONS,
    LineProblem,
    SeedLine,
    check_seed_image,
    parse_seed_line,
)
from ernievil2.jsonl import jsonl_objects

# --------------------------------------------------------------------------------------------
# seed_tsv: text \t image_id \t base64, several lines per image allowed
# --------------------------------------------------------------------------------------------


def read_seed_tsv(spec: SourceSpec) -> Source:
    """Seed lines grouped by image id, in first-seen order: an id's item has the texts of all its
    good lines and the image of the first one. A line is good when it passes every check of
    :data:`SEED_LINE_CHECKS` (base64 included) and has an image id; every other line is a
    :class:`Problem` (reason per :data:`SEED_LINE_REASONS`, ``bad_record`` for an empty id), in
    line order. Two passes (checks and texts, then images) keep the base64 payloads out of memory."""
    path = require_file(spec.input, "seed_tsv input")
    language = spec.language or DEFAULT_LANGUAGE["seed_tsv"]
    captions: dict[str, list[str]] = {}
    first_line: dict[int, str] = {}  # line number -> image id whose image it gives
    problems: dict[int, Problem] = {}
    for lineno, raw in nonblank_lines(path):
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
        for lineno, raw in nonblank_lines(path):
            if lineno in problems:
                yield problems[lineno]
            elif lineno in first_line:
                image_id = first_line[lineno]
                b64 = decode_line(raw).split("\t")[2].strip()
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
    imgs = require_file(imgs, "Chinese-CLIP imgs.tsv")
    texts = spec.texts
    if texts is None:
        if not imgs.name.endswith("imgs.tsv"):
            raise FormatError(f"cannot derive the texts file from {imgs} (name does not end in imgs.tsv): pass --texts")
        texts = imgs.with_name(imgs.name[: -len("imgs.tsv")] + "texts.jsonl")
    return imgs, require_file(texts, "Chinese-CLIP texts.jsonl")


def read_chinese_clip(spec: SourceSpec) -> Source:
    """Chinese-CLIP / PaddleNLP fine-tune data: the texts are grouped by image id first (a malformed
    texts line is a :class:`FormatError`), then ``imgs.tsv`` is streamed; each image gets every
    text that lists it, each caption's ``caption_ids`` entry naming its texts line (a text listing
    several images is one text). An image no text lists is a ``no_captions`` problem, or, with
    ``spec.keep_uncaptioned``, an item with no captions. The base64 is decoded when the image is loaded."""
    imgs, texts_path = _chinese_clip_paths(spec)
    language = spec.language or DEFAULT_LANGUAGE["chinese_clip"]
    captions: dict[str, list[str]] = {}
    caption_ids: dict[str, list[str]] = {}
    for lineno, obj in jsonl_objects(texts_path):
        where = f"{texts_path}:{lineno}"
        if isinstance(obj, str):
            raise FormatError(f"{where}: {obj}")
        text, image_ids = obj.get("text"), obj.get("image_ids")
        if not isinstance(text, str) or not isinstance(image_ids, list):
            raise FormatError(f"{where}: needs 'text' (string) and 'image_ids' (list), got keys {sorted(obj)}")
        kept = caption_strings([text])
        for image_id in image_ids:
            captions.setdefault(str(image_id).strip(), []).extend(kept)
            caption_ids.setdefault(str(image_id).strip(), []).extend(f"line {lineno}" for _ in kept)
    notes: dict[str, Any] = {"text_image_ids": len(captions)}

    def records() -> Iterator[Record]:
        seen: set[str] = set()
        for lineno, raw in nonblank_lines(imgs):
            where = f"{imgs}:{lineno}"
            try:
                cols = decode_line(raw).split("\t")
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
            elif not captions.get(image_id) and not spec.keep_uncaptioned:
                yield Problem(NO_CAPTIONS, where, f"no text lists image id {image_id!r}")
            else:
                yield Item(sample_key(image_id), list(captions.get(image_id, ())), ImageSource(b64=cols[1].strip()),
                           where, language, meta={"image_id": image_id}, caption_ids=list(caption_ids.get(image_id, ())))
        notes["text_image_ids_without_image"] = len(set(captions) - seen)

    return Source(records(), total=None, notes=notes)

