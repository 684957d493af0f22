"""Zero-shot image classification: an evaluator beside retrieval, with the same interface.

Each class becomes a text classifier: its name is put into every prompt template (``"a photo of
a {}."``), the prompts are embedded, each embedding L2-normalised, and the class vector is the
normalised mean over templates (prompt ensembling, as in CLIP). An image is scored against every
class vector; top-k accuracy counts an image when its class is among the k best.

Ties: a class whose score equals the true class's score is broken at random, in expectation
(:func:`topk_accuracy`): a model that gives every class the same score scores chance, never 100 %.
The mean per-class recall (:func:`mean_per_class_recall`, clip_benchmark's balanced accuracy) is
the mean over the classes present of their images' top-1 credit, under the same tie rule.

Sets (``eval.classification`` entries, :class:`ClassificationSetSpec`), one reader per ``format``:

* ``imagefolder``: ``path/CLASS/…/image`` (ImageNet layout, images found recursively); labels are
  the sorted class folder names; ``classnames`` (optional) names them: a text file with one name
  per line in that order, or a JSON object ``{folder: name}``;
* ``shards``: WebDataset shards whose samples carry the label as ``KEY.cls`` (an integer) or as
  ``label_key`` in ``KEY.json`` (an integer index or a class name); ``classnames`` is required
  (the demo generator writes its held-out objects this way, ``conf/eval/demo.yaml``). ``path`` may
  also be a clip_benchmark dataset folder (its ``test/`` split is read) or split folder
  (``nshards.txt`` + ``0.tar …``, :func:`ernievil2.data.formats.wds_shards`).

With ``skip_bad_samples`` (the benchmark sets of ``launch/benchmark.py``) a sample without image or
label, a damaged shard or an image that does not decode is counted, logged with shard and key
(:class:`~ernievil2.data.skips.SkipCounter`) and skipped; otherwise it is an :class:`EvalDataError`.
Images are held as crops between evaluations or streamed at every one, by ``eval.hold_images_mb``
(:mod:`ernievil2.evaluators.base`); a streamed set finds the images that do not decode at its first
evaluation.

Templates: a built-in set (:data:`TEMPLATE_SETS`: ``en``, ``zh``), a text file with one template
per line, each holding ``{}`` or ``{c}`` (clip_benchmark's placeholder) once, or a JSON file: a
list of templates or clip_benchmark's ``{dataset: [templates]}`` (:func:`load_templates`). Class
names: a text file (one per line), a JSON list, ``{folder: name}`` or ``{dataset: [names]}``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ernievil2.data.skips import SkipCounter
from ernievil2.distributed import DistInfo, gather_rows, shard_range
from ernievil2.encode import embed_crops, embed_texts
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
from ernievil2.tokenizer import WordPieceTokenizer

log = logging.getLogger("ernievil2.evaluators")

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
    skip_bad_samples: bool = False


@dataclass
class ClassificationSet:
    """Images ready to embed (this rank's share of the resized crops, uint8 ``[n, S, S, 3]``; none
    when ``stream`` decodes them at every evaluation), the label of every image of the set, the
    class names and the prompt templates."""

    images: np.ndarray
    labels: np.ndarray  # int64 [n_images]
    classnames: list[str]
    templates: list[str]
    image_start: int = 0
    profile: str = "official"
    stream: CropStream | None = None


# --------------------------------------------------------------------------- names and templates
PLACEHOLDERS: tuple[str, ...] = ("{}", "{c}")
DEFAULT_TEMPLATE_KEY = "imagenet1k"


def dataset_key(name: str) -> str:
    """The key of a set in clip_benchmark's ``{dataset: [...]}`` files: the last part of its name
    (``wds/vtab/cifar10`` -> ``cifar10``), as clip_benchmark looks it up."""
    return name.rstrip("/").split("/")[-1]


def load_templates(spec: str, dataset: str | None = None) -> list[str]:
    """A built-in template set (:data:`TEMPLATE_SETS`), a text file of templates (one per line,
    blank lines ignored) or a JSON file: a list of templates, or clip_benchmark's ``{dataset:
    [templates]}`` (the list of ``dataset``, by :func:`dataset_key`, else the ``imagenet1k`` list,
    clip_benchmark's default). Each template holds ``{}`` or ``{c}`` exactly once and is returned
    with ``{}``; one with neither, both or either twice is an :class:`EvalDataError` naming the file
    and the line (JSON: the entry)."""
    if spec in TEMPLATE_SETS:
        return list(TEMPLATE_SETS[spec])
    path = Path(os.path.expanduser(spec))
    if not path.is_file():
        raise EvalDataError(f"templates {spec!r}: neither a built-in set {sorted(TEMPLATE_SETS)} nor a file")
    if path.suffix == ".json":
        doc = _json_doc(path)
        if isinstance(doc, dict):
            doc, key = _dataset_entry(doc, path, dataset, "templates", fallback=DEFAULT_TEMPLATE_KEY)
        else:
            key = None
        if not isinstance(doc, list) or not all(isinstance(t, str) for t in doc):
            kind = "class-specific prompts ({class: [prompts]}) are not supported; " if isinstance(doc, dict) else ""
            raise EvalDataError(f"{path}: {kind}expected a list of templates" + (f" under {key!r}" if key else ""))
        entries = [(f"entry {f'{key!r} ' if key else ''}[{i}]", t) for i, t in enumerate(doc) if t.strip()]
    else:
        entries = [(f"line {n}", line) for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
                   if line.strip()]
    out = [_template(path, where, text) for where, text in entries]
    if not out:
        raise EvalDataError(f"{path}: no template")
    return out


def _template(path: Path, where: str, text: str) -> str:
    text = text.strip()
    if sum(text.count(p) for p in PLACEHOLDERS) != 1:
        raise EvalDataError(f"{path}: {where}: a template holds '{{}}' or '{{c}}' exactly once: {text!r}")
    return text.replace("{c}", "{}")


def _json_doc(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise EvalDataError(f"{path}: line {exc.lineno}: not valid JSON: {exc.msg}") from None


def _dataset_entry(doc: dict, path: Path, dataset: str | None, what: str,
                   fallback: str | None = None) -> tuple[Any, str]:
    """The entry of ``dataset`` (:func:`dataset_key`) in a ``{dataset: ...}`` file, else ``fallback``'s."""
    key = dataset_key(dataset) if dataset else None
    if key is not None and key in doc:
        return doc[key], key
    if fallback is not None and fallback in doc:
        log.info("%s: no %s for %r; using %r's (clip_benchmark's default)", path, what, key, fallback)
        return doc[fallback], fallback
    keys = ", ".join(sorted(map(str, doc))[:8]) + (", …" if len(doc) > 8 else "")
    raise EvalDataError(f"{path}: no {what} for dataset {key!r} (the file has: {keys})")


def load_classnames(path: str, folders: Sequence[str] | None = None, dataset: str | None = None) -> list[str]:
    """Class names from ``path``: a text file with one name per line (label order), a JSON list,
    clip_benchmark's ``{dataset: [names]}`` (the list of ``dataset``, by :func:`dataset_key`), or a
    JSON object ``{folder: name}`` (needs ``folders``, the class folders in label order)."""
    file = Path(os.path.expanduser(path))
    if not file.is_file():
        raise EvalDataError(f"class names file not found: {file}")
    if file.suffix == ".json":
        doc = _json_doc(file)
        if isinstance(doc, dict) and doc and all(isinstance(v, list) for v in doc.values()):
            doc, _ = _dataset_entry(doc, file, dataset, "class names")
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
        names = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
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
    name: str = ""  # the shard sample's key (image files: their path, ``where``)

    def load_image(self) -> bytes:
        return self.load()

    @property
    def key(self) -> str:
        return self.name or self.where


class _Bad(NamedTuple):
    """A shard sample that gives no item: why, as a skip reason and a sentence."""

    reason: str
    detail: str


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
    names = (load_classnames(spec.classnames, folders, dataset=spec.name) if spec.classnames
             else [f.replace("_", " ") for f in folders])
    return items, names


def read_class_shards(spec: ClassificationSetSpec, skips: SkipCounter | None = None) -> tuple[list[_Item], list[str]]:
    """WebDataset shards with ``KEY.cls`` or ``label_key`` in ``KEY.json``; ``classnames`` required.
    ``path``: any shard specification, or a clip_benchmark dataset or split folder. A sample without
    image or usable label, or a damaged shard, raises :class:`EvalDataError` naming shard and key;
    with ``skips`` it is counted there and skipped."""
    from ernievil2.data.formats.wds import missing_local, wds_shards
    from ernievil2.data.shard_codec import IMAGE_EXTS
    from ernievil2.data.shard_reader import list_shards, read_shard

    if not spec.classnames:
        raise EvalDataError(f"classification set {spec.name!r}: format 'shards' needs 'classnames'")
    path = _need(spec, "path")
    if missing_local(path):
        raise EvalDataError(f"classification set {spec.name!r}: folder not found: {path}")
    names = load_classnames(spec.classnames, dataset=spec.name)
    index = {n: k for k, n in enumerate(names)}
    try:
        urls = list_shards(wds_shards(path))
    except (OSError, ValueError) as exc:
        raise EvalDataError(f"classification set {spec.name!r}: {exc}") from None

    def decode(raw: dict) -> tuple[bytes, int] | _Bad:
        image = next((raw[e] for e in IMAGE_EXTS if raw.get(e)), None)
        if image is None:
            return _Bad("no_image", f"no image (looked for {', '.join(IMAGE_EXTS)})")
        try:
            label = _shard_label(raw, spec.label_key, index)
        except ValueError as exc:
            return _Bad("no_label" if str(exc).startswith("no label") else "bad_label", str(exc))
        if not 0 <= label < len(names):
            return _Bad("bad_label", f"label {label} outside the {len(names)} classes")
        return image, label

    def bad(reason: str, where: str, detail: str) -> None:
        if skips is None:
            raise EvalDataError(f"{where}: {detail}")
        skips.add(reason, where, detail)

    items = []
    for url in urls:
        damage: list[Exception] = []
        for key, sample in read_shard(url, lambda u, exc: damage.append(exc), decode=decode):
            where = f"{url}: sample {key}"
            if isinstance(sample, _Bad):
                bad(sample.reason, where, sample.detail)
            elif isinstance(sample, ValueError):  # read_shard's own refusal
                bad("bad_sample", where, str(sample))
            else:
                image, label = sample
                items.append(_Item(lambda image=image: image, label, where, key))
        if damage:
            bad("damaged_shard", url, f"damaged shard: {damage[0]}")
    return items, names


def _shard_label(raw: dict, key: str, index: dict[str, int]) -> int:
    value: object = None
    if raw.get("cls") is not None:
        try:
            value = raw["cls"].decode("utf-8").strip() if isinstance(raw["cls"], bytes) else raw["cls"]
        except UnicodeDecodeError:
            raise ValueError("KEY.cls is not UTF-8") from None
    elif "json" in raw:
        try:
            value = json.loads(raw["json"]).get(key)
        except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
            raise ValueError("json is not an object") from None
    if value is None or value == "":
        raise ValueError(f"no label (neither KEY.cls nor '{key}' in KEY.json)")
    if isinstance(value, str) and value in index:
        return index[value]
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"label {value!r} is neither a class index nor a class name") from None


