"""The packing loop: records from a format reader (:mod:`ernievil2.data.formats`) -> images prepared by
worker processes -> shards, in order.

A reader's :class:`~ernievil2.data.formats.Problem` records are counted and skipped (by reason, with
the first few places); its items are packed with each caption once.

Images are loaded, validated and resized by a ``spawn`` process pool in batches; results are taken
back in submission order and written by one :class:`~ernievil2.data.shard_writer.ShardWriter` in this
process, so the shards are byte-identical for a given input whatever ``workers`` is. At most
``2 × workers`` batches are in flight, which bounds memory on inputs of any size.

Each shard is written under a temporary name and renamed when complete; ``sizes.json`` and
``pack_summary.json`` appear only when the whole pack finished.
"""
from __future__ import annotations

import fnmatch
import json
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ernievil2.atomic import atomic_write
from ernievil2.data.formats import FormatError, Item, Problem, Record, Source, SourceSpec, open_source
from ernievil2.data.sample import RawSample
from ernievil2.data.shard_writer import ShardWriter

from .detections import DetectionOptions, DetectionTags, load_categories, load_detections, load_translation
from .errors import PackError, as_pack_error
from .images import (
    EncodedImage,
    ImageFailure,
    ImageOptions,
    prepare_image,
    prepare_images,
)
from .objects import ScoredTags, load_detector_objects, merge_tags, select_tags

DUPLICATE_KEY = "duplicate_key"
SUMMARY_FILE = "pack_summary.json"
STALE_PATTERNS: tuple[str, ...] = ("*.tar", "*.tmp", "sizes.json", SUMMARY_FILE)
"""Files ``overwrite`` removes from the output folder before packing."""
_EXAMPLES_PER_REASON = 5


@dataclass(frozen=True)
class PackOptions:
    """How to pack (see ``launch/pack.py --help`` for each one's meaning)."""

    workers: int = 1
    samples_per_shard: int = 1000
    max_shard_bytes: int | None = None
    prefix: str = "shard"
    image: ImageOptions = field(default_factory=ImageOptions)
    objects_file: Path | None = None
    objects_min_score: float = 0.0
    objects_max: int | None = None
    detections: DetectionOptions | None = None
    limit: int | None = None
    overwrite: bool = False
    progress: bool | None = None
    batch_size: int = 16
    keep_keys: frozenset[str] | None = None  # pack only these keys (``--keep-keys``: a filter's selection)

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise PackError(f"workers must be >= 1, got {self.workers}")
        if self.limit is not None and self.limit < 1:
            raise PackError(f"limit must be >= 1, got {self.limit}")
        if self.batch_size < 1:
            raise PackError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass
class PackSummary:
    """What a pack did: samples written, skips by reason (with the first few places), shards."""

    format: str
    input: str
    output: str
    written: int = 0
    shards: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_examples: dict[str, list[str]] = field(default_factory=dict)
    resized: int = 0
    reencoded: int = 0
    with_objects: int = 0
    detector: dict[str, Any] = field(default_factory=dict)
    detections: dict[str, Any] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)
    keep_keys: dict[str, Any] = field(default_factory=dict)
    workers: int = 1
    seconds: float = 0.0

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def skip(self, reason: str, where: str) -> None:
        """Count one skipped record; keep the first few places of each reason."""
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        examples = self.skipped_examples.setdefault(reason, [])
        if len(examples) < _EXAMPLES_PER_REASON:
            examples.append(where)

    def to_json(self) -> dict[str, Any]:
        """The ``pack_summary.json`` content."""
        return {
            "format": self.format, "input": self.input, "output": self.output,
            "written": self.written, "shards": self.shards,
            "skipped_total": self.skipped_total, "skipped": dict(sorted(self.skipped.items())),
            "skipped_examples": dict(sorted(self.skipped_examples.items())),
            "resized": self.resized, "reencoded": self.reencoded, "with_objects": self.with_objects,
            "detector": self.detector, "detections": self.detections, "notes": self.notes,
            "keep_keys": self.keep_keys,
            "workers": self.workers, "seconds": round(self.seconds, 3),
        }

    def report(self) -> str:
        """A few human-readable lines for the end of a run."""
        lines = [(f"packed {self.written} sample(s) into {self.shards} shard(s) in {self.output} "
                  f"({self.seconds:.1f} s, {self.workers} worker(s)); {self.with_objects} with object tags, "
                  f"{self.resized} resized, {self.reencoded} re-encoded")]
        lines.append(f"skipped {self.skipped_total}" + (":" if self.skipped else ""))
        for reason, n in sorted(self.skipped.items()):
            lines.append(f"  {reason}: {n} (e.g. {self.skipped_examples[reason][0]})")
        if self.keep_keys:
            k = self.keep_keys
            lines.append(f"--keep-keys: {k['listed']} key(s) listed, {k['left_out']} input sample(s) left out"
                         + (f"; {k['not_found']} listed key(s) not in the input (e.g. {', '.join(k['not_found_examples'])})"
                            if k["not_found"] else ""))
        if self.detector:
            lines.append(f"detector tags: {self.detector}")
        if self.detections:
            d = self.detections
            lines.append(f"detections: {d['valid']} of {d['entries']} entries used ({d['below_min_score']} below "
                         f"--det-min-score {d['min_score']}), {d['samples_tagged']} sample(s) tagged, "
                         f"{d['images_without_sample']} image(s) without a sample")
            for reason, n in d["malformed"].items():
                lines.append(f"  malformed {reason}: {n} (e.g. {d['malformed_examples'][reason][0]})")
            if d["untranslated_total"]:
                lines.append(f"  untranslated names ({d['untranslated_total']} entries): "
                             f"{', '.join(sorted(d['untranslated']))}")
        return "\n".join(lines)


