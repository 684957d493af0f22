"""Evaluation that lines up with LAION's clip_benchmark (``clip_benchmark eval``): its datasets, its
flags (``launch/benchmark.py eval``), its metric names and its result JSON, computed by the
evaluators training and ``mode=eval`` run (:mod:`ernievil2.evaluators`).

Datasets (``--dataset``, one or several):

* ``wds/NAME``: clip_benchmark's WebDataset layout (:mod:`ernievil2.data.formats.wds`) in
  ``--dataset_root``, where ``{dataset}`` is replaced by ``NAME`` and ``{dataset_cleaned}`` by
  ``NAME`` with ``/`` as ``-`` (clip_benchmark's rule). ``dataset_type.txt`` = ``retrieval``: a
  retrieval set (format ``wds_retrieval``, one caption per ``KEY.txt`` line); otherwise a
  classification set (format ``shards``, ``KEY.cls``) named by ``classnames.txt``, prompted with
  ``zeroshot_classification_templates.txt`` (``{c}``);
* a local folder in that layout (its path stands for ``NAME``);
* a text file listing datasets, one per line (as clip_benchmark reads one);
* ``FORMAT:PATH`` with a retrieval format of :data:`ernievil2.data.formats.FORMATS` (``karpathy:``,
  ``coco:``, ``jsonl:``, ``shards:`` …) or ``imagefolder:`` (classification; ``shards:`` is
  classification under ``--task zeroshot_classification``).

Language (``--language``, recorded in the JSON): for a language other than ``en`` the class names
and templates of a ``wds`` set are read from ``classnames_LANG.txt`` /
``zeroshot_classification_templates_LANG.txt`` when the folder has them, else (with a warning) from
the plain files, as clip_benchmark reads the plain ``classnames.txt`` whatever the language. A set
without a templates file, and ``imagefolder:``/``shards:`` sets, use the built-in templates of the
language (:data:`ernievil2.evaluators.zeroshot.TEMPLATE_SETS`). ``--custom_classname_file`` /
``--custom_template_file`` (clip_benchmark's ``{dataset: [...]}`` JSON, a JSON list or a text file)
override both.

Metrics, as fractions in [0, 1]: classification ``acc1``, ``acc5`` (NaN with fewer than 5 classes, as
clip_benchmark writes it) and ``mean_per_class_recall``; retrieval ``image_retrieval_recall@K``
(text→image, every caption a query) and ``text_retrieval_recall@K`` (image→text, an image counts
when any of its captions is in the top K): :func:`ernievil2.retrieval.multi_caption_recall`, the
same definition. Ties count for the ground truth (retrieval) or in expectation (classification),
where clip_benchmark takes ``torch.topk``'s order. Malformed samples and undecodable images are
skipped, counted and logged with shard and key.
"""
from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ernievil2.atomic import atomic_write
from ernievil2.data.formats import FORMATS as RETRIEVAL_FORMATS
from ernievil2.data.formats.wds import CLASSNAMES, TEMPLATES, dataset_type, missing_local

# Resolving datasets imports no Paddle (the evaluators are imported when a set is evaluated), so a
# command line naming a missing folder fails at once, in one line.
BUILTIN_TEMPLATE_LANGUAGES: tuple[str, ...] = ("en", "zh")  # ernievil2.evaluators.zeroshot.TEMPLATE_SETS

log = logging.getLogger("ernievil2.benchmark")

CLASSIFICATION, RETRIEVAL = "zeroshot_classification", "zeroshot_retrieval"
TASKS: tuple[str, ...] = (CLASSIFICATION, RETRIEVAL)
DEFAULT_OUTPUT = "{dataset}_{model}_{language}_{task}.json"
DEFAULT_RECALL_K: tuple[int, ...] = (1, 5, 10)
LOCAL_FORMATS: tuple[str, ...] = (*RETRIEVAL_FORMATS, "imagefolder")
# Every field of an eval.datasets / eval.classification entry (EvalSetSchema / ClassificationSetSchema).
RETRIEVAL_ENTRY = {"image_root": None, "split": "test", "caption_key": "captions", "protocol": "multi",
                   "max_images": None, "recall_k": list(DEFAULT_RECALL_K), "skip_bad_samples": True}
CLASSIFICATION_ENTRY = {"classnames": None, "templates": "en", "label_key": "label", "language": "en",
                        "max_images": None, "skip_bad_samples": True}


class BenchmarkError(ValueError):
    """A dataset or option the benchmark cannot use; one line naming it."""


