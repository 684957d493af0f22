"""Evaluators: small units with one interface, ``evaluator(model, step) -> list[record]``.

A record is a flat dict with ``step, dataset, protocol`` and the recall columns of
:mod:`ernievil2.retrieval`. The trainer (and eval-only mode) calls every evaluator on every rank:
each rank embeds its contiguous slice of the images and of the texts, the slices are gathered
(``all_gather_object``; nothing collective in a single process) and every rank computes and
returns the same records. Rank 0 logs them.

Evaluation sets come from one registry, :data:`READERS` (``format`` -> reader); adding a benchmark
is a config entry plus, at most, one reader. Each reader yields :class:`EvalItem` (one image, its
captions, and where it came from for error messages), in file order:

* ``demo``: the embedded demo's val shards; ``shards``: packed WebDataset shards (``path``: dir,
  brace pattern or glob);
* ``karpathy``: ``dataset_flickr30k.json`` / ``dataset_coco.json`` (``images[].filename``,
  ``filepath`` when present, ``split``, ``sentences[].raw``) + ``image_root``; ``split`` picks the
  images (default ``test``);
* ``seed_tsv``: the seed evaluation file (``text \\t image_id \\t base64``); lines are grouped by
  image id in first-seen order, the image of an id is its first line's;
* ``jsonl``: one JSON object per line, ``image`` (a path relative to ``image_root``, default the
  file's folder), ``image_id`` and a caption list under ``caption_key`` (the layout of
  ``../shared/data/*/captions.jsonl``: ``captions_en`` / ``captions_zh``).

Protocols (SPEC §7): ``multi`` (multi-caption, every caption of every image), ``official`` (1:1:
one text per image; multi-caption sets use the FIRST caption of each image, in file order) and
``both`` (two records).
"""
from __future__ import annotations

import binascii
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import paddle

from ernievil2.data import preprocess
from ernievil2.data.b64 import decode_base64
from ernievil2.data.shards import ShardStream, list_shards
from ernievil2.distributed import DistInfo
from ernievil2.jsonl import jsonl_objects
from ernievil2.models import ErnieViL2
from ernievil2.retrieval import multi_caption_recall, official_recall
from ernievil2.tokenizer import WordPieceTokenizer

PROTOCOLS = ("multi", "official")
PROTOCOL_CHOICES = ("multi", "official", "both")


class Evaluator(Protocol):
    name: str

    def __call__(self, model: ErnieViL2, step: int) -> list[dict]:
        ...


class EvalDataError(ValueError):
    """An evaluation set file that cannot be read; the message names the file and line or entry."""


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


@dataclass
class EvalItem:
    """One image of an evaluation set with its captions; ``where`` names its source for errors."""

    key: str
    load_image: Callable[[], bytes]
    captions: list[str]
    where: str


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


# --------------------------------------------------------------------------- readers
def _read_bytes(path: Path, where: str) -> Callable[[], bytes]:
    def load() -> bytes:
        try:
            return path.read_bytes()
        except OSError as exc:
            raise EvalDataError(f"{where}: cannot read image {path}: {exc.strerror or exc}") from None
    return load


def _require_file(path: Path, where: str) -> Path:
    if not path.is_file():
        raise EvalDataError(f"{where}: image file not found: {path}")
    return path


def read_shards(spec: EvalSetSpec, shards: Sequence[str] | None = None) -> Iterator[EvalItem]:
    """Packed WebDataset shards (``spec.path``, or the given list): every caption of every sample."""
    urls = list(shards) if shards is not None else list_shards(_need(spec, "path"))
    for sample in ShardStream(urls, shuffle_shards=False, split_by_rank=False):
        data = sample.image
        yield EvalItem(sample.key, lambda data=data: data, list(sample.captions), f"{spec.name}: sample {sample.key}")


