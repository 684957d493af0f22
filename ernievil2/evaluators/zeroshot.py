"""Zero-shot image classification: an evaluator beside retrieval, with the same interface.

Each class becomes a text classifier: its name is put into every prompt template (``"a photo of
a {}."``), the prompts are embedded, each embedding L2-normalised, and the class vector is the
normalised mean over templates (prompt ensembling, as in CLIP). An image is scored against every
class vector; top-k accuracy counts an image when its class is among the k best.

Ties: a class whose score equals the true class's score is broken at random, in expectation
(:func:`topk_accuracy`): a model that gives every class the same score scores chance, never 100 %.

Sets (``eval.classification`` entries, :class:`ClassificationSetSpec`), one reader per ``format``:

* ``imagefolder``: ``path/CLASS/…/image`` (ImageNet layout, images found recursively); labels are
  the sorted class folder names; ``classnames`` (optional) names them: a text file with one name
  per line in that order, or a JSON object ``{folder: name}``;
* ``shards``: WebDataset shards whose samples carry the label as ``KEY.cls`` (an integer) or as
  ``label_key`` in ``KEY.json`` (an integer index or a class name); ``classnames`` is required
  (the demo generator writes its held-out objects this way, ``conf/eval/demo.yaml``).

Templates: a built-in set (:data:`TEMPLATE_SETS`: ``en``, ``zh``) or a text file with one template
per line, each holding ``{}`` once.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ernievil2.data import preprocess
from ernievil2.distributed import DistInfo, first_error, gather_rows, shard_range
from ernievil2.encode import embed_crops, embed_texts
from ernievil2.evaluators.base import EvalContext, EvalDataError, register
from ernievil2.models import ErnieViL2
from ernievil2.tokenizer import WordPieceTokenizer

FORMATS = ("imagefolder", "shards")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
KS: tuple[int, ...] = (1, 5)

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "en": (
        "a photo of a {}.",
        "a picture of a {}.",
        "a close-up photo of a {}.",
        "a photo of the {}.",
        "a blurry photo of a {}.",
        "a bright photo of a {}.",
        "a photo of a small {}.",
        "a photo of a large {}.",
    ),
    "zh": (
        "一张{}的照片。",
        "{}的照片。",
        "一张{}的图片。",
        "这是一张{}的照片。",
        "一张模糊的{}的照片。",
        "一张清晰的{}的照片。",
        "一张小{}的照片。",
        "一张大{}的照片。",
    ),
}


@dataclass(frozen=True)
class ClassificationSetSpec:
    """What a reader needs: the data fields of one ``eval.classification`` entry."""

    name: str
    format: str
    path: str | None = None
    classnames: str | None = None
    templates: str = "en"
    label_key: str = "label"
    language: str = "en"
    max_images: int | None = None


@dataclass
class ClassificationSet:
    """Images ready to embed (this rank's share of the resized crops, uint8 ``[n, S, S, 3]``), the
    label of every image of the set, the class names and the prompt templates."""

    images: np.ndarray
    labels: np.ndarray  # int64 [n_images]
    classnames: list[str]
    templates: list[str]
    image_start: int = 0
    profile: str = "official"


# --------------------------------------------------------------------------- names and templates
def load_templates(spec: str) -> list[str]:
    """A built-in template set (:data:`TEMPLATE_SETS`) or a file of templates, one per line, each
    with one ``{}``; blank lines are ignored."""
    if spec in TEMPLATE_SETS:
        return list(TEMPLATE_SETS[spec])
    path = Path(os.path.expanduser(spec))
    if not path.is_file():
        raise EvalDataError(f"templates {spec!r}: neither a built-in set {sorted(TEMPLATE_SETS)} nor a file")
    out = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if line.count("{}") != 1:
            raise EvalDataError(f"{path}: line {lineno}: a template holds '{{}}' exactly once: {line!r}")
        out.append(line.strip())
    if not out:
        raise EvalDataError(f"{path}: no template")
    return out


def load_classnames(path: str, folders: Sequence[str] | None = None) -> list[str]:
    """Class names from ``path``: a text file with one name per line (label order), or a JSON list,
    or a JSON object ``{folder: name}`` (needs ``folders``, the class folders in label order)."""
    file = Path(os.path.expanduser(path))
    if not file.is_file():
        raise EvalDataError(f"class names file not found: {file}")
    text = file.read_text(encoding="utf-8")
    if file.suffix == ".json":
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise EvalDataError(f"{file}: line {exc.lineno}: not valid JSON: {exc.msg}") from None
        if isinstance(doc, dict):
            if folders is None:
                raise EvalDataError(f"{file}: a {{folder: name}} object needs an imagefolder set; give a list")
            missing = [f for f in folders if f not in doc]
            if missing:
                raise EvalDataError(f"{file}: no name for class folder(s) {missing[:5]}")
            names = [str(doc[f]) for f in folders]
        elif isinstance(doc, list):
            names = [str(n) for n in doc]
        else:
            raise EvalDataError(f"{file}: expected a list of names or a {{folder: name}} object")
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if folders is not None and len(names) != len(folders):
        raise EvalDataError(f"{file}: {len(names)} class names for {len(folders)} class folders")
    if not names:
        raise EvalDataError(f"{file}: no class name")
    return names


# --------------------------------------------------------------------------- readers
@dataclass
class _Item:
    load: Callable[[], bytes]
    label: int
    where: str


def read_imagefolder(spec: ClassificationSetSpec) -> tuple[list[_Item], list[str]]:
    """``path/CLASS/…/image``: items in (class, path) order and the class names."""
    root = Path(os.path.expanduser(_need(spec, "path")))
    if not root.is_dir():
        raise EvalDataError(f"classification set {spec.name!r}: folder not found: {root}")
    folders = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not folders:
        raise EvalDataError(f"{root}: no class folder (expected {root}/CLASS/IMAGE)")
    items = []
    for label, folder in enumerate(folders):
        for path in sorted(p for p in (root / folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
            items.append(_Item(path.read_bytes, label, str(path)))
    names = load_classnames(spec.classnames, folders) if spec.classnames else [f.replace("_", " ") for f in folders]
    return items, names


def read_class_shards(spec: ClassificationSetSpec) -> tuple[list[_Item], list[str]]:
    """WebDataset shards with ``KEY.cls`` or ``label_key`` in ``KEY.json``; ``classnames`` required."""
    from ernievil2.data.sample import BadSample
    from ernievil2.data.shard_codec import IMAGE_EXTS
    from ernievil2.data.shard_reader import list_shards, read_shard

    if not spec.classnames:
        raise EvalDataError(f"classification set {spec.name!r}: format 'shards' needs 'classnames'")
    names = load_classnames(spec.classnames)
    index = {n: k for k, n in enumerate(names)}
    items = []

    def damaged(url: str, exc: Exception) -> None:
        raise EvalDataError(f"{url}: damaged shard: {exc}")

    def decode(raw: dict) -> tuple[bytes, int]:
        where = f"{raw.get('__url__')}: sample {raw.get('__key__')}"
        image = next((raw[e] for e in IMAGE_EXTS if e in raw), None)
        if image is None:
            raise EvalDataError(f"{where}: no image (looked for {', '.join(IMAGE_EXTS)})")
        label = _shard_label(raw, spec.label_key, index, where)
        if not 0 <= label < len(names):
            raise EvalDataError(f"{where}: label {label} outside the {len(names)} classes")
        return image, label

    for url in list_shards(_need(spec, "path")):
        for key, sample in read_shard(url, damaged, decode=decode):
            if isinstance(sample, BadSample):
                raise EvalDataError(str(sample))
            image, label = sample
            items.append(_Item(lambda image=image: image, label, f"{url}: sample {key}"))
    return items, names


def _shard_label(raw: dict, key: str, index: dict[str, int], where: str) -> int:
    value: object = None
    if "cls" in raw:
        value = raw["cls"].decode("utf-8").strip() if isinstance(raw["cls"], bytes) else raw["cls"]
    elif "json" in raw:
        try:
            value = json.loads(raw["json"]).get(key)
        except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
            raise EvalDataError(f"{where}: json is not an object") from None
    if value is None:
        raise EvalDataError(f"{where}: no label (neither KEY.cls nor '{key}' in KEY.json)")
    if isinstance(value, str) and value in index:
        return index[value]
    try:
        return int(value)
    except (TypeError, ValueError):
        raise EvalDataError(f"{where}: label {value!r} is neither a class index nor a class name") from None


def _need(spec: ClassificationSetSpec, key: str) -> str:
    value = getattr(spec, key)
    if not value:
        raise EvalDataError(f"classification set {spec.name!r} (format {spec.format}): '{key}' is not set")
    return str(value)


def load_classification_set(spec: ClassificationSetSpec, image_size: int, info: DistInfo | None = None,
                            profile: str = "official") -> ClassificationSet:
    """Read ``spec`` and preprocess this rank's share of its images (:mod:`ernievil2.data.preprocess`)."""
    if spec.format == "imagefolder":
        items, names = read_imagefolder(spec)
    elif spec.format == "shards":
        items, names = read_class_shards(spec)
    else:
        raise EvalDataError(f"classification set {spec.name!r}: unknown format {spec.format!r}; choose from {FORMATS}")
    if spec.max_images is not None:
        items = items[: spec.max_images]
    if not items:
        raise EvalDataError(f"classification set {spec.name!r} ({spec.format}, {spec.path}) holds no image")
    info = info or DistInfo()
    start, stop = shard_range(len(items), info)
    crops, error = [], None
    for item in items[start:stop]:
        try:
            crops.append(preprocess.resize_crop(preprocess.decode(item.load(), profile, item.where), image_size, profile))
        except (OSError, ValueError) as exc:
            error = f"{item.where}: {exc}"
            break
    error = first_error(error, info)
    if error is not None:
        raise EvalDataError(error)
    images = np.stack(crops) if crops else np.empty((0, image_size, image_size, 3), dtype=np.uint8)
    return ClassificationSet(images, np.asarray([it.label for it in items], dtype=np.int64), names,
                             load_templates(spec.templates), image_start=start, profile=profile)


# --------------------------------------------------------------------------- scoring
def class_embeddings(model: ErnieViL2, tokenizer: WordPieceTokenizer, classnames: Sequence[str],
                     templates: Sequence[str], max_length: int, batch_size: int = 256) -> np.ndarray:
    """float32 ``[C, D]``: per class, the L2-normalised mean of its normalised prompt embeddings."""
    prompts = [t.replace("{}", name) for name in classnames for t in templates]
    emb = embed_texts(model, tokenizer, prompts, max_length, batch_size)
    mean = emb.reshape(len(classnames), len(templates), -1).mean(axis=1)
    return (mean / np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, ks: Sequence[int] = KS) -> dict[int, float]:
    """Top-k accuracy in percent of ``scores [N, C]`` for ``labels [N]``. A class tied with the true
    one is broken at random in expectation: with ``g`` classes above the truth and ``t`` tied with
    it, the image counts ``clip((k - g) / (t + 1), 0, 1)``."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    true = scores[np.arange(len(labels)), labels][:, None]
    above = (scores > true).sum(axis=1)
    tied = (scores == true).sum(axis=1) - 1
    return {k: float(np.clip((k - above) / (tied + 1), 0.0, 1.0).mean() * 100.0) for k in ks}


class ZeroShotEvaluator:
    """Zero-shot classification on one set: records ``{step, dataset, protocol: "zeroshot", top1,
    top5, n_images, n_classes, chance_top1}`` (every rank embeds its share; all get the record)."""

    def __init__(self, name: str, data: ClassificationSet, tokenizer: WordPieceTokenizer, text_max_length: int,
                 batch_size: int = 256, info: DistInfo | None = None):
        self.name, self.data, self.tokenizer = name, data, tokenizer
        self.text_max_length, self.batch_size = text_max_length, batch_size
        self.info = info or DistInfo()

    def __call__(self, model: ErnieViL2, step: int) -> list[dict]:
        classes = class_embeddings(model, self.tokenizer, self.data.classnames, self.data.templates,
                                   self.text_max_length, self.batch_size)
        images = gather_rows(embed_crops(model, self.data.images, self.batch_size, self.data.profile), self.info)
        acc = topk_accuracy(images @ classes.T, self.data.labels)
        n_classes = len(self.data.classnames)
        return [{"step": step, "dataset": self.name, "protocol": "zeroshot",
                 **{f"top{k}": v for k, v in acc.items()},
                 "n_images": len(self.data.labels), "n_classes": n_classes, "chance_top1": 100.0 / n_classes}]


def format_record(record: dict) -> str:
    """One console line of a zero-shot record."""
    return (f"eval {record['dataset']} (zero-shot, {record['n_images']} images, {record['n_classes']} classes) "
            f"at step {record['step']}: top-1 {record['top1']:.2f}  top-5 {record['top5']:.2f}  "
            f"(chance {record['chance_top1']:.2f})")


@register("classification")
def build_zeroshot_evaluator(entry: Any, context: EvalContext) -> ZeroShotEvaluator:
    """The evaluator of one ``eval.classification`` entry (``ClassificationSetSchema``)."""
    spec = ClassificationSetSpec(name=entry.name, format=entry.format, path=entry.path, classnames=entry.classnames,
                                 templates=entry.templates, label_key=entry.label_key, language=entry.language,
                                 max_images=entry.max_images)
    data = load_classification_set(spec, context.image_size, context.info, context.profile)
    return ZeroShotEvaluator(spec.name, data, context.tokenizer, context.text_max_length, context.batch_size,
                             context.info)
