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
skipped instead, counted and logged with its place (:class:`~ernievil2.data.skips.SkipCounter`).

Protocols: ``multi`` (multi-caption, every caption of every image), ``official`` (1:1:
one text per image; multi-caption sets use the FIRST caption of each image, in file order) and
``both`` (two records). Recall is reported at R@1/5/10 and at every other K of ``recall_k``.

A text that captions several images (``chinese_clip``'s ``image_ids`` lists, e.g. MUGE) is one text
with several ground-truth images: text→image counts a hit when any of them is in the top K, and the
text is a ground truth of each of its images for image→text. ``directions`` reports both directions
(``both``) or text→image only (``t2i``: MUGE's protocol; ``mean_recall`` is then text→image's).

An image that no text lists (a ``chinese_clip`` image missing from its texts file: the reader keeps
it, :attr:`~ernievil2.data.formats.SourceSpec.keep_uncaptioned`) is a distractor, as Chinese-CLIP's
evaluation ranks every image of its ``imgs.tsv``: it is in the pool every text is ranked against
(text→image), and is no image→text query: image→text recall is over the images that have a text,
under either protocol (``official`` pairs each such image with its first text). The other formats
give an image without captions as a malformed record (an error, or a skip).

Images are held as crops between evaluations or streamed at every one, by ``eval.hold_images_mb``
(:mod:`ernievil2.evaluators.base`); a streamed set's skips are found by its first evaluation.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ernievil2.data import formats as data_formats
from ernievil2.data.caption_language import kept_captions
from ernievil2.data.formats import FormatError, Item, Problem, Record, SourceSpec, open_source
from ernievil2.data.skips import SkipCounter
from ernievil2.distributed import DistInfo, gather_rows, shard_range
from ernievil2.encode import embed_crops, embed_token_ids
from ernievil2.evaluators.base import (
    Bad,
    CropStream,
    EvalContext,
    EvalDataError,
    count_undecodable,
    decode_crops,
    holds_crops,
    register,
    set_skips,
)
from ernievil2.models import ErnieViL2
from ernievil2.retrieval import KS, multi_caption_recall, official_recall
from ernievil2.tokenizer import WordPieceTokenizer

log = logging.getLogger("ernievil2")

PROTOCOLS = ("multi", "official")
PROTOCOL_CHOICES = ("multi", "official", "both")
DIRECTIONS = ("both", "t2i")


@dataclass
class RetrievalSet:
    """An evaluation set ready to embed: this process's share of the images, every text tokenized
    and the image(s) of each text.

    ``images`` are the resized centre crops of :mod:`ernievil2.data.preprocess` under ``profile``
    (RGB uint8 ``[n, S, S, 3]``, a quarter of float32's memory; normalised batch by batch when
    embedded, exactly as :func:`~ernievil2.data.preprocess.preprocess` does one image) of images ``image_start`` to
    ``image_start + n - 1`` of the ``n_images`` of the set: all of them in one process, the rank's
    :func:`shard_range` when built for several ranks. A streamed set (``stream``) holds none: its
    share is decoded at every :func:`embed`, and the first one drops the images that do not decode
    (with ``skip_bad_samples``) from the set.

    ``text_image`` is each text's (first) image; ``extra_pairs`` the further ``(text, image)``
    ground truths of texts that caption several images (``None``: none). An image no text names
    (a ``chinese_clip`` image missing from its texts file) is a distractor (module doc).
    """

    images: np.ndarray  # uint8 [n, S, S, 3]
    text_ids: np.ndarray  # int64 [N_txt, L]
    text_image: np.ndarray  # int64 [N_txt]
    n_images: int = -1  # -1: len(images)
    image_start: int = 0
    profile: str = "official"
    # (rank, world size) whose share ``images`` are when skipped images moved it off shard_range
    share_of: tuple[int, int] | None = None
    extra_pairs: np.ndarray | None = None  # int64 [P, 2]: (text, image)
    stream: CropStream | None = None

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
    caption_languages: tuple[str, ...] = ()  # keep these languages' captions only (empty: all)


# --------------------------------------------------------------------------- reading
def source_spec(spec: EvalSetSpec) -> SourceSpec:
    """The format reader's spec of an evaluation set (``path`` -> input, ``image_root`` -> images,
    ``split`` -> splits, ``caption_key``: jsonl), keeping the images no text lists (``chinese_clip``:
    the distractors of text→image)."""
    return SourceSpec(format=spec.format, input=_need(spec, "path"), images=spec.image_root,
                      splits=(spec.split,) if spec.split else (), caption_key=spec.caption_key,
                      keep_uncaptioned=True)


def eval_items(records: Iterable[Record], skips: SkipCounter | None = None) -> Iterator[Item]:
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


def read_items(spec: EvalSetSpec, skips: SkipCounter | None = None) -> list[Item]:
    """The items of ``spec`` through its format reader, at most ``max_images`` of them (the first
    ones, in file order). With ``spec.skip_bad_samples`` the records it cannot use are counted in
    ``skips`` (a new one, :func:`~ernievil2.evaluators.base.set_skips`, when None) and skipped."""
    check_format(spec.name, spec.format)
    if spec.skip_bad_samples and skips is None:
        skips = set_skips(spec.name)
    try:
        source = open_source(source_spec(spec))
    except FormatError as exc:
        raise EvalDataError(f"evaluation set {spec.name!r}: {exc}") from None
    items = eval_items(source.records, skips if spec.skip_bad_samples else None)
    return _take(spec, in_languages(items, spec.caption_languages, spec.name) if spec.caption_languages else items)


def in_languages(items: Iterable[Item], languages: Sequence[str], name: str = "") -> Iterator[Item]:
    """``items`` with only their captions in ``languages`` (each caption's language as
    :func:`~ernievil2.data.caption_language.caption_languages` gives it; ``meta["languages"]`` and
    ``caption_ids`` kept aligned). An item left with no caption is left out (one log line counts
    them once the items are read); an item that had none (a distractor) stays."""
    dropped = 0
    for item in items:
        keep = kept_captions(item.captions, item.language, item.meta, languages)
        if len(keep) == len(item.captions):
            yield item
            continue
        if not keep:
            dropped += 1
            continue
        meta = dict(item.meta)
        if isinstance(meta.get("languages"), list) and len(meta["languages"]) == len(item.captions):
            meta["languages"] = [meta["languages"][i] for i in keep]
        ids = [item.caption_ids[i] for i in keep] if item.caption_ids is not None else None
        yield replace(item, captions=[item.captions[i] for i in keep], meta=meta, caption_ids=ids)
    if dropped:
        log.info("evaluation set %s: %d image(s) without a caption in %s left out", name, dropped, list(languages))


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
    if not any(item.captions for item in out):
        raise EvalDataError(f"evaluation set {spec.name!r} ({spec.format}, {spec.path}): no text lists any of its "
                            f"{len(out)} image(s)")
    return out


def text_table(items: Sequence[Item]) -> tuple[list[str], np.ndarray, np.ndarray | None]:
    """Every text of ``items`` once, in item order: ``(texts, text_image, extra_pairs)``, each text's
    first image and the further ``(text, image)`` pairs of a text that captions several images
    (:attr:`Item.caption_ids`; ``None`` when there are none)."""
    texts: list[str] = []
    owner: list[int] = []
    extra: list[tuple[int, int]] = []
    row_of: dict[str, int] = {}
    for k, item in enumerate(items):
        ids = getattr(item, "caption_ids", None) or [None] * len(item.captions)
        for caption, cid in zip(item.captions, ids):
            if cid is not None and cid in row_of:
                extra.append((row_of[cid], k))
                continue
            if cid is not None:
                row_of[cid] = len(texts)
            texts.append(caption)
            owner.append(k)
    pairs = np.asarray(sorted(set(extra)), dtype=np.int64).reshape(-1, 2) if extra else None
    return texts, np.asarray(owner, dtype=np.int64), pairs


def items_to_set(items: Sequence[Item], image_size: int, tokenizer: WordPieceTokenizer, max_length: int,
                 info: DistInfo | None = None, profile: str = "official", skips: SkipCounter | None = None,
                 hold_mb: float | None = None) -> RetrievalSet:
    """Decode and resize + centre-crop the images (:mod:`ernievil2.data.preprocess`, ``profile``:
    the same pixels as inference and search), and tokenize every caption (:func:`text_table`).

    With several ranks (``info``) each rank prepares only its :func:`shard_range` of the images
    (every rank must call it: a bad image anywhere raises the same :class:`EvalDataError`, naming
    it, on every rank). With ``skips`` an image that does not decode is counted there and left out
    with its captions, on every rank alike. The crops are held when they fit ``hold_mb`` MiB per
    rank (:func:`~ernievil2.evaluators.base.holds_crops`; ``None``: always); else the set is
    streamed, and decoding, with its errors and skips, happens at every :func:`embed`."""
    info = info or DistInfo()
    start, stop = shard_range(len(items), info)
    crops: list[np.ndarray] = []
    bad: list[Bad] = []
    stream = None
    if holds_crops(len(items), image_size, info, hold_mb):
        crops, bad = decode_crops(items, start, stop, image_size, profile, info, skip=skips is not None)
        count_undecodable(skips, bad)
    else:
        stream = CropStream(items[start:stop], start, image_size, profile, info, skips)
    texts, owner, pairs = text_table(items)
    images = np.stack(crops) if crops else np.empty((0, image_size, image_size, 3), dtype=np.uint8)
    data = RetrievalSet(images, tokenizer(texts, max_length), owner, n_images=len(items), image_start=start,
                        profile=profile, extra_pairs=pairs, stream=stream)
    drop_images(data, bad, info)
    return data


def drop_images(data: RetrievalSet, bad: Sequence[Bad], info: DistInfo) -> None:
    """Leave the images ``bad`` names (set indices) out of ``data``, in place: each text keeps its
    other images, a text left with none goes; the image indices close up."""
    dropped = np.asarray(sorted({k for k, _, _ in bad}), dtype=np.int64)
    if not len(dropped):
        return
    n_txt = len(data.text_image)
    extra = data.extra_pairs if data.extra_pairs is not None else np.empty((0, 2), dtype=np.int64)
    text = np.concatenate([np.arange(n_txt), extra[:, 0]])
    image = np.concatenate([data.text_image, extra[:, 1]])
    keep = ~np.isin(image, dropped)
    if not keep.any():
        raise EvalDataError(f"no image of the set that a text lists decodes ({len(dropped)} skipped)")
    text, image = text[keep], image[keep]
    image = image - np.searchsorted(dropped, image)
    order = np.lexsort((image, text))
    text, image = text[order], image[order]
    rows, first = np.unique(text, return_index=True)
    row = np.searchsorted(rows, text)
    rest = np.ones(len(text), dtype=bool)
    rest[first] = False
    data.text_ids, data.text_image = data.text_ids[rows], image[first]
    data.extra_pairs = np.stack([row[rest], image[rest]], axis=1) if rest.any() else None
    data.n_images -= len(dropped)
    data.image_start -= int(np.searchsorted(dropped, data.image_start))
    data.share_of = (info.rank, info.world_size)


def load_eval_set(spec: EvalSetSpec, image_size: int, tokenizer: WordPieceTokenizer, max_length: int,
                  info: DistInfo | None = None, profile: str = "official", hold_mb: float | None = None) -> RetrievalSet:
    """Read ``spec`` with its reader and preprocess it (:func:`read_items` + :func:`items_to_set`;
    with ``spec.skip_bad_samples`` both skip into one :class:`~ernievil2.data.skips.SkipCounter`,
    whose totals are logged once the images are decoded: here, or at a streamed set's first
    :func:`embed`)."""
    skips = set_skips(spec.name, info) if spec.skip_bad_samples else None
    data = items_to_set(read_items(spec, skips), image_size, tokenizer, max_length, info, profile, skips, hold_mb)
    if skips is not None and data.stream is None:
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
def _held_share(data: RetrievalSet, info: DistInfo) -> np.ndarray:
    """The crops of ``data`` this rank embeds."""
    ia, ib = shard_range(data.n_images, info)
    held = (data.image_start, len(data.images))
    if held == (ia, ib - ia):
        return data.images  # this rank's share (prepared with the same DistInfo), or the whole set in one process
    if held == (0, data.n_images):
        return data.images[ia:ib]  # the whole set: this rank's slice of it
    if data.share_of == (info.rank, info.world_size):
        return data.images  # this rank's share, less the images skipped (in rank order, contiguous)
    raise ValueError(f"this evaluation set holds images {held[0]}..{held[0] + held[1] - 1} of {data.n_images}, but "
                     f"rank {info.rank} of {info.world_size} embeds {ia}..{ib - 1}: prepare it with the same "
                     "DistInfo (items_to_set(..., info))")


def embed(model: ErnieViL2, data: RetrievalSet, batch_size: int = 256,
          info: DistInfo | None = None) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised image and text embeddings of ``data`` (model in eval mode, restored after).

    With several ranks each embeds its slice of the images and of the texts and every rank
    receives all rows, in order; every rank must call it (a collective). A streamed set is decoded
    here, batch by batch; its first pass leaves the images that do not decode out of ``data``."""
    info = info or DistInfo()
    if data.stream is not None:
        own = (data.stream.info.rank, data.stream.info.world_size)
        if own != (info.rank, info.world_size):
            raise ValueError(f"this streamed evaluation set is rank {own[0]} of {own[1]}'s share, but rank {info.rank} "
                             f"of {info.world_size} embeds it: prepare it with the same DistInfo")
        img, found = data.stream.embed(model, batch_size)
        drop_images(data, found or (), info)
    else:
        img = embed_crops(model, _held_share(data, info), batch_size, data.profile,
                          "embed images" if info.is_main else None)
    ta, tb = shard_range(len(data.text_ids), info)
    txt = embed_token_ids(model, data.text_ids[ta:tb], batch_size, "embed texts" if info.is_main else None)
    return gather_rows(img, info), gather_rows(txt, info)


def first_caption_per_image(text_image: np.ndarray, n_images: int, extra_pairs: np.ndarray | None = None,
                            distractors: bool = False) -> np.ndarray:
    """Index of the first text of every image (image order): the 1:1 protocol's text of each image
    (``extra_pairs``: the further ``(text, image)`` pairs of texts with several images). An image
    with no text is a ``ValueError``, or, with ``distractors``, gets ``-1``."""
    text = np.arange(len(text_image))
    if extra_pairs is not None and len(extra_pairs):
        text = np.concatenate([text, extra_pairs[:, 0]])
        text_image = np.concatenate([text_image, extra_pairs[:, 1]])
        order = np.lexsort((text, text_image))
        text, text_image = text[order], text_image[order]
    images, first = np.unique(text_image, return_index=True)
    if len(images) != n_images and not distractors:
        raise ValueError(f"{n_images - len(images)} image(s) have no caption")
    out = np.full(n_images, -1, dtype=np.int64)
    out[images] = text[first]
    return out


def one_to_one_recall(img: np.ndarray, txt: np.ndarray, data: RetrievalSet, ks: Sequence[int]) -> dict[str, float]:
    """The ``official`` (1:1) protocol: each image with a text and its first text are a pair
    (:func:`first_caption_per_image`). Without distractors it is :func:`official_recall`; images no
    text lists stay in the text→image pool and are no image→text queries (the 1:1 pairs through
    :func:`multi_caption_recall`, one text per image: the same ranks, the same strict ``>``)."""
    first = first_caption_per_image(data.text_image, len(img), data.extra_pairs, distractors=True)
    if (first >= 0).all():
        return official_recall(txt[first], img, ks=ks)
    listed = np.flatnonzero(first >= 0)
    return multi_caption_recall(img, txt[first[listed]], listed, ks=ks, distractors=True)


def text_to_image_only(metrics: dict[str, float]) -> dict[str, float]:
    """``metrics`` without image→text: the ``t2i_*`` recalls, and ``mean_recall`` their mean
    (``t2i_mean``), as a text→image-only benchmark (MUGE) reports it."""
    out = {k: v for k, v in metrics.items() if k.startswith("t2i_")}
    out["mean_recall"] = metrics["t2i_mean"]
    return out


class RetrievalEvaluator:
    """Zero-shot image↔text retrieval on one set, under one protocol or both, in both directions or
    text→image only (``directions``: :data:`DIRECTIONS`)."""

    def __init__(self, name: str, data: RetrievalSet, protocol: str = "multi", batch_size: int = 256,
                 info: DistInfo | None = None, recall_k: Sequence[int] = (), directions: str = "both"):
        if protocol not in PROTOCOL_CHOICES:
            raise ValueError(f"unknown protocol {protocol!r} for evaluation set {name!r}; choose from {PROTOCOL_CHOICES}")
        if directions not in DIRECTIONS:
            raise ValueError(f"unknown directions {directions!r} for evaluation set {name!r}; choose from {DIRECTIONS}")
        if any(int(k) < 1 for k in recall_k):
            raise ValueError(f"evaluation set {name!r}: recall_k must hold Ks >= 1, got {list(recall_k)}")
        self.name = name
        self.ks = tuple(sorted(set(KS) | {int(k) for k in recall_k}))  # R@1/5/10 always, and the extra Ks
        self.data = data
        self.protocols = PROTOCOLS if protocol == "both" else (protocol,)
        self.batch_size = batch_size
        self.info = info or DistInfo()
        self.directions = directions

    def __call__(self, model: ErnieViL2, step: int) -> list[dict]:
        img, txt = embed(model, self.data, self.batch_size, self.info)
        data, records = self.data, []
        for protocol in self.protocols:
            if protocol == "multi":
                metrics = multi_caption_recall(img, txt, data.text_image, ks=self.ks, extra_pairs=data.extra_pairs,
                                               distractors=True)
            else:
                metrics = one_to_one_recall(img, txt, data, self.ks)
            if self.directions == "t2i":
                metrics = text_to_image_only(metrics)
            records.append({"step": step, "dataset": self.name, "protocol": protocol, **metrics})
        return records


# --------------------------------------------------------------------------- from the config
def eval_set_spec(cfg: Any) -> EvalSetSpec:
    """An :class:`EvalSetSpec` from one ``eval.datasets`` entry (``EvalSetSchema``)."""
    fmt, path = cfg.format, cfg.path
    check_format(cfg.name, fmt)
    if cfg.protocol not in PROTOCOL_CHOICES:
        raise ValueError(f"evaluation set {cfg.name!r}: unknown protocol {cfg.protocol!r}; choose from {PROTOCOL_CHOICES}")
    directions = getattr(cfg, "directions", "both")
    if directions not in DIRECTIONS:
        raise ValueError(f"evaluation set {cfg.name!r}: unknown directions {directions!r}; choose from {DIRECTIONS}")
    return EvalSetSpec(name=cfg.name, format=fmt, path=path, image_root=cfg.image_root, split=cfg.split,
                       caption_key=cfg.caption_key, max_images=cfg.max_images,
                       skip_bad_samples=cfg.skip_bad_samples,
                       caption_languages=tuple(getattr(cfg, "caption_languages", None) or ()))


@register("datasets")
def build_retrieval_evaluator(entry: Any, context: EvalContext) -> RetrievalEvaluator:
    """The evaluator of one ``eval.datasets`` entry (``EvalSetSchema``)."""
    spec = eval_set_spec(entry)
    data = load_eval_set(spec, context.image_size, context.tokenizer, context.text_max_length, context.info,
                         context.profile, context.hold_images_mb)
    return RetrievalEvaluator(spec.name, data, entry.protocol, context.batch_size, context.info, entry.recall_k,
                              getattr(entry, "directions", "both"))
