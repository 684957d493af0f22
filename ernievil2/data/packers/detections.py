"""Object tags from an object detector's output (``--detections FILE``) in the COCO *results* format.

PaddleDetection, mmdetection and detectron2 all write a JSON list of
``{"image_id": int | str, "category_id": int, "bbox": [x, y, w, h], "score": float}``. This module
turns such a file into the same ``sample key -> [(name, score), ...]`` tags an ``--objects`` file
gives (:data:`~.objects.ScoredTags`), so the packer merges both through one path.

- Names: ``category_id`` -> name through a categories file (a COCO instances json's ``categories``
  or a plain JSON list of ``{id, name}``), then, optionally, through a translation table (JSON object
  or two-column TSV); a name the table lacks stays as it is and is counted.
- Keys (:func:`detection_key`): the input's own ``image id -> key`` table first (COCO: the image's
  file-name stem), else a string id that names an image file (``.../x.jpg``) gives its stem, else
  the id itself, all in their :func:`~ernievil2.data.formats.sample_key` form.
- Selection: :func:`~.objects.select_tags`: detections scoring at least ``min_score``, one tag per
  name (its best score), best first (ties: file order), at most ``max_count``.
- A malformed entry is counted by reason (with the first few places), never fatal; a file that is
  not JSON or whose top level is not a list is (:class:`~.errors.PackError` naming the file).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ernievil2.data.formats import FormatError, category_names, sample_key

from .errors import PackError, as_pack_error
from .objects import ScoredTags, select_tags

IMAGE_SUFFIXES: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
"""A string ``image_id`` ending in one of these names a file: its stem is the key."""

# Reasons a results entry is not used (keys of ``DetectionTags.malformed``).
NOT_AN_OBJECT = "not_an_object"
MISSING_FIELD = "missing_field"
BAD_IMAGE_ID = "bad_image_id"
UNKNOWN_CATEGORY = "unknown_category"
BAD_SCORE = "bad_score"
REQUIRED_FIELDS: tuple[str, ...] = ("image_id", "category_id", "score")
"""Fields an entry needs (``bbox``, ``segmentation`` and others are not read)."""
_EXAMPLES_PER_REASON = 5


@dataclass(frozen=True)
class DetectionOptions:
    """``--detections`` and its companions (see ``launch/pack.py --help``).

    ``categories_file``: ``None`` takes the categories of the input's ``--instances`` (COCO).
    """

    file: Path
    categories_file: Path | None = None
    min_score: float = 0.5
    max_count: int | None = None
    translate_file: Path | None = None

    def __post_init__(self) -> None:
        if self.max_count is not None and self.max_count < 1:
            raise PackError(f"--det-max must be >= 1, got {self.max_count}")
        if not math.isfinite(self.min_score):
            raise PackError(f"--det-min-score must be a finite number, got {self.min_score}")


@dataclass
class DetectionTags:
    """A results file read: selected tags per sample key, and what was counted on the way."""

    tags: dict[str, ScoredTags] = field(default_factory=dict)
    entries: int = 0
    valid: int = 0
    below_min_score: int = 0
    images: set[str] = field(default_factory=set)
    malformed: dict[str, int] = field(default_factory=dict)
    malformed_examples: dict[str, list[str]] = field(default_factory=dict)
    untranslated: dict[str, int] = field(default_factory=dict)

    def bad(self, reason: str, where: str) -> None:
        """Count one unusable entry; keep the first few places of each reason."""
        self.malformed[reason] = self.malformed.get(reason, 0) + 1
        examples = self.malformed_examples.setdefault(reason, [])
        if len(examples) < _EXAMPLES_PER_REASON:
            examples.append(where)

    def report(self) -> dict[str, Any]:
        """The counts for ``pack_summary.json`` (``images``: keys with at least one valid entry)."""
        return {"entries": self.entries, "valid": self.valid, "below_min_score": self.below_min_score,
                "malformed_total": sum(self.malformed.values()), "malformed": dict(sorted(self.malformed.items())),
                "malformed_examples": dict(sorted(self.malformed_examples.items())),
                "images": len(self.images), "images_with_tags": sum(bool(t) for t in self.tags.values()),
                "untranslated_total": sum(self.untranslated.values()),
                "untranslated": dict(sorted(self.untranslated.items()))}


def _read_json(path: Path, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as exn:
        raise PackError(f"{what} {path}: cannot read JSON ({exn})") from exn


def load_categories(path: Path) -> dict[Any, str]:
    """``category id -> name`` from a COCO instances / annotations json (its ``categories`` list) or
    a plain JSON list of ``{id, name}``. Raises :class:`PackError` naming the file otherwise."""
    data = _read_json(path, "--det-categories")
    if isinstance(data, dict):
        if not isinstance(data.get("categories"), list):
            raise PackError(f"--det-categories {path}: a JSON object without a 'categories' list")
        data = data["categories"]
    if not isinstance(data, list):
        raise PackError(f"--det-categories {path}: top level is a {type(data).__name__}, expected a list of "
                        f"{{id, name}} or an object with 'categories'")
    try:
        return category_names(data, path)
    except FormatError as exn:
        raise as_pack_error(exn) from exn


def load_translation(path: Path) -> dict[str, str]:
    """``name -> translated name`` from a JSON object (the file starts with ``{``) or a TSV of
    ``name \\t translation`` lines (blank lines and ``#`` comments skipped). Raises
    :class:`PackError` naming the file (and line) for anything else or a name given twice."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, ValueError) as exn:
        raise PackError(f"--det-translate {path}: {exn}") from exn
    pairs: list[tuple[str, Any, str]] = []
    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except ValueError as exn:
            raise PackError(f"--det-translate {path}: invalid JSON ({exn})") from exn
        pairs = [(name, value, f"{path}, key {name!r}") for name, value in data.items()]
    else:
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            parts = line.split("\t")
            if len(parts) != 2:
                raise PackError(f"{path}:{lineno}: {len(parts)} tab-separated field(s), expected 2 (name, translation)")
            pairs.append((parts[0], parts[1], f"{path}:{lineno}"))
    table: dict[str, str] = {}
    for name, value, where in pairs:
        if not isinstance(value, str) or not value.strip() or not name.strip():
            raise PackError(f"{where}: needs a non-empty name and translation, got {name!r} -> {value!r}")
        name, value = name.strip(), value.strip()
        if table.get(name, value) != value:
            raise PackError(f"{where}: {name!r} is translated twice ({table[name]!r}, {value!r})")
        table[name] = value
    return table


def detection_key(image_id: int | str, image_keys: dict[str, str]) -> str:
    """The sample key of a detection's ``image_id``: the input's own key for that id
    (``image_keys``, e.g. a COCO image's file stem), else the stem of a string id naming an image
    file, else the id itself; always in :func:`~ernievil2.data.formats.sample_key` form."""
    raw = str(image_id).strip()
    if raw in image_keys:
        return image_keys[raw]
    if isinstance(image_id, str) and Path(raw).suffix.lower() in IMAGE_SUFFIXES:
        return sample_key(Path(raw.replace("\\", "/")).stem)
    return sample_key(raw)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_detections(path: Path, categories: dict[Any, str], *, min_score: float = 0.5,
                    max_count: int | None = None, translation: dict[str, str] | None = None,
                    image_keys: dict[str, str] | None = None) -> DetectionTags:
    """Read a COCO results file into selected tags per sample key (see the module doc).

    ``categories``: ``category id -> name``; ``translation``: optional ``name -> name`` table;
    ``image_keys``: the input's ``str(image id) -> key`` table. Raises :class:`PackError` naming
    the file when it is not JSON or its top level is not a list; bad entries are only counted.
    """
    data = _read_json(path, "--detections")
    if not isinstance(data, list):
        raise PackError(f"--detections {path}: top level is a {type(data).__name__}, expected a list of "
                        f"{{image_id, category_id, bbox, score}} (COCO results format)")
    keys = image_keys or {}
    out = DetectionTags(entries=len(data))
    raw: dict[str, ScoredTags] = {}
    for index, entry in enumerate(data):
        where = f"{path}[{index}]"
        if not isinstance(entry, dict):
            out.bad(NOT_AN_OBJECT, f"{where}: a {type(entry).__name__}, not an object")
            continue
        missing = [name for name in REQUIRED_FIELDS if name not in entry]
        if missing:
            out.bad(MISSING_FIELD, f"{where}: no {', '.join(missing)}")
            continue
        image_id, cat_id, score = entry["image_id"], entry["category_id"], entry["score"]
        if isinstance(image_id, bool) or not isinstance(image_id, (int, str)) or not str(image_id).strip():
            out.bad(BAD_IMAGE_ID, f"{where}: image_id {image_id!r} is not an int or a non-empty string")
            continue
        if isinstance(cat_id, bool) or not isinstance(cat_id, (int, str)) or cat_id not in categories:
            out.bad(UNKNOWN_CATEGORY, f"{where}: category_id {cat_id!r} is not in the categories")
            continue
        if not _is_number(score):
            out.bad(BAD_SCORE, f"{where}: score {score!r} is not a finite number")
            continue
        name = categories[cat_id]
        if translation is not None:
            if name in translation:
                name = translation[name]
            else:
                out.untranslated[name] = out.untranslated.get(name, 0) + 1
        key = detection_key(image_id, keys)
        out.valid += 1
        out.images.add(key)
        if score < min_score:
            out.below_min_score += 1
        raw.setdefault(key, []).append((name, float(score)))
    out.tags = {key: select_tags(tags, min_score, max_count) for key, tags in raw.items()}
    return out
