"""Image↔text retrieval: reading a set, preparing it, and :class:`RetrievalEvaluator`.

Evaluation sets are read by the dataset format readers, :mod:`ernievil2.data.formats` (the packer's
too): ``format`` is one of :data:`ernievil2.data.formats.FORMATS` (``shards``, ``seed_tsv``, ``chinese_clip``, ``coco``,
``karpathy``, ``jsonl``), spelled as there; adding a benchmark is a config entry plus, at most, one
reader there. An entry's ``path`` is the reader's input, ``image_root`` its image folder, ``split``
the Karpathy split kept (default ``test``) or the Chinese-CLIP split, ``caption_key`` the jsonl
caption field. Items (:class:`~ernievil2.data.formats.Item`: one image, its captions, every one
kept, and where it came from) are taken in file order; the first record the reader cannot use, or
an image file that does not exist, raises :class:`EvalDataError` naming the file and line (or entry).

Protocols: ``multi`` (multi-caption, every caption of every image), ``official`` (1:1:
one text per image; multi-caption sets use the FIRST caption of each image, in file order) and
``both`` (two records).
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ernievil2.data import formats as data_formats
from ernievil2.data import preprocess
from ernievil2.data.formats import FormatError, Item, Problem, Record, SourceSpec, open_source
from ernievil2.distributed import DistInfo, first_error, gather_rows, shard_range
from ernievil2.encode import embed_crops, embed_token_ids
from ernievil2.evaluators.base import EvalContext, EvalDataError, register
from ernievil2.models import ErnieViL2
from ernievil2.retrieval import multi_caption_recall, official_recall
from ernievil2.tokenizer import WordPieceTokenizer

PROTOCOLS = ("multi", "official")
PROTOCOL_CHOICES = ("multi", "official", "both")


@dataclass
class RetrievalSet:
    """An evaluation set ready to embed: this process's share of the images, every text tokenized
    and the image index of each text.

    ``images`` are the resized centre crops of :mod:`ernievil2.data.preprocess` under ``profile``
    (RGB uint8 ``[n, S, S, 3]``, a quarter of float32's memory; normalised batch by batch when
    embedded, exactly as :func:`~ernievil2.data.preprocess.preprocess` does one image) of images ``image_start`` to
    ``image_start + n - 1`` of the ``n_images`` of the set: all of them in one process, the rank's
    :func:`shard_range` when built for several ranks.
    """

    images: np.ndarray  # uint8 [n, S, S, 3]
    text_ids: np.ndarray  # int64 [N_txt, L]
    text_image: np.ndarray  # int64 [N_txt]
    n_images: int = -1  # -1: len(images)
    image_start: int = 0
    profile: str = "official"

    def __post_init__(self) -> None:
        if self.n_images < 0:
            self.n_images = len(self.images)


@dataclass(frozen=True)
class EvalSetSpec:
    """What a reader needs (the fields of ``EvalSetSchema`` that describe the data)."""

    name: str
    format: str
    path: str | None = None
    image_root: str | None = None
    split: str = "test"
    caption_key: str = "captions"
    max_images: int | None = None


# --------------------------------------------------------------------------- reading
def source_spec(spec: EvalSetSpec) -> SourceSpec:
    """The format reader's spec of an evaluation set (``path`` -> input, ``image_root`` -> images,
    ``split`` -> splits, ``caption_key``: jsonl)."""
    return SourceSpec(format=spec.format, input=_need(spec, "path"), images=spec.image_root,
                      splits=(spec.split,) if spec.split else (), caption_key=spec.caption_key)


def eval_items(records: Iterable[Record]) -> Iterator[Item]:
    """The items of a reader's records; the first :class:`~ernievil2.data.formats.Problem`, or an
    item whose image file does not exist, raises :class:`EvalDataError` naming its place."""
    for record in records:
        if isinstance(record, Problem):
            raise EvalDataError(str(record))
        path = record.image.path
        if path is not None and not os.path.isfile(path):
            raise EvalDataError(f"{record.where}: image file not found: {path}")
        yield record


def _need(spec: EvalSetSpec, key: str) -> Any:
    value = getattr(spec, key)
    if value in (None, ""):
        raise ValueError(f"evaluation set {spec.name!r} (format {spec.format}): '{key}' is not set")
    return value


FORMATS = data_formats.FORMATS
"""The ``format`` names of evaluation sets: those of :mod:`ernievil2.data.formats`."""


def check_format(name: str, fmt: str) -> str:
    """``fmt`` when evaluation reads it; else ``ValueError`` naming set ``name`` and listing :data:`FORMATS`."""
    try:
        return data_formats.check_format(fmt, FORMATS)
    except FormatError as exc:
        raise ValueError(f"evaluation set {name!r}: {exc}") from None


def read_items(spec: EvalSetSpec) -> list[Item]:
    """The items of ``spec`` through its format reader, at most ``max_images`` of them (the first
    ones, in file order)."""
    check_format(spec.name, spec.format)
    try:
        source = open_source(source_spec(spec))
    except FormatError as exc:
        raise EvalDataError(f"evaluation set {spec.name!r}: {exc}") from None
    return _take(spec, eval_items(source.records))


def _take(spec: EvalSetSpec, items: Iterator[Item]) -> list[Item]:
    if spec.max_images is not None and spec.max_images < 1:
        raise ValueError(f"evaluation set {spec.name!r}: max_images must be >= 1, got {spec.max_images}")
    out = []
    for item in items:  # nothing past the last image taken is read
        out.append(item)
        if spec.max_images is not None and len(out) >= spec.max_images:
            break
    if not out:
        raise EvalDataError(f"evaluation set {spec.name!r} ({spec.format}, {spec.path}) holds no image")
    return out


def items_to_set(items: Sequence[Item], image_size: int, tokenizer: WordPieceTokenizer, max_length: int,
                 info: DistInfo | None = None, profile: str = "official") -> RetrievalSet:
    """Decode and resize + centre-crop the images (:mod:`ernievil2.data.preprocess`, ``profile``:
    the same pixels as inference and search), and tokenize every caption.

    With several ranks (``info``) each rank prepares only its :func:`shard_range` of the images
    (every rank must call it: a bad image anywhere raises the same :class:`EvalDataError`, naming
    it, on every rank)."""
    info = info or DistInfo()
    start, stop = shard_range(len(items), info)
    crops: list[np.ndarray] = []
    error = None
    for item in items[start:stop]:
        try:
            image = preprocess.decode(item.load_image(), profile, item.key)
            crops.append(preprocess.resize_crop(image, image_size, profile))
        except ValueError as exc:
            error = f"{item.where}: {exc}"
            break
    error = first_error(error, info)
    if error is not None:
        raise EvalDataError(error)
    texts = [c for item in items for c in item.captions]
    owner = [k for k, item in enumerate(items) for _ in item.captions]
    images = np.stack(crops) if crops else np.empty((0, image_size, image_size, 3), dtype=np.uint8)
    return RetrievalSet(images, tokenizer(texts, max_length), np.asarray(owner, dtype=np.int64),
                        n_images=len(items), image_start=start, profile=profile)


def load_eval_set(spec: EvalSetSpec, image_size: int, tokenizer: WordPieceTokenizer, max_length: int,
                  info: DistInfo | None = None) -> RetrievalSet:
    """Read ``spec`` with its reader and preprocess it (:func:`read_items` + :func:`items_to_set`)."""
    return items_to_set(read_items(spec), image_size, tokenizer, max_length, info)


def load_retrieval_set(
    shards: str | Sequence[str], image_size: int, tokenizer: WordPieceTokenizer, max_length: int
) -> RetrievalSet:
    """Every sample of packed ``shards`` (all captions of each image), preprocessed for evaluation."""
    spec = EvalSetSpec(name=str(shards), format="shards", path=shards if isinstance(shards, str) else None)
    source = open_source(SourceSpec("shards", shards if isinstance(shards, str) else list(shards)))
    return items_to_set(_take(spec, eval_items(source.records)), image_size, tokenizer, max_length)


# --------------------------------------------------------------------------- embedding
def embed(model: ErnieViL2, data: RetrievalSet, batch_size: int = 256,
          info: DistInfo | None = None) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised image and text embeddings of ``data`` (model in eval mode, restored after).

    With several ranks each embeds its slice of the images and of the texts and every rank
    receives all rows, in order; every rank must call it (a collective)."""
    info = info or DistInfo()
    ia, ib = shard_range(data.n_images, info)
    held = (data.image_start, len(data.images))
    if held == (ia, ib - ia):
        images = data.images  # this rank's share (prepared with the same DistInfo), or the whole set in one process
    elif held == (0, data.n_images):
        images = data.images[ia:ib]  # the whole set: this rank's slice of it
    else:
        raise ValueError(f"this evaluation set holds images {held[0]}..{held[0] + held[1] - 1} of {data.n_images}, but "
                         f"rank {info.rank} of {info.world_size} embeds {ia}..{ib - 1}: prepare it with the same "
                         "DistInfo (items_to_set(..., info))")
    ta, tb = shard_range(len(data.text_ids), info)
    img = embed_crops(model, images, batch_size, data.profile)
    txt = embed_token_ids(model, data.text_ids[ta:tb], batch_size)
    return gather_rows(img, info), gather_rows(txt, info)


