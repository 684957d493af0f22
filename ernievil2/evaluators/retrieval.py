"""Image↔text retrieval: reading a set, preparing it, and :class:`RetrievalEvaluator`.

Evaluation sets are read by the dataset format readers, :mod:`ernievil2.data.formats` (the packer's
too): ``format`` is one of :data:`ernievil2.data.formats.FORMATS` (``shards``, ``seed_tsv``, ``chinese_clip``, ``coco``,
``karpathy``, ``jsonl``, ``wds_retrieval``), spelled as there; adding a benchmark is a config entry
plus, at most, one reader there. An entry's ``path`` is the reader's input, ``image_root`` its image
folder, ``split`` the Karpathy split kept (default ``test``), the Chinese-CLIP split or the
clip_benchmark split folder, ``caption_key`` the jsonl caption field. Items
(:class:`~ernievil2.data.formats.Item`: one image, its captions, every one kept, and where it came
from) are taken in file order; the first record the reader cannot use, an image file that does not
exist or an image that does not decode raises :class:`EvalDataError` naming the file and line (or
entry). With ``skip_bad_samples`` (the benchmark sets of ``launch/benchmark.py``) each of them is
skipped instead, counted and logged with its place (:class:`~ernievil2.evaluators.base.SkipLog`).

Protocols: ``multi`` (multi-caption, every caption of every image), ``official`` (1:1:
one text per image; multi-caption sets use the FIRST caption of each image, in file order) and
``both`` (two records). Recall is reported at R@1/5/10 and at every other K of ``recall_k``.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ernievil2.data import formats as data_formats
from ernievil2.data.formats import FormatError, Item, Problem, Record, SourceSpec, open_source
from ernievil2.distributed import DistInfo, gather_rows, shard_range
from ernievil2.encode import embed_crops, embed_token_ids
from ernievil2.evaluators.base import EvalContext, EvalDataError, SkipLog, decode_crops, register
from ernievil2.models import ErnieViL2
from ernievil2.retrieval import KS, multi_caption_recall, official_recall
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
    # (rank, world size) whose share ``images`` are when skipped images moved it off shard_range
    share_of: tuple[int, int] | None = None

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
    skip_bad_samples: bool = False


# --------------------------------------------------------------------------- reading
def source_spec(spec: EvalSetSpec) -> SourceSpec:
    """The format reader's spec of an evaluation set (``path`` -> input, ``image_root`` -> images,
    ``split`` -> splits, ``caption_key``: jsonl)."""
    return SourceSpec(format=spec.format, input=_need(spec, "path"), images=spec.image_root,
                      splits=(spec.split,) if spec.split else (), caption_key=spec.caption_key)


def eval_items(records: Iterable[Record], skips: SkipLog | None = None) -> Iterator[Item]:
    """The items of a reader's records; the first :class:`~ernievil2.data.formats.Problem`, or an
    item whose image file does not exist, raises :class:`EvalDataError` naming its place (with
    ``skips``: is counted there and skipped)."""
    for record in records:
        if isinstance(record, Problem):
            if skips is None:
                raise EvalDataError(str(record))
            skips.add(record.reason, record.where, record.detail)
            continue
        path = record.image.path
        if path is not None and not os.path.isfile(path):
            if skips is None:
                raise EvalDataError(f"{record.where}: image file not found: {path}")
            skips.add("missing_image", record.where, f"image file not found: {path}")
            continue
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


def read_items(spec: EvalSetSpec, skips: SkipLog | None = None) -> list[Item]:
    """The items of ``spec`` through its format reader, at most ``max_images`` of them (the first
    ones, in file order). With ``spec.skip_bad_samples`` the records it cannot use are counted in
    ``skips`` (a new :class:`SkipLog` when None) and skipped."""
    check_format(spec.name, spec.format)
    if spec.skip_bad_samples and skips is None:
        skips = SkipLog(spec.name)
    try:
        source = open_source(source_spec(spec))
    except FormatError as exc:
        raise EvalDataError(f"evaluation set {spec.name!r}: {exc}") from None
    return _take(spec, eval_items(source.records, skips if spec.skip_bad_samples else None))


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
                 info: DistInfo | None = None, profile: str = "official", skips: SkipLog | None = None) -> RetrievalSet:
    """Decode and resize + centre-crop the images (:mod:`ernievil2.data.preprocess`, ``profile``:
    the same pixels as inference and search), and tokenize every caption.

    With several ranks (``info``) each rank prepares only its :func:`shard_range` of the images
    (every rank must call it: a bad image anywhere raises the same :class:`EvalDataError`, naming
    it, on every rank). With ``skips`` an image that does not decode is counted there and left out
    with its captions, on every rank alike."""
    info = info or DistInfo()
    start, stop = shard_range(len(items), info)
    crops, bad = decode_crops(items, start, stop, image_size, profile, info, skip=skips is not None)
    share_of = None
    if skips is not None:
        for _, where, detail in bad:
            skips.add("undecodable_image", where, detail)
        dropped = {k for k, _, _ in bad}
        if dropped:
            start -= sum(1 for k in dropped if k < start)
            items = [item for k, item in enumerate(items) if k not in dropped]
            share_of = (info.rank, info.world_size)
        if not items:
            raise EvalDataError(f"no image of the set decodes ({len(dropped)} skipped)")
    texts = [c for item in items for c in item.captions]
    owner = [k for k, item in enumerate(items) for _ in item.captions]
    images = np.stack(crops) if crops else np.empty((0, image_size, image_size, 3), dtype=np.uint8)
    return RetrievalSet(images, tokenizer(texts, max_length), np.asarray(owner, dtype=np.int64),
                        n_images=len(items), image_start=start, profile=profile, share_of=share_of)


def load_eval_set(spec: EvalSetSpec, image_size: int, tokenizer: WordPieceTokenizer, max_length: int,
                  info: DistInfo | None = None) -> RetrievalSet:
    """Read ``spec`` with its reader and preprocess it (:func:`read_items` + :func:`items_to_set`;
    with ``spec.skip_bad_samples`` both skip into one :class:`SkipLog`)."""
    skips = SkipLog(spec.name, quiet=not (info or DistInfo()).is_main) if spec.skip_bad_samples else None
    data = items_to_set(read_items(spec, skips), image_size, tokenizer, max_length, info, skips=skips)
    if skips is not None:
        skips.finish()
    return data


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
    elif data.share_of == (info.rank, info.world_size):
        images = data.images  # this rank's share, less the images skipped (in rank order, contiguous)
    else:
        raise ValueError(f"this evaluation set holds images {held[0]}..{held[0] + held[1] - 1} of {data.n_images}, but "
                         f"rank {info.rank} of {info.world_size} embeds {ia}..{ib - 1}: prepare it with the same "
                         "DistInfo (items_to_set(..., info))")
    ta, tb = shard_range(len(data.text_ids), info)
    img = embed_crops(model, images, batch_size, data.profile, "embed images" if info.is_main else None)
    txt = embed_token_ids(model, data.text_ids[ta:tb], batch_size, "embed texts" if info.is_main else None)
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
                 info: DistInfo | None = None, recall_k: Sequence[int] = ()):
        if protocol not in PROTOCOL_CHOICES:
            raise ValueError(f"unknown protocol {protocol!r} for evaluation set {name!r}; choose from {PROTOCOL_CHOICES}")
        if any(int(k) < 1 for k in recall_k):
            raise ValueError(f"evaluation set {name!r}: recall_k must hold Ks >= 1, got {list(recall_k)}")
        self.name = name
        self.ks = tuple(sorted(set(KS) | {int(k) for k in recall_k}))  # R@1/5/10 always, and the extra Ks
        self.data = data
        self.protocols = PROTOCOLS if protocol == "both" else (protocol,)
        self.batch_size = batch_size
        self.info = info or DistInfo()

    def __call__(self, model: ErnieViL2, step: int) -> list[dict]:
        img, txt = embed(model, self.data, self.batch_size, self.info)
        records = []
        for protocol in self.protocols:
            if protocol == "multi":
                metrics = multi_caption_recall(img, txt, self.data.text_image, ks=self.ks)
            else:
                metrics = official_recall(txt[first_caption_per_image(self.data.text_image, len(img))], img,
                                          ks=self.ks)
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
                       caption_key=cfg.caption_key, max_images=cfg.max_images,
                       skip_bad_samples=cfg.skip_bad_samples)


@register("datasets")
def build_retrieval_evaluator(entry: Any, context: EvalContext) -> RetrievalEvaluator:
    """The evaluator of one ``eval.datasets`` entry (``EvalSetSchema``)."""
    spec = eval_set_spec(entry)
    skips = SkipLog(spec.name, quiet=not context.info.is_main) if spec.skip_bad_samples else None
    data = items_to_set(read_items(spec, skips), context.image_size, context.tokenizer,
                        context.text_max_length, context.info, context.profile, skips)
    if skips is not None:
        skips.finish()
    return RetrievalEvaluator(spec.name, data, entry.protocol, context.batch_size, context.info, entry.recall_k)
