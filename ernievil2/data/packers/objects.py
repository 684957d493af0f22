"""Object tags from a detector or tagger (``--objects FILE``), filtered and merged into samples.

The file is JSON Lines; each line is either ``{"key": K, "objects": [{"name": N, "score": S}, ...]}``
or a mapping ``{K: [{"name": N, "score": S}, ...], ...}``. Keys are matched on their sample-key
form (:func:`~ernievil2.data.formats.sample_key`), so raw image ids work too. Lines naming the same
key add up.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ernievil2.data.formats import sample_key

from .errors import PackError

ScoredTags = list[tuple[str, float]]


def _entries(value: Any, where: str) -> ScoredTags:
    if not isinstance(value, list):
        raise PackError(f"{where}: objects must be a list of {{name, score}}, got {type(value).__name__}")
    out: ScoredTags = []
    for entry in value:
        name = entry.get("name") if isinstance(entry, dict) else None
        score = entry.get("score") if isinstance(entry, dict) else None
        if not isinstance(name, str) or isinstance(score, bool) or not isinstance(score, (int, float)):
            raise PackError(f"{where}: entry {entry!r} is not a {{'name': str, 'score': number}} object")
        if name.strip():
            out.append((name.strip(), float(score)))
    return out


def select_tags(tags: ScoredTags, min_score: float = 0.0, max_count: int | None = None) -> ScoredTags:
    """Tags scoring at least ``min_score``, one per name (its best score), best first (ties keep file
    order), at most ``max_count`` of them."""
    best: dict[str, float] = {}
    for name, score in tags:
        if score >= min_score and score > best.get(name, float("-inf")):
            best[name] = score
    ranked = sorted(best.items(), key=lambda item: -item[1])
    return ranked if max_count is None else ranked[:max_count]


def load_detector_objects(path: Path, min_score: float = 0.0, max_count: int | None = None) -> dict[str, ScoredTags]:
    """``sample key -> selected (name, score) tags`` of an ``--objects`` file (see the module doc).

    Raises :class:`PackError` naming the file and line for anything malformed.
    """
    if max_count is not None and max_count < 1:
        raise PackError(f"--objects-max must be >= 1, got {max_count}")
    raw: dict[str, ScoredTags] = {}
    try:
        with open(path, encoding="utf-8") as f:
            lines = list(enumerate(f, 1))
    except OSError as exn:
        raise PackError(f"--objects file {path}: {exn}") from exn
    for lineno, line in lines:
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except ValueError as exn:
            raise PackError(f"{where}: invalid JSON ({exn})") from exn
        if not isinstance(obj, dict):
            raise PackError(f"{where}: expected an object, got a {type(obj).__name__}")
        pairs = [(obj.get("key"), obj.get("objects"))] if "key" in obj and "objects" in obj else list(obj.items())
        for key, value in pairs:
            if key is None or not str(key).strip():
                raise PackError(f"{where}: empty key")
            raw.setdefault(sample_key(key), []).extend(_entries(value, f"{where}, key {key}"))
    return {key: select_tags(tags, min_score, max_count) for key, tags in raw.items()}


def merge_tags(objects: list[str] | None, tags: ScoredTags) -> list[str] | None:
    """The sample's own object names first, then the detector's names it lacks; ``None`` stays
    ``None`` when there is nothing to add."""
    if not tags:
        return objects
    merged = list(objects or [])
    merged.extend(name for name, _ in tags if name not in merged)
    return merged