@dataclass(frozen=True)
class BenchmarkSet:
    """One dataset resolved: ``dataset`` as given, its ``slug`` for file names, the ``task``, the
    ``language`` and the evaluation config ``entry`` (an ``eval.datasets`` entry for retrieval, an
    ``eval.classification`` one for classification)."""

    dataset: str
    slug: str
    task: str
    language: str
    entry: dict[str, Any] = field(default_factory=dict)

    @property
    def config_list(self) -> str:
        return "datasets" if self.task == RETRIEVAL else "classification"


@dataclass
class BenchmarkOptions:
    """``launch/benchmark.py eval``'s options (clip_benchmark's names)."""

    dataset: list[str]
    ckpt: str
    dataset_root: str = "root"
    task: str = "auto"
    language: list[str] = field(default_factory=lambda: ["en"])
    split: str = "test"
    vocab: str | None = None
    model: str | None = None
    batch_size: int = 64
    recall_k: list[int] = field(default_factory=lambda: list(DEFAULT_RECALL_K))
    output: str = DEFAULT_OUTPUT
    custom_template_file: str | None = None
    custom_classname_file: str | None = None
    text_max_length: int = 48
    profile: str = "official"
    device: str = "auto"
    skip_existing: bool = False
    backend: str = "auto"  # what embeds: ernievil2.inference.predictor.encoder_for
    precision: str = "fp32"


# --------------------------------------------------------------------------- datasets
def resolve_dataset(dataset: str, opts: BenchmarkOptions, language: str = "en") -> BenchmarkSet:
    """The evaluation set ``dataset`` names (module doc), checked to exist; :class:`BenchmarkError`
    (one line) for a missing folder or class names file, or a task the set cannot do."""
    if opts.task not in (*TASKS, "auto"):
        raise BenchmarkError(f"--task {opts.task!r}: choose from {', '.join(TASKS)} or auto")
    if dataset.startswith("wds/"):
        name = dataset[len("wds/"):]
        root = opts.dataset_root.replace("{dataset}", name).replace("{dataset_cleaned}", name.replace("/", "-"))
        if missing_local(root):
            raise BenchmarkError(f"{dataset}: dataset folder not found: {root} (--dataset_root {opts.dataset_root})")
        return _wds_set(dataset, name.replace("/", "_"), root, opts, language)
    fmt, sep, path = dataset.partition(":")
    if sep and fmt in LOCAL_FORMATS:
        if missing_local(path):
            raise BenchmarkError(f"{dataset}: not found: {path}")
        return _format_set(dataset, fmt, path, opts, language)
    if os.path.isdir(dataset):
        return _wds_set(dataset, Path(dataset).name, dataset, opts, language)
    raise BenchmarkError(f"{dataset}: dataset folder not found (give wds/NAME with --dataset_root, a clip_benchmark "
                         f"dataset folder, or FORMAT:PATH with FORMAT one of {', '.join(LOCAL_FORMATS)})")


def _wds_set(dataset: str, slug: str, root: str, opts: BenchmarkOptions, language: str) -> BenchmarkSet:
    kind = dataset_type(root)
    if kind == "multilabel":
        raise BenchmarkError(f"{dataset}: multilabel classification sets are not supported")
    task = opts.task if opts.task != "auto" else (RETRIEVAL if kind == "retrieval" else CLASSIFICATION)
    if task == RETRIEVAL:
        entry = {**RETRIEVAL_ENTRY, "name": dataset, "format": "wds_retrieval", "path": root, "split": opts.split,
                 "recall_k": [int(k) for k in opts.recall_k]}
        return BenchmarkSet(dataset, slug, task, language, entry)
    if root.startswith(("http://", "https://")):
        raise BenchmarkError(f"{dataset}: classification sets are read from a local folder, not {root}")
    classnames = opts.custom_classname_file or _language_file(root, CLASSNAMES, language)
    if classnames is None:
        raise BenchmarkError(f"{dataset}: no {CLASSNAMES} in {root} (zeroshot_classification needs the class names; "
                             "or give --custom_classname_file)")
    templates = opts.custom_template_file or _language_file(root, TEMPLATES, language) or _builtin(dataset, language)
    entry = {**CLASSIFICATION_ENTRY, "name": dataset, "format": "shards", "path": f"{root.rstrip('/')}/{opts.split}",
             "classnames": classnames, "templates": templates, "language": language}
    return BenchmarkSet(dataset, slug, task, language, entry)