def prepare_output(out_dir: Path, overwrite: bool) -> None:
    """Create ``out_dir``; refuse a non-empty one unless ``overwrite``, which deletes the files a
    previous pack leaves (:data:`STALE_PATTERNS`) and keeps anything else."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise PackError(f"output {out_dir} exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    names = sorted(os.listdir(out_dir))
    if names and not overwrite:
        raise PackError(f"output folder {out_dir} is not empty ({len(names)} entries, e.g. {names[0]}); "
                        f"pass --overwrite to replace a previous pack")
    for name in names:
        if any(fnmatch.fnmatch(name, pattern) for pattern in STALE_PATTERNS) and (out_dir / name).is_file():
            (out_dir / name).unlink()


def read_key_list(path: str | os.PathLike) -> frozenset[str]:
    """The keys of a ``--keep-keys`` file: one per line, blank lines ignored (:class:`PackError`
    naming the file when it is missing or lists none)."""
    try:
        keys = frozenset(line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip())
    except (OSError, UnicodeDecodeError) as exn:
        raise PackError(f"--keep-keys {path}: {exn}") from None
    if not keys:
        raise PackError(f"--keep-keys {path}: lists no keys")
    return keys


def _accepted(records: Iterable[Record], summary: PackSummary, seen: set[str], bar: tqdm,
              keep: frozenset[str] | None = None) -> Iterator[Item]:
    """Items with a new key (and, with ``keep``, a listed one), each caption once; the reader's
    problems, duplicate keys and unlisted samples are counted (and ticked) here."""
    for record in records:
        if isinstance(record, Problem):
            summary.skip(record.reason, str(record))
            bar.update(1)
        elif keep is not None and record.key not in keep:
            summary.keep_keys["left_out"] += 1
            bar.update(1)
        elif record.key in seen:
            summary.skip(DUPLICATE_KEY, f"{record.where} (key {record.key})")
            bar.update(1)
        else:
            seen.add(record.key)
            yield record.deduplicated()


def _batched(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    it = iter(items)
    while batch := list(islice(it, size)):
        yield batch


def _encoded(items: Iterable[Item], options: PackOptions) -> Iterator[tuple[Item, EncodedImage | ImageFailure]]:
    """``(item, prepared image)`` in input order, computed here (1 worker) or by a process pool."""
    if options.workers == 1:
        for item in items:
            yield item, prepare_image(item.image, options.image)
        return
    # spawn: the workers import Pillow and .images only, not the paddle this process has loaded.
    with multiprocessing.get_context("spawn").Pool(options.workers) as pool:
        pending: deque = deque()
        for batch in _batched(items, options.batch_size):
            pending.append((batch, pool.apply_async(prepare_images, ([i.image for i in batch], options.image))))
            if len(pending) >= 2 * options.workers:
                done, result = pending.popleft()
                yield from zip(done, result.get())
        while pending:
            done, result = pending.popleft()
            yield from zip(done, result.get())


def _read_detections(options: DetectionOptions, source: Source) -> DetectionTags:
    """The ``--detections`` file's tags, named through ``--det-categories`` (else the input's own
    COCO categories) and ``--det-translate``, keyed like the input's samples."""
    if options.categories_file is not None:
        categories = load_categories(options.categories_file)
    elif source.categories is not None:
        categories = source.categories
    else:
        raise PackError("--detections needs --det-categories (a COCO instances json or a JSON list of {id, name}); "
                        "only coco input with --instances brings its own categories")
    translation = load_translation(options.translate_file) if options.translate_file is not None else None
    return load_detections(options.file, categories, min_score=options.min_score, max_count=options.max_count,
                           translation=translation, image_keys=source.image_keys)