def read_karpathy(spec: EvalSetSpec) -> Iterator[EvalItem]:
    """Karpathy split json (``images[{filename, filepath?, split, sentences[{raw}]}]``) + image folder."""
    path = Path(_need(spec, "path"))
    root = Path(spec.image_root) if spec.image_root else path.parent
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise EvalDataError(f"{path}: line {exc.lineno}: not valid JSON: {exc.msg}") from None
    images = doc.get("images") if isinstance(doc, dict) else None
    if not isinstance(images, list):
        raise EvalDataError(f"{path}: expected an object with an 'images' list (Karpathy split format)")
    for k, entry in enumerate(images):
        where = f"{path}: images[{k}]"
        try:
            if entry["split"] != spec.split:
                continue
            captions = [str(s["raw"]) for s in entry["sentences"]]
            image = root / entry.get("filepath", "") / entry["filename"]
        except (KeyError, TypeError) as exc:
            raise EvalDataError(f"{where}: missing or malformed key {exc}") from None
        if not captions:
            raise EvalDataError(f"{where}: no sentences")
        yield EvalItem(str(entry["filename"]), _read_bytes(_require_file(image, where), where), captions, where)


def read_seed_tsv(spec: EvalSetSpec) -> Iterator[EvalItem]:
    """Seed evaluation file (``text \\t image_id \\t base64``): texts grouped by image id (first-seen
    order); every line's base64 is checked, the image of an id is decoded from its first line."""
    path = Path(_need(spec, "path"))
    items: dict[str, EvalItem] = {}
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}: line {lineno}"
            try:
                line = raw.decode("utf-8").rstrip("\n").rstrip("\r")
            except UnicodeDecodeError as exc:
                raise EvalDataError(f"{where}: not UTF-8: {exc}") from None
            if not line.strip():
                continue
            cols = line.split("\t")
            if len(cols) != 3:
                raise EvalDataError(f"{where}: expected 3 tab-separated columns (text, image_id, base64), found {len(cols)}")
            text, image_id = cols[0].strip(), cols[1].strip()
            if not text or not image_id:
                raise EvalDataError(f"{where}: empty {'text' if not text else 'image id'}")
            try:
                data = decode_base64(cols[2])
            except (binascii.Error, ValueError) as exc:
                raise EvalDataError(f"{where} (image id {image_id!r}): invalid base64: {exc}") from None
            item = items.get(image_id)
            if item is None:
                items[image_id] = EvalItem(image_id, lambda data=data: data, [text], where)
            else:
                item.captions.append(text)
    yield from items.values()


def read_jsonl(spec: EvalSetSpec) -> Iterator[EvalItem]:
    """One JSON object per line: ``image`` (path under ``image_root``, default the file's folder),
    ``image_id`` (optional; default the image path) and a caption list under ``caption_key``."""
    path = Path(_need(spec, "path"))
    root = Path(spec.image_root) if spec.image_root else path.parent
    for lineno, obj in jsonl_objects(path):
        where = f"{path}: line {lineno}"
        if isinstance(obj, str):
            raise EvalDataError(f"{where}: malformed JSON line: {obj}")
        if "image" not in obj:
            raise EvalDataError(f"{where}: expected an object with an 'image' key")
        captions = obj.get(spec.caption_key)
        if isinstance(captions, str):
            captions = [captions]
        if not isinstance(captions, list) or not captions or not all(isinstance(c, str) and c.strip() for c in captions):
            raise EvalDataError(f"{where}: '{spec.caption_key}' must be a non-empty list of captions")
        image = _require_file(root / str(obj["image"]), where)
        yield EvalItem(str(obj.get("image_id", obj["image"])), _read_bytes(image, where), captions, where)


def _need(spec: EvalSetSpec, key: str) -> Any:
    value = getattr(spec, key)
    if value in (None, ""):
        raise ValueError(f"evaluation set {spec.name!r} (format {spec.format}): '{key}' is not set")
    return value


READERS: dict[str, Callable[[EvalSetSpec], Iterator[EvalItem]]] = {
    "shards": read_shards,
    "karpathy": read_karpathy,
    "seed_tsv": read_seed_tsv,
    "jsonl": read_jsonl,
}
FORMATS = ("demo", *READERS)