def _language_file(root: str, name: str, language: str) -> str | None:
    """``ROOT/STEM_LANG.txt`` for a language other than ``en`` when it exists, else ``ROOT/NAME``
    (a warning when a language file was looked for), else None."""
    stem, ext = os.path.splitext(name)
    if language != "en":
        own = os.path.join(root, f"{stem}_{language}{ext}")
        if os.path.isfile(own):
            return own
    plain = os.path.join(root, name)
    if not os.path.isfile(plain):
        return None
    if language != "en":
        log.warning("%s: no %s_%s%s; using %s for language %r", root, stem, language, ext, name, language)
    return plain


def _builtin(dataset: str, language: str) -> str:
    if language not in BUILTIN_TEMPLATE_LANGUAGES:
        raise BenchmarkError(f"{dataset}: no templates file and no built-in templates for language {language!r} "
                             f"(built-in: {', '.join(BUILTIN_TEMPLATE_LANGUAGES)}); give --custom_template_file")
    log.warning("%s: no %s; using the built-in %r templates", dataset, TEMPLATES, language)
    return language


def _format_set(dataset: str, fmt: str, path: str, opts: BenchmarkOptions, language: str) -> BenchmarkSet:
    slug = Path(path.rstrip("/")).stem or fmt
    classify = fmt == "imagefolder" or (fmt == "shards" and opts.task == CLASSIFICATION)
    if not classify:
        if opts.task == CLASSIFICATION:
            raise BenchmarkError(f"{dataset}: format {fmt} holds captions, not class labels (--task {opts.task})")
        entry = {**RETRIEVAL_ENTRY, "name": dataset, "format": fmt, "path": path, "split": opts.split,
                 "recall_k": [int(k) for k in opts.recall_k]}
        return BenchmarkSet(dataset, slug, RETRIEVAL, language, entry)
    if opts.task == RETRIEVAL:
        raise BenchmarkError(f"{dataset}: an image folder holds class labels, not captions (--task {opts.task})")
    if fmt == "shards" and not opts.custom_classname_file:
        raise BenchmarkError(f"{dataset}: classification shards need --custom_classname_file")
    entry = {**CLASSIFICATION_ENTRY, "name": dataset, "format": fmt, "path": path,
             "classnames": opts.custom_classname_file,
             "templates": opts.custom_template_file or _builtin(dataset, language), "language": language}
    return BenchmarkSet(dataset, slug, CLASSIFICATION, language, entry)


# --------------------------------------------------------------------------- metrics and results
def clip_benchmark_metrics(task: str, record: dict, recall_k: Sequence[int] = DEFAULT_RECALL_K) -> dict[str, float]:
    """clip_benchmark's metrics (fractions) from one evaluator record (percentages)."""
    if task == CLASSIFICATION:
        acc5 = record["top5"] / 100.0 if record["n_classes"] >= 5 else math.nan
        return {"acc1": record["top1"] / 100.0, "acc5": acc5,
                "mean_per_class_recall": record["mean_per_class_recall"] / 100.0}
    out = {}
    for k in recall_k:
        out[f"image_retrieval_recall@{k}"] = record[f"t2i_r{k}"] / 100.0
        if f"i2t_r{k}" in record:  # absent from a text→image-only record (directions: t2i)
            out[f"text_retrieval_recall@{k}"] = record[f"i2t_r{k}"] / 100.0
    return out


def result_document(record: dict, model: str, pretrained: str, language: str = "en", dataset: str | None = None,
                    recall_k: Sequence[int] = DEFAULT_RECALL_K) -> dict | None:
    """clip_benchmark's result JSON (``{dataset, model, pretrained, task, metrics, language}``) of one
    evaluator record; None for a record of no clip_benchmark task (the 1:1 ``official`` protocol)."""
    task = {"zeroshot": CLASSIFICATION, "multi": RETRIEVAL}.get(record.get("protocol"))
    if task is None:
        return None
    return {"dataset": dataset or record["dataset"], "model": model, "pretrained": pretrained, "task": task,
            "metrics": clip_benchmark_metrics(task, record, recall_k), "language": language}


def output_path(template: str, bset: BenchmarkSet, model: str, pretrained: str) -> Path:
    """``--output`` with its placeholders filled: ``{dataset}`` (the set's slug), ``{model}``,
    ``{pretrained}`` (the checkpoint's base name), ``{task}``, ``{language}``."""
    values = {"dataset": bset.slug, "model": model, "pretrained": Path(pretrained.rstrip("/")).name,
              "task": bset.task, "language": bset.language}
    out = template
    for key, value in values.items():
        out = out.replace("{" + key + "}", value)
    return Path(out)