def _need(spec: ClassificationSetSpec, key: str) -> str:
    value = getattr(spec, key)
    if not value:
        raise EvalDataError(f"classification set {spec.name!r} (format {spec.format}): '{key}' is not set")
    return str(value)


def load_classification_set(spec: ClassificationSetSpec, image_size: int, info: DistInfo | None = None,
                            profile: str = "official", skips: SkipCounter | None = None,
                            hold_mb: float | None = None) -> ClassificationSet:
    """Read ``spec`` and preprocess this rank's share of its images (:mod:`ernievil2.data.preprocess`).
    With ``spec.skip_bad_samples`` malformed samples and images that do not decode are counted in
    ``skips`` (a new one, :func:`~ernievil2.evaluators.base.set_skips`, when None, totals logged at the end) and left out. The crops
    are held when they fit ``hold_mb`` MiB per rank (:func:`~ernievil2.evaluators.base.holds_crops`;
    ``None``: always); else the set is streamed and its images decode at every evaluation."""
    info = info or DistInfo()
    if spec.skip_bad_samples and skips is None:
        skips = set_skips(spec.name, info)
    skips = skips if spec.skip_bad_samples else None
    if spec.format == "imagefolder":
        items, names = read_imagefolder(spec)
    elif spec.format == "shards":
        items, names = read_class_shards(spec, skips)
    else:
        raise EvalDataError(f"classification set {spec.name!r}: unknown format {spec.format!r}; choose from {FORMATS}")
    templates = load_templates(spec.templates, dataset=spec.name)
    if spec.max_images is not None:
        items = items[: spec.max_images]
    if not items:
        raise EvalDataError(f"classification set {spec.name!r} ({spec.format}, {spec.path}) holds no image")
    start, stop = shard_range(len(items), info)
    data = ClassificationSet(np.empty((0, image_size, image_size, 3), dtype=np.uint8),
                             np.asarray([it.label for it in items], dtype=np.int64), names, templates,
                             image_start=start, profile=profile)
    if not holds_crops(len(items), image_size, info, hold_mb):
        data.stream = CropStream(items[start:stop], start, image_size, profile, info, skips)
        return data
    crops, bad = decode_crops(items, start, stop, image_size, profile, info, skip=skips is not None)
    count_undecodable(skips, bad)
    if skips is not None:
        skips.finish()
    if crops:
        data.images = np.stack(crops)
    return drop_images(spec.name, data, bad)