def read_items(spec: EvalSetSpec, demo_val_shards: Sequence[str] | None = None) -> list[EvalItem]:
    """The items of ``spec`` through its reader (``demo``: the given demo val shards), at most
    ``max_images`` of them (the first ones, in file order)."""
    if spec.format == "demo":
        if demo_val_shards is None:
            raise ValueError(f"evaluation set {spec.name!r}: format 'demo' needs the demo val shards")
        return _take(spec, read_shards(spec, demo_val_shards))
    if spec.format not in READERS:
        raise ValueError(f"evaluation set {spec.name!r}: unknown format {spec.format!r}; choose from {FORMATS}")
    return _take(spec, READERS[spec.format](spec))


def _take(spec: EvalSetSpec, items: Iterator[EvalItem]) -> list[EvalItem]:
    if spec.max_images is not None and spec.max_images < 1:
        raise ValueError(f"evaluation set {spec.name!r}: max_images must be >= 1, got {spec.max_images}")
    out = []
    for item in items:
        if spec.max_images is not None and len(out) >= spec.max_images:
            break
        out.append(item)
    if not out:
        raise EvalDataError(f"evaluation set {spec.name!r} ({spec.format}, {spec.path or 'demo'}) holds no image")
    return out


def items_to_set(items: Sequence[EvalItem], image_size: int, tokenizer: WordPieceTokenizer, max_length: int,
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


def first_error(error: str | None, info: DistInfo) -> str | None:
    """The first rank's error, on every rank (``all_gather_object``), so that all ranks stop alike."""
    if not info.distributed:
        return error
    errors: list[str | None] = []
    paddle.distributed.all_gather_object(errors, error)
    return next((e for e in errors if e is not None), None)


def load_eval_set(spec: EvalSetSpec, image_size: int, tokenizer: WordPieceTokenizer, max_length: int,
                  demo_val_shards: Sequence[str] | None = None, info: DistInfo | None = None) -> RetrievalSet:
    """Read ``spec`` with its reader and preprocess it (:func:`read_items` + :func:`items_to_set`)."""
    return items_to_set(read_items(spec, demo_val_shards), image_size, tokenizer, max_length, info)


def load_retrieval_set(
    shards: str | Sequence[str], image_size: int, tokenizer: WordPieceTokenizer, max_length: int
) -> RetrievalSet:
    """Every sample of packed ``shards`` (all captions of each image), preprocessed for evaluation."""
    spec = EvalSetSpec(name=str(shards), format="shards", path=shards if isinstance(shards, str) else None)
    urls = None if isinstance(shards, str) else list(shards)
    return items_to_set(_take(spec, read_shards(spec, urls)), image_size, tokenizer, max_length)


# --------------------------------------------------------------------------- embedding
def trim_padding(ids: np.ndarray, pad_id: int) -> np.ndarray:
    """Drop trailing columns that are padding in every row (outputs are unchanged: pads are masked)."""
    used = np.nonzero((ids != pad_id).any(axis=0))[0]
    return ids[:, : (used[-1] + 1 if len(used) else 1)]


def shard_range(n: int, info: DistInfo) -> tuple[int, int]:
    """Rank ``info.rank``'s contiguous slice ``[a, b)`` of ``n`` items (sizes differ by at most 1)."""
    return n * info.rank // info.world_size, n * (info.rank + 1) // info.world_size


def gather_rows(local: np.ndarray, info: DistInfo) -> np.ndarray:
    """Rows of every rank in rank order (``all_gather_object``: slices may differ in size)."""
    if not info.distributed:
        return local
    parts: list[np.ndarray] = []
    paddle.distributed.all_gather_object(parts, local)
    return np.concatenate(parts)


@paddle.no_grad()
def embed_images(model: ErnieViL2, crops: np.ndarray, batch_size: int = 256, profile: str = "official") -> np.ndarray:
    """L2-normalised float32 embeddings of resized crops (uint8 ``[n, S, S, 3]``), normalised batch
    by batch under ``profile``; the model runs in eval mode (its mode is restored after)."""
    was_training = model.training
    model.eval()
    try:
        out = [model.encode_image(paddle.to_tensor(preprocess.normalize_batch(crops[i : i + batch_size], profile))).numpy()
               for i in range(0, len(crops), batch_size)]
    finally:
        model.train(was_training)
    return np.concatenate(out).astype(np.float32) if out else np.empty((0, model.cfg.text.width), dtype=np.float32)


@paddle.no_grad()
def embed_texts(model: ErnieViL2, text_ids: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """L2-normalised float32 embeddings of token ids ``[n, L]`` (all-padding columns trimmed per
    batch); the model runs in eval mode (its mode is restored after)."""
    was_training = model.training
    model.eval()
    try:
        pad = model.cfg.text.pad_id
        out = [model.encode_text(paddle.to_tensor(trim_padding(text_ids[i : i + batch_size], pad))).numpy()
               for i in range(0, len(text_ids), batch_size)]
    finally:
        model.train(was_training)
    return np.concatenate(out).astype(np.float32) if out else np.empty((0, model.cfg.text.width), dtype=np.float32)


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
    img = embed_images(model, images, batch_size, data.profile)
    txt = embed_texts(model, data.text_ids[ta:tb], batch_size)
    return gather_rows(img, info), gather_rows(txt, info)


def first_caption_per_image(text_image: np.ndarray, n_images: int) -> np.ndarray:
    """Index of the first text of every image (image order): the 1:1 protocol's text of each image."""
    images, first = np.unique(text_image, return_index=True)
    if len(images) != n_images:
        raise ValueError(f"{n_images - len(images)} image(s) have no caption")
    return first


class RetrievalEvaluator:
    """Zero-shot image↔text retrieval on one set, under one protocol or both (SPEC §7)."""

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
    """An :class:`EvalSetSpec` from one ``eval.datasets`` entry (``EvalSetSchema``); the legacy
    ``shards: PATH`` key means ``format: shards, path: PATH``."""
    fmt, path = cfg.format, cfg.path
    if getattr(cfg, "shards", None):
        if fmt not in ("demo", "shards") or (path and path != cfg.shards):
            raise ValueError(f"evaluation set {cfg.name!r}: give 'format: shards' and 'path', not 'shards' with another format or path")
        fmt, path = "shards", cfg.shards
    if fmt not in FORMATS:
        raise ValueError(f"evaluation set {cfg.name!r}: unknown format {fmt!r}; choose from {FORMATS}")
    if cfg.protocol not in PROTOCOL_CHOICES:
        raise ValueError(f"evaluation set {cfg.name!r}: unknown protocol {cfg.protocol!r}; choose from {PROTOCOL_CHOICES}")
    return EvalSetSpec(name=cfg.name, format=fmt, path=path, image_root=cfg.image_root, split=cfg.split,
                       caption_key=cfg.caption_key, max_images=cfg.max_images)


def build_evaluators(eval_cfg: Any, *, image_size: int, tokenizer: WordPieceTokenizer, text_max_length: int,
                     demo_val_shards: Sequence[str] | None, info: DistInfo, demo_spec: Any = None) -> list[Evaluator]:
    """The evaluators of ``eval_cfg`` (``EvalSchema``), on every rank: one :class:`RetrievalEvaluator`
    per ``datasets`` entry, then one :class:`~ernievil2.zeroshot.ZeroShotEvaluator` per
    ``classification`` entry (``demo_spec``: the demo data's spec, for ``format: demo``)."""
    from ernievil2.zeroshot import ClassificationSetSpec, ZeroShotEvaluator, load_classification_set

    profile = getattr(eval_cfg, "profile", "official")
    preprocess.check_profile(profile)
    evaluators: list[Evaluator] = []
    for entry in eval_cfg.datasets:
        spec = eval_set_spec(entry)
        data = items_to_set(read_items(spec, demo_val_shards), image_size, tokenizer, text_max_length, info, profile)
        evaluators.append(RetrievalEvaluator(spec.name, data, entry.protocol, eval_cfg.batch_size, info))
    for entry in getattr(eval_cfg, "classification", ()):
        spec = ClassificationSetSpec(name=entry.name, format=entry.format, path=entry.path, classnames=entry.classnames,
                                     templates=entry.templates, label_key=entry.label_key, language=entry.language,
                                     max_images=entry.max_images)
        data = load_classification_set(spec, image_size, info, profile, demo_spec)
        evaluators.append(ZeroShotEvaluator(spec.name, data, tokenizer, text_max_length, eval_cfg.batch_size, info))
    return evaluators