def combine_tags(*sources: dict[str, ScoredTags]) -> dict[str, ScoredTags]:
    """One ``key -> tags`` table from several (``--objects``, ``--detections``), each already
    selected by its own options: a key's tags together, one per name (best score), best first
    (ties: earlier table first). A single table comes back as it is."""
    if len(sources) == 1:
        return sources[0]
    keys = dict.fromkeys(key for table in sources for key in table)
    return {key: select_tags([tag for table in sources for tag in table.get(key, [])], float("-inf"))
            for key in keys}


def _sample(item: Item, image: EncodedImage, tags: ScoredTags) -> RawSample:
    meta = dict(item.meta)
    meta.update(width=image.width, height=image.height)
    if image.resized:
        meta.update(original_width=image.original_width, original_height=image.original_height)
    if tags:
        meta["object_scores"] = {name: score for name, score in tags}
    return RawSample(key=item.key, image=image.data, captions=item.captions,
                     objects=merge_tags(item.objects, tags), lang=item.language, meta=meta)


def pack(spec: SourceSpec, output: str | os.PathLike, options: PackOptions = PackOptions()) -> PackSummary:
    """Pack the dataset ``spec`` describes into WebDataset shards in ``output``; return the summary
    (also written to ``output/pack_summary.json``). Raises :class:`PackError` for unusable input or
    a non-empty ``output`` without ``options.overwrite``.
    """
    start = time.perf_counter()
    output = Path(output)
    detector = (load_detector_objects(options.objects_file, options.objects_min_score, options.objects_max)
                if options.objects_file is not None else None)
    try:
        source = open_source(spec)
    except FormatError as exn:
        raise as_pack_error(exn) from exn
    detections = _read_detections(options.detections, source) if options.detections is not None else None
    tables = [t for t in (detector, detections.tags if detections is not None else None) if t is not None]
    external = combine_tags(*tables) if tables else {}
    prepare_output(output, options.overwrite)
    summary = PackSummary(format=spec.format, input=str(spec.input), output=str(output), workers=options.workers)
    total = source.total if options.limit is None else min(source.total or options.limit, options.limit)
    records = source.records if options.limit is None else islice(source.records, options.limit)
    seen: set[str] = set()
    matched = det_matched = 0
    bar = tqdm(total=total, unit="img", desc=f"pack {spec.format}", dynamic_ncols=True,
               disable=None if options.progress is None else not options.progress)
    if options.keep_keys is not None:
        summary.keep_keys = {"listed": len(options.keep_keys), "left_out": 0}
    encoded = _encoded(_accepted(records, summary, seen, bar, options.keep_keys), options)
    try:
        # closing(): on an error the worker pool is stopped at once, not when the generator is collected
        with closing(encoded), ShardWriter(output, prefix=options.prefix, max_samples=options.samples_per_shard,
                                           max_bytes=options.max_shard_bytes) as writer:
            for item, image in encoded:
                bar.update(1)
                if isinstance(image, ImageFailure):
                    summary.skip(image.reason, f"{item.where} (key {item.key}): {image.detail}")
                    continue
                tags = external.get(item.key, [])
                matched += bool(detector is not None and detector.get(item.key))
                det_matched += bool(detections is not None and detections.tags.get(item.key))
                sample = _sample(item, image, tags)
                writer.write(sample, "jpg")
                summary.written += 1
                summary.resized += image.resized
                summary.reencoded += image.reencoded
                summary.with_objects += sample.has_objects
    finally:
        bar.close()
    summary.shards = len(writer.shards)
    if options.keep_keys is not None:
        missing = sorted(options.keep_keys - seen)
        summary.keep_keys.update(not_found=len(missing), not_found_examples=missing[:_EXAMPLES_PER_REASON])
    summary.notes = dict(source.notes)
    if detector is not None:
        summary.detector = {"file": str(options.objects_file), "keys": len(detector),
                            "samples_tagged": matched, "keys_without_sample": len(set(detector) - seen),
                            "min_score": options.objects_min_score, "max_count": options.objects_max}
    if detections is not None:
        det = options.detections
        categories = f"--instances {spec.instances}" if det.categories_file is None else str(det.categories_file)
        summary.detections = {
            "file": str(det.file), "categories": categories,
            "translate": str(det.translate_file) if det.translate_file is not None else None,
            "min_score": det.min_score, "max_count": det.max_count, **detections.report(),
            "samples_tagged": det_matched, "images_without_sample": len(detections.images - seen)}
    summary.seconds = time.perf_counter() - start
    with atomic_write(output / SUMMARY_FILE) as f:
        f.write(json.dumps(summary.to_json(), ensure_ascii=False, indent=1) + "\n")
    return summary
