"""Selecting the pairs to keep from the sidecars of a scoring run: a global cut over every shard.

``fraction`` keeps the best-scored share of the samples (DataComp's "CLIP score top 30 %"): the
samples are ranked by score across all shards (ties in shard, then sample order) and exactly
``ceil(fraction · n)`` are kept; the threshold that fraction meant is reported. A fraction carries
across models and datasets, a threshold (LAION's cosine 0.28) only across runs of one model.
``per_source`` applies the fraction within each source (the folder of the shard) instead.
"""
from __future__ import annotations

import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .sidecar import SIDECAR_SUFFIX, FilterError, ShardScores, read_sidecar


def source_of(shard: str) -> str:
    """The source a shard belongs to: its folder (URL without the file name)."""
    return shard.rsplit("/", 1)[0] if "/" in shard else "."


def read_scores(folder: str | os.PathLike) -> list[ShardScores]:
    """Every sidecar in ``folder``, by file name; :class:`FilterError` for a missing or empty folder,
    a corrupt sidecar (named), or sidecars of different models."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FilterError(f"score folder not found: {folder}")
    paths = sorted(folder.glob(f"*{SIDECAR_SUFFIX}"))
    if not paths:
        raise FilterError(f"no score sidecars (*{SIDECAR_SUFFIX}) in {folder}: run `launch/filter.py score` first")
    out = [read_sidecar(p) for p in paths]
    models = {str(s.meta.get("model")) for s in out}
    if len(models) > 1:
        raise FilterError(f"{folder} holds sidecars of {len(models)} different models: scores of two models "
                          f"do not share one scale; score all shards with one checkpoint")
    return out


@dataclass
class Selection:
    """The kept keys (in shard order) and what the cut was."""

    keys: list[str]
    total: int
    thresholds: dict[str, float]
    per_shard: dict[str, list[int]] = field(default_factory=dict)
    per_source: dict[str, list[int]] = field(default_factory=dict)
    scores: np.ndarray = field(default_factory=lambda: np.empty(0, np.float32))

    def summary(self, fraction: float | None, threshold: float | None, by: str) -> dict[str, Any]:
        """The JSON summary: the cut asked for, the threshold(s) it meant, kept/total per shard and source."""
        return {"fraction": fraction, "threshold_asked": threshold, "score": by, "kept": len(self.keys),
                "total": self.total, "kept_fraction": len(self.keys) / self.total if self.total else 0.0,
                "thresholds": self.thresholds,
                "per_source": {k: {"kept": v[0], "total": v[1]} for k, v in self.per_source.items()},
                "per_shard": {k: {"kept": v[0], "total": v[1]} for k, v in self.per_shard.items()}}


def _top(scores: np.ndarray, fraction: float) -> tuple[np.ndarray, float]:
    """Mask of the ``ceil(fraction · n)`` best scores (stable on ties) and the lowest kept score."""
    k = math.ceil(fraction * len(scores))
    order = np.argsort(-scores, kind="stable")
    keep = np.zeros(len(scores), dtype=bool)
    keep[order[:k]] = True
    return keep, float(scores[order[k - 1]]) if k else math.inf


def select_keys(shards: list[ShardScores], *, fraction: float | None = None, threshold: float | None = None,
                by: str = "first", per_source: bool = False) -> Selection:
    """Keep the best ``fraction`` of all samples (per source with ``per_source``), or every sample
    scoring at least ``threshold``; exactly one of the two."""
    if (fraction is None) == (threshold is None):
        raise FilterError("give exactly one of --fraction and --threshold")
    if fraction is not None and not 0.0 < fraction <= 1.0:
        raise FilterError(f"--fraction must be in (0, 1], got {fraction}")
    scores = [s.score(by) for s in shards]
    flat = np.concatenate(scores) if scores else np.empty(0, np.float32)
    groups = defaultdict(list)
    for i, s in enumerate(shards):
        groups[source_of(s.shard) if per_source else "all"].append(i)
    keep = [np.zeros(len(x), dtype=bool) for x in scores]
    thresholds: dict[str, float] = {}
    for name, members in groups.items():
        group = np.concatenate([scores[i] for i in members])
        if fraction is not None:
            mask, thresholds[name] = _top(group, fraction)
        else:
            mask, thresholds[name] = group >= threshold, float(threshold)
        for i, part in zip(members, np.split(mask, np.cumsum([len(scores[i]) for i in members])[:-1])):
            keep[i] = part
    selection = Selection([], len(flat), thresholds, scores=flat)
    by_source: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for s, mask in zip(shards, keep):
        selection.keys += [k for k, m in zip(s.keys, mask) if m]
        selection.per_shard[s.shard] = [int(mask.sum()), len(s)]
        counts = by_source[source_of(s.shard)]
        counts[0] += int(mask.sum())
        counts[1] += len(s)
    selection.per_source = dict(by_source)
    return selection


def write_selection(selection: Selection, out: str | os.PathLike, summary: dict[str, Any]) -> list[Path]:
    """Write the kept keys (one per line) to ``out``, the summary beside it (``OUT.summary.json``)
    and a histogram of the scores with the cut (``OUT.hist.png``); each file atomically."""
    import json

    from ernievil2.atomic import atomic_write
    from ernievil2.plots import score_histogram

    out = Path(out)
    with atomic_write(out) as f:
        f.writelines(f"{k}\n" for k in selection.keys)
    summary_path = out.with_name(out.name + ".summary.json")
    with atomic_write(summary_path) as f:
        f.write(json.dumps(summary, indent=1) + "\n")
    png = out.with_name(out.name + ".hist.png")
    score_histogram(selection.scores, selection.thresholds, png, title=f"{summary['score']} caption score")
    return [out, summary_path, png]