def model_label(cfg: Any) -> str:
    """``ernievil2-PRESET`` when the architecture is a named preset, else ``ernievil2``."""
    from ernievil2.models.config import PRESETS

    return next((f"ernievil2-{name}" for name, preset in PRESETS.items() if preset == cfg), "ernievil2")


def evaluate_set(bset: BenchmarkSet, model: Any, tokenizer: Any, opts: BenchmarkOptions) -> dict:
    """The record of the evaluator :func:`ernievil2.evaluators.build_evaluators` builds for ``bset``."""
    from ernievil2.evaluators import EvalContext, build_evaluators

    lists: dict[str, list] = {"datasets": [], "classification": []}
    lists[bset.config_list].append(SimpleNamespace(**bset.entry))
    eval_cfg = SimpleNamespace(batch_size=opts.batch_size, profile=opts.profile, **lists)
    context = EvalContext(int(model.cfg.vision.image_size), tokenizer, opts.text_max_length)
    [evaluator] = build_evaluators(eval_cfg, context)
    [record] = evaluator(model, 0)
    return record


def dataset_names(given: Sequence[str]) -> list[str]:
    """``--dataset``'s values, a text file among them read as one dataset per line (as clip_benchmark
    reads one)."""
    out: list[str] = []
    for name in given:
        if os.path.isfile(name) and name.partition(":")[0] not in LOCAL_FORMATS:
            out += [line.strip() for line in Path(name).read_text(encoding="utf-8").splitlines() if line.strip()]
        else:
            out.append(name)
    return out


def resolve_sets(opts: BenchmarkOptions) -> list[BenchmarkSet]:
    """Every dataset × language of ``opts``, resolved and checked (:func:`resolve_dataset`)."""
    return [resolve_dataset(d, opts, lang) for d in dataset_names(opts.dataset) for lang in opts.language]


def check_outputs(opts: BenchmarkOptions, sets: Sequence[BenchmarkSet]) -> None:
    """:class:`BenchmarkError` when ``--output`` names one file for two sets (one would overwrite
    the other: its template lacks ``{dataset}`` or ``{language}``)."""
    seen: dict[Path, BenchmarkSet] = {}
    for bset in sets:
        out = output_path(opts.output, bset, "MODEL", opts.ckpt)
        if out in seen:
            other = seen[out]
            raise BenchmarkError(f"--output {opts.output} names one file for {other.dataset} ({other.language}) and "
                                 f"{bset.dataset} ({bset.language}); put {{dataset}} and {{language}} in it")
        seen[out] = bset


def run_benchmark(opts: BenchmarkOptions, sets: Sequence[BenchmarkSet] | None = None) -> list[Path]:
    """Evaluate ``opts.ckpt`` on every set (default :func:`resolve_sets`, all resolved before the
    model is loaded); write one clip_benchmark result JSON each (``{dataset, model, pretrained,
    task, metrics, language}``); return their paths."""
    from ernievil2.device import resolve_device
    from ernievil2.inference.predictor import encoder_for
    from ernievil2.weights.load import load_model

    sets = resolve_sets(opts) if sets is None else sets
    check_outputs(opts, sets)
    resolve_device(opts.device)
    loaded = load_model(opts.ckpt, opts.vocab)
    tokenizer = loaded.tokenizer(opts.text_max_length)
    model_name = opts.model or model_label(loaded.model.cfg)
    runner = None  # made when a set is evaluated (nothing to embed when every result exists)
    written = []
    for bset in sets:
        out = output_path(opts.output, bset, model_name, opts.ckpt)
        if opts.skip_existing and out.exists():
            log.info("skip %s: %s exists", bset.dataset, out)
            continue
        log.info("running %s on %s (%s) with %s", bset.task, bset.dataset, bset.language, opts.ckpt)
        runner = runner or encoder_for(loaded.model, opts.backend, opts.precision)
        dump = result_document(evaluate_set(bset, runner, tokenizer, opts), model_name, opts.ckpt,
                               bset.language, bset.dataset, opts.recall_k)
        metrics = dump["metrics"]
        with atomic_write(out) as f:
            json.dump(dump, f)
        log.info("%s: %s -> %s", bset.dataset, "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()), out)
        written.append(out)
    return written