def first_caption_per_image(text_image: np.ndarray, n_images: int) -> np.ndarray:
    """Index of the first text of every image (image order): the 1:1 protocol's text of each image."""
    images, first = np.unique(text_image, return_index=True)
    if len(images) != n_images:
        raise ValueError(f"{n_images - len(images)} image(s) have no caption")
    return first


class RetrievalEvaluator:
    """Zero-shot image↔text retrieval on one set, under one protocol or both."""

    def __init__(self, name: str, data: RetrievalSet, protocol: str = "multi", batch_size: int = 256,
                 info: DistInfo | None = None):
        if protocol not in PROTOCOL_CHOICES:
            raise ValueError(f"unknown protocol {protocol!r} for evaluation set {name!r}; choose from {PROTOCOL_CHOICES}")
        self.name = name
        self.data = data
        self.protocols = PROTOCOLS if protocol == "both" else (protocol,)
        self.batch_size = batch_size
        self.info = info or DistInfo()

    def __call__(self, model: ErnieViL2, step: int) -> list[dict]:
        img, txt = embed(model, self.data, self.batch_size, self.info)
        records = []
        for protocol in self.protocols:
            if protocol == "multi":
                metrics = multi_caption_recall(img, txt, self.data.text_image)
            else:
                metrics = official_recall(txt[first_caption_per_image(self.data.text_image, len(img))], img)
            records.append({"step": step, "dataset": self.name, "protocol": protocol, **metrics})
        return records


# --------------------------------------------------------------------------- from the config
def eval_set_spec(cfg: Any) -> EvalSetSpec:
    """An :class:`EvalSetSpec` from one ``eval.datasets`` entry (``EvalSetSchema``)."""
    fmt, path = cfg.format, cfg.path
    check_format(cfg.name, fmt)
    if cfg.protocol not in PROTOCOL_CHOICES:
        raise ValueError(f"evaluation set {cfg.name!r}: unknown protocol {cfg.protocol!r}; choose from {PROTOCOL_CHOICES}")
    return EvalSetSpec(name=cfg.name, format=fmt, path=path, image_root=cfg.image_root, split=cfg.split,
                       caption_key=cfg.caption_key, max_images=cfg.max_images)


@register("datasets")
def build_retrieval_evaluator(entry: Any, context: EvalContext) -> RetrievalEvaluator:
    """The evaluator of one ``eval.datasets`` entry (``EvalSetSchema``)."""
    spec = eval_set_spec(entry)
    data = items_to_set(read_items(spec), context.image_size, context.tokenizer,
                        context.text_max_length, context.info, context.profile)
    return RetrievalEvaluator(spec.name, data, entry.protocol, context.batch_size, context.info)