def drop_images(name: str, data: ClassificationSet, bad: Sequence[Bad]) -> ClassificationSet:
    """``data`` without the images ``bad`` names (set indices) and their labels."""
    dropped = np.asarray(sorted({k for k, _, _ in bad}), dtype=np.int64)
    if not len(dropped):
        return data
    if len(dropped) == len(data.labels):
        raise EvalDataError(f"classification set {name!r}: no image decodes ({len(dropped)} skipped)")
    return dataclasses.replace(data, labels=np.delete(data.labels, dropped),
                               image_start=data.image_start - int(np.searchsorted(dropped, data.image_start)))


# --------------------------------------------------------------------------- scoring
def class_embeddings(model: ErnieViL2, tokenizer: WordPieceTokenizer, classnames: Sequence[str],
                     templates: Sequence[str], max_length: int, batch_size: int = 256) -> np.ndarray:
    """float32 ``[C, D]``: per class, the L2-normalised mean of its normalised prompt embeddings."""
    prompts = [t.replace("{}", name) for name in classnames for t in templates]
    emb = embed_texts(model, tokenizer, prompts, max_length, batch_size)
    mean = emb.reshape(len(classnames), len(templates), -1).mean(axis=1)
    return (mean / np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def _above_tied(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(labels, g, t)``: per image the classes scored above its true class and tied with it."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    true = scores[np.arange(len(labels)), labels][:, None]
    return labels, (scores > true).sum(axis=1), (scores == true).sum(axis=1) - 1


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, ks: Sequence[int] = KS) -> dict[int, float]:
    """Top-k accuracy in percent of ``scores [N, C]`` for ``labels [N]``. A class tied with the true
    one is broken at random in expectation: with ``g`` classes above the truth and ``t`` tied with
    it, the image counts ``clip((k - g) / (t + 1), 0, 1)``."""
    _, above, tied = _above_tied(scores, labels)
    return {k: float(np.clip((k - above) / (tied + 1), 0.0, 1.0).mean() * 100.0) for k in ks}


def mean_per_class_recall(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mean per-class recall in percent (balanced accuracy; clip_benchmark's ``mean_per_class_recall``):
    for every class present in ``labels``, the mean top-1 credit of its images, under
    :func:`topk_accuracy`'s tie rule (``clip((1 - g) / (t + 1), 0, 1)``); then the mean over those
    classes."""
    labels, above, tied = _above_tied(scores, labels)
    credit = np.clip((1 - above) / (tied + 1), 0.0, 1.0)
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    per_class = np.bincount(inverse, weights=credit, minlength=len(classes)) / counts
    return float(per_class.mean() * 100.0)


class ZeroShotEvaluator:
    """Zero-shot classification on one set: records ``{step, dataset, protocol: "zeroshot", top1,
    top5, mean_per_class_recall, n_images, n_classes, chance_top1}`` (percentages; every rank embeds
    its share; all get the record)."""

    def __init__(self, name: str, data: ClassificationSet, tokenizer: WordPieceTokenizer, text_max_length: int,
                 batch_size: int = 256, info: DistInfo | None = None):
        self.name, self.data, self.tokenizer = name, data, tokenizer
        self.text_max_length, self.batch_size = text_max_length, batch_size
        self.info = info or DistInfo()

    def __call__(self, model: ErnieViL2, step: int) -> list[dict]:
        classes = class_embeddings(model, self.tokenizer, self.data.classnames, self.data.templates,
                                   self.text_max_length, self.batch_size)
        if self.data.stream is not None:  # decoded batch by batch; the first pass finds the undecodable images
            local, found = self.data.stream.embed(model, self.batch_size)
            self.data = drop_images(self.name, self.data, found or ())
        else:
            local = embed_crops(model, self.data.images, self.batch_size, self.data.profile,
                                "embed images" if self.info.is_main else None)
        images = gather_rows(local, self.info)
        scores = images @ classes.T
        acc = topk_accuracy(scores, self.data.labels)
        n_classes = len(self.data.classnames)
        return [{"step": step, "dataset": self.name, "protocol": "zeroshot",
                 **{f"top{k}": v for k, v in acc.items()},
                 "mean_per_class_recall": mean_per_class_recall(scores, self.data.labels),
                 "n_images": len(self.data.labels), "n_classes": n_classes, "chance_top1": 100.0 / n_classes}]


def format_record(record: dict) -> str:
    """One console line of a zero-shot record."""
    return (f"eval {record['dataset']} (zero-shot, {record['n_images']} images, {record['n_classes']} classes) "
            f"at step {record['step']}: top-1 {record['top1']:.2f}  top-5 {record['top5']:.2f}  "
            + (f"mean per-class recall {record['mean_per_class_recall']:.2f}  "
               if "mean_per_class_recall" in record else "")
            + f"(chance {record['chance_top1']:.2f})")


@register("classification")
def build_zeroshot_evaluator(entry: Any, context: EvalContext) -> ZeroShotEvaluator:
    """The evaluator of one ``eval.classification`` entry (``ClassificationSetSchema``)."""
    spec = ClassificationSetSpec(name=entry.name, format=entry.format, path=entry.path, classnames=entry.classnames,
                                 templates=entry.templates, label_key=entry.label_key, language=entry.language,
                                 max_images=entry.max_images, skip_bad_samples=entry.skip_bad_samples)
    data = load_classification_set(spec, context.image_size, context.info, context.profile,
                                   hold_mb=context.hold_images_mb)
    return ZeroShotEvaluator(spec.name, data, context.tokenizer, context.text_max_length, context.batch_size,
                             context.info)
