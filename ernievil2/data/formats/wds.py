"""clip_benchmark's WebDataset layout (LAION's CLIP_benchmark, ``wds/NAME`` datasets) and the reader of
its retrieval sets, the ``wds_retrieval`` format.

A dataset folder holds one sub-folder per split (``test/``, ``train/``) with ``nshards.txt`` (the
number of shards) and the shards ``0.tar … {n-1}.tar``, and beside them ``dataset_type.txt``
(``retrieval``; anything else, or no file, is classification), ``classnames.txt`` (one name per
line) and ``zeroshot_classification_templates.txt`` (one template per line, ``{c}`` for the class).
A sample is ``KEY.jpg|jpeg|png|webp`` plus ``KEY.cls`` (an integer class index; classification, read
by :func:`ernievil2.evaluators.zeroshot.read_class_shards`) or ``KEY.txt`` with ONE CAPTION PER
LINE (retrieval, read here).

The packer's own shards (format ``shards``) keep one caption in ``KEY.txt`` and all of them in
``KEY.json``: their ``txt`` is never split. Only this format splits it, line by line (each line
stripped, blank ones dropped).
"""
from __future__ import annotations

import os
import urllib.error
import urllib.request
from collections.abc import Iterator

from ernievil2.data.formats.base import (
    BAD_RECORD,
    NO_CAPTIONS,
    FormatError,
    ImageSource,
    Item,
    Problem,
    Record,
    Source,
    SourceSpec,
)

NSHARDS = "nshards.txt"
DATASET_TYPE = "dataset_type.txt"
CLASSNAMES = "classnames.txt"
TEMPLATES = "zeroshot_classification_templates.txt"
DEFAULT_SPLIT = "test"


def _is_remote(path: str) -> bool:
    return path.startswith(("http://", "https://"))


def read_text(path: str) -> str | None:
    """The text of a local file or ``http(s)://`` URL; ``None`` when it does not exist."""
    try:
        if _is_remote(path):
            with urllib.request.urlopen(path, timeout=30) as resp:
                return resp.read().decode("utf-8")
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (FileNotFoundError, NotADirectoryError, urllib.error.HTTPError):
        return None


def dataset_type(root: str) -> str:
    """``retrieval``, ``multilabel`` or ``classification`` from ``root/dataset_type.txt``
    (classification for any other content, or without one, as clip_benchmark reads it)."""
    text = read_text(f"{root.rstrip('/')}/{DATASET_TYPE}")
    kind = (text or "").strip().lower()
    return "retrieval" if kind == "retrieval" else (kind if kind == "multilabel" else "classification")


def wds_shards(path: str, split: str | None = DEFAULT_SPLIT) -> str:
    """The shard specification (:func:`ernievil2.data.shard_reader.list_shards`) of a split of a
    clip_benchmark dataset: ``path`` is the dataset folder (its ``split`` sub-folder is read) or the
    split folder itself, local or ``http(s)://``. A folder with ``nshards.txt`` gives
    ``FOLDER/{0..n-1}.tar`` (clip_benchmark's shard order); a local dataset folder without one, its
    split folder (its ``*.tar``); anything else (a folder of ``*.tar``, a shard, a pattern, a list
    item) is returned as it is. :class:`FormatError` for an ``nshards.txt`` that is not a positive
    integer."""
    base = path.rstrip("/")
    if base.endswith(".tar") or base.startswith("pipe:") or any(c in base for c in "{*?["):
        return path
    for folder in ([f"{base}/{split}"] if split else []) + [base]:
        text = read_text(f"{folder}/{NSHARDS}")
        if text is None:
            continue
        try:
            n = int(text.strip())
        except ValueError:
            n = 0
        if n < 1:
            raise FormatError(f"{folder}/{NSHARDS}: expected a number of shards >= 1, got {text.strip()[:40]!r}")
        return f"{folder}/{{0..{n - 1}}}.tar"
    if split and not _is_remote(base) and os.path.isdir(f"{base}/{split}") and not _holds_tars(base):
        return f"{base}/{split}"
    return path


def _holds_tars(folder: str) -> bool:
    return os.path.isdir(folder) and any(n.endswith(".tar") for n in os.listdir(folder))


def missing_local(path: str) -> bool:
    """True for a local path (not a URL, ``pipe:`` or pattern) that does not exist."""
    return not path.startswith(("http://", "https://", "pipe:")) and not any(c in path for c in "{*?[") \
        and not os.path.exists(path)


def caption_lines(txt: bytes | str) -> list[str]:
    """The captions of a clip_benchmark ``KEY.txt``: its lines, stripped, blank ones dropped
    (``UnicodeDecodeError`` when not UTF-8)."""
    text = txt.decode("utf-8") if isinstance(txt, (bytes, bytearray)) else str(txt)
    return [line.strip() for line in text.splitlines() if line.strip()]


def _decode(raw: dict) -> tuple[bytes, list[str]] | Problem:
    """``(image bytes, captions)`` of a raw retrieval sample, or the :class:`Problem` it is."""
    from ernievil2.data.shard_codec import IMAGE_EXTS

    where = f"{raw.get('__url__', '?')}: sample {raw.get('__key__', '?')}"
    image = next((raw[e] for e in IMAGE_EXTS if raw.get(e)), None)
    if image is None:
        return Problem(BAD_RECORD, where, f"no image (looked for {', '.join(IMAGE_EXTS)})")
    if raw.get("txt") is None:
        return Problem(NO_CAPTIONS, where, "no KEY.txt")
    try:
        captions = caption_lines(raw["txt"])
    except UnicodeDecodeError as exn:
        return Problem(NO_CAPTIONS, where, f"txt is not UTF-8 ({exn})")
    if not captions:
        return Problem(NO_CAPTIONS, where, "empty KEY.txt (no caption line)")
    return bytes(image), captions


def read_wds_retrieval(spec: SourceSpec) -> Source:
    """A clip_benchmark retrieval set: ``input`` is the dataset folder (its ``splits[0]`` sub-folder,
    default ``test``, is read), a split folder or any shard specification. Every sample is an
    :class:`Item` whose captions are its ``txt``'s lines; a sample without image or caption, or a
    damaged shard, is a :class:`Problem` naming shard and key."""
    from ernievil2.data.shard_reader import list_shards, read_shard

    if not isinstance(spec.input, (str, os.PathLike)):
        raise FormatError(f"wds_retrieval: input must be one dataset folder, got {spec.input!r}")
    root = os.fspath(spec.input)
    if missing_local(root):
        raise FormatError(f"wds_retrieval: dataset folder not found: {root}")
    split = spec.splits[0] if spec.splits else DEFAULT_SPLIT
    try:
        urls = list_shards(wds_shards(root, split))
    except (OSError, ValueError) as exn:
        raise FormatError(f"wds_retrieval: no shards in {root} (expected {root}/{split}/{NSHARDS} and "
                          f"{split}/0.tar …): {exn}") from None
    language = spec.language or "en"

    def records() -> Iterator[Record]:
        for url in urls:
            damage: list[Exception] = []
            for key, sample in read_shard(url, lambda u, exn: damage.append(exn), decode=_decode):
                if isinstance(sample, ValueError):  # read_shard's own refusal (never raised by _decode)
                    yield Problem(BAD_RECORD, f"{url}: sample {key}", str(sample))
                elif isinstance(sample, Problem):
                    yield sample
                else:
                    image, captions = sample
                    yield Item(key, captions, ImageSource(data=image), f"{url}: sample {key}", language)
            if damage:
                yield Problem(BAD_RECORD, f"{url}: damaged shard", str(damage[0]))

    return Source(records())
