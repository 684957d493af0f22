"""PNG plots of a training run, to judge it without a dashboard (CLI: ``launch/plot.py``).

Reads ``train_log.jsonl`` and ``metrics.jsonl`` of the run dir and writes, against the optimizer step:
``losses.png`` (the total loss and each loss term, one panel each), one PNG per other training
scalar (``lr.png``, ``logit_scale.png``, ``grad_norm.png``, ``samples_per_s.png``, ...),
``bad_samples.png`` (the ``bad/<kind>`` counters, when logged) and one
``recall_<dataset>_<protocol>.png`` per retrieval set with every recall metric, and one
``zeroshot_<dataset>.png`` per zero-shot classification set (top-1, top-5, chance). A step logged twice
(a run resumed from an earlier checkpoint) keeps its latest value. :func:`score_histogram` draws the
pair scores of a filtering run (``launch/filter.py select``) with its cut.
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

from ernievil2.jsonl import jsonl_objects
from ernievil2.losses import TERMS

TRAIN_LOG, METRICS = "train_log.jsonl", "metrics.jsonl"
NOT_PLOTTED = {"step", "epoch"}
BAD_PREFIX = "bad/"
AXIS_LABELS = {
    "lr": "learning rate", "logit_scale": "logit scale exp(t)", "grad_norm": "gradient L2 norm",
    "samples_per_s": "samples / s", "data_wait_s": "data wait per step (s)", "samples_seen": "samples seen",
    "nonfinite_steps": "steps with a non-finite loss",
}

Series = dict[str, tuple[list[int], list[float]]]


class LogFormatError(ValueError):
    """A line of a run log that is not a JSON object with an integer ``step``; names file and line."""


def read_jsonl(path: Path) -> list[dict]:
    """The JSON objects of ``path``, one per non-empty line; each must hold an integer ``step``."""
    records = []
    for lineno, record in jsonl_objects(path):
        if isinstance(record, str):
            raise LogFormatError(f"{path}:{lineno}: not JSON: {record}")
        if not isinstance(record.get("step"), int):
            raise LogFormatError(f"{path}:{lineno}: expected an object with an integer 'step'")
        records.append(record)
    return records


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def to_series(records: Sequence[dict]) -> Series:
    """``{name: (steps, values)}`` of every numeric key, sorted by step; a repeated step keeps its
    last value (a resumed run logs the steps after its checkpoint again)."""
    by_name: dict[str, dict[int, float]] = {}
    for record in records:
        for name, value in record.items():
            if name not in NOT_PLOTTED and _is_number(value):
                by_name.setdefault(name, {})[record["step"]] = float(value)
    return {name: (sorted(points), [points[s] for s in sorted(points)]) for name, points in by_name.items()}


def is_loss(name: str) -> bool:
    """The total loss, a multi-view loss term, or any ``loss_*`` scalar."""
    return name == "loss" or name in TERMS or name.startswith("loss_")


def _file_name(*parts: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", "_".join(parts)) + ".png"


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_losses(series: Series, out: Path) -> Path:
    """One panel per loss series (each on its own scale), total loss first."""
    names = sorted((n for n in series if is_loss(n)), key=lambda n: (n != "loss", n))
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        steps, values = series[name]
        ax.plot(steps, values, marker=".")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(title="total loss" if name == "loss" else f"loss term: {name}", xlabel="optimizer step",
               ylabel="loss")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(names):]:
        ax.set_axis_off()
    fig.suptitle("training losses")
    return _save(fig, out / "losses.png")


def plot_scalar(name: str, steps: list[int], values: list[float], out: Path) -> Path:
    """One training scalar against the step."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, values, marker=".")
    label = AXIS_LABELS.get(name, name)
    ax.set(title=label if label == name else f"{label} ({name})", xlabel="optimizer step", ylabel=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    return _save(fig, out / _file_name(name))


_DIRECTIONS = {"i2t": ("image→text", "-"), "t2i": ("text→image", "--")}
_K_COLORS = {"r1": "tab:blue", "r5": "tab:orange", "r10": "tab:green", "mean": "tab:gray"}


def recall_style(name: str) -> tuple[str, dict]:
    """Legend label and line style of a recall metric: colour by K, solid image→text, dashed text→image."""
    if name == "mean_recall":
        return "mean recall", {"color": "black", "linewidth": 2.5}
    direction, _, kind = name.partition("_")
    if direction in _DIRECTIONS and kind in _K_COLORS:
        label, linestyle = _DIRECTIONS[direction]
        what = "mean" if kind == "mean" else f"R@{kind[1:]}"
        return f"{label} {what}", {"color": _K_COLORS[kind], "linestyle": linestyle}
    return name, {}


def plot_group(title: str, series: Series, ylabel: str, path: Path, styled: bool = False) -> Path:
    """Several series on one axes, legend to the right; ``styled``: labels and styles of recall metrics."""
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for name, (steps, values) in series.items():
        label, style = recall_style(name) if styled else (name, {})
        ax.plot(steps, values, marker=".", label=label, **style)
    ax.set(title=title, xlabel="optimizer step", ylabel=ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(fig, path)


def plot_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> list[Path]:
    """Write the PNGs of ``run_dir`` (to ``out_dir``, default ``run_dir/plots``); returns their paths."""
    run_dir = Path(run_dir)
    logs = {name: read_jsonl(run_dir / name) for name in (TRAIN_LOG, METRICS) if (run_dir / name).is_file()}
    if not any(logs.values()):
        raise FileNotFoundError(f"{run_dir}: no {TRAIN_LOG} or {METRICS} with records (is it a run dir?)")
    out = Path(out_dir) if out_dir is not None else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []

    train = to_series(logs.get(TRAIN_LOG, []))
    if any(is_loss(n) for n in train):
        written.append(plot_losses(train, out))
    bad = {n: s for n, s in train.items() if n.startswith(BAD_PREFIX)}
    if bad:
        written.append(plot_group("bad samples (counters)", bad, "count", out / "bad_samples.png"))
    for name, (steps, values) in train.items():
        if not is_loss(name) and not name.startswith(BAD_PREFIX):
            written.append(plot_scalar(name, steps, values, out))

    evaluations: dict[tuple[str, str], list[dict]] = {}
    for record in logs.get(METRICS, []):
        evaluations.setdefault((str(record.get("dataset")), str(record.get("protocol"))), []).append(record)
    for (dataset, protocol), records in evaluations.items():
        if protocol == "zeroshot":
            series = {k: v for k, v in to_series(records).items() if k in ("top1", "top5", "chance_top1")}
            written.append(plot_group(f"zero-shot classification on {dataset}", series, "accuracy (%)",
                                      out / _file_name("zeroshot", dataset)))
        else:
            written.append(plot_group(f"retrieval on {dataset} ({protocol} protocol)", to_series(records),
                                      "recall (%)", out / _file_name("recall", dataset, protocol), styled=True))
    return written


def score_histogram(scores: Sequence[float], cuts: dict[str, float], path: str | os.PathLike,
                    title: str = "score") -> Path:
    """Histogram of pair scores (``launch/filter.py select``) with a vertical line at each cut."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(list(scores), bins=60, color="tab:blue", alpha=0.8)
    for name, cut in cuts.items():
        if math.isfinite(cut):
            ax.axvline(cut, color="tab:red", linestyle="--", label=f"cut {cut:.3f}" + ("" if name == "all" else f" ({name})"))
    if any(math.isfinite(c) for c in cuts.values()):
        ax.legend(fontsize="small")
    ax.set(title=title, xlabel="cosine of caption and image", ylabel="pairs")
    ax.grid(alpha=0.3)
    return _save(fig, Path(path))
