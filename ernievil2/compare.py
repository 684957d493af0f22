"""Compare training recipes across run dirs: a Markdown table and a plot of recall against training time.

A run dir is what ``launch/train.py`` writes (``config.json``, ``metrics.jsonl``, Hydra's
``.hydra/overrides.yaml``), e.g. the jobs of a Hydra multirun::

    python launch/train.py -m loss=clip_only,multiview trainer.seed=1,2,3 trainer.time_budget_s=180
    python launch/compare.py outputs/multirun/demo/<time>/* --out outputs/compare

Runs are grouped into recipes by their command-line overrides, leaving out the seed and the
overrides every run shares (a run with nothing else of its own is named by its ``loss.name``).
Per recipe: runs, steps reached, samples/s (samples over training seconds, evaluation excluded),
the step cost relative to the baseline recipe (its samples/s over this recipe's), the final
metric's median, minimum and maximum over the runs, and how many runs had stalled: their
image-caption loss still at chance (≥ 0.95 · ln B, B the batch rows) a quarter of the way in.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from ernievil2.jsonl import jsonl_objects

DEFAULT_METRIC = "demo_val/multi/mean_recall"
STALL_FRACTION = 0.95
SEED_KEY = "trainer.seed"


@dataclass
class RunResult:
    """One run dir: its recipe label, seed, and the chosen metric's evaluations."""

    path: Path
    label: str
    seed: Optional[int]
    batch_rows: int
    curve: list[tuple[float, float]] = field(default_factory=list)  # (training seconds, metric)
    final_step: int = 0
    final_seconds: float = 0.0
    # image-caption loss at the first logged step past a quarter of the training seconds (None: not logged)
    quarter_loss: Optional[float] = None

    @property
    def stalled(self) -> bool:
        """Whether the image-caption loss still sat at chance (≥ 0.95 · ln B) a quarter of the way in."""
        return self.quarter_loss is not None and self.quarter_loss >= STALL_FRACTION * math.log(self.batch_rows)

    @property
    def final(self) -> float:
        return self.curve[-1][1]

    @property
    def samples_per_s(self) -> float:
        return self.final_step * self.batch_rows / self.final_seconds if self.final_seconds > 0 else float("nan")


def _overrides(run: Path) -> list[str]:
    path = run / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    import yaml

    return [str(o) for o in (yaml.safe_load(path.read_text(encoding="utf-8")) or [])]


def _metric_parts(metric: str) -> tuple[str, str, str]:
    parts = metric.split("/")
    if len(parts) != 3:
        raise ValueError(f"metric must be DATASET/PROTOCOL/KEY (e.g. {DEFAULT_METRIC}), got {metric!r}")
    return parts[0], parts[1], parts[2]


def load_runs(run_dirs: Sequence[str | Path], metric: str = DEFAULT_METRIC) -> list[RunResult]:
    """Read every run dir; a dir without ``config.json`` or without an evaluation of ``metric`` is
    an error naming it (a sweep with a failed job must not be summarised silently)."""
    dataset, protocol, key = _metric_parts(metric)
    raw = []
    for d in map(Path, run_dirs):
        cfg_file = d / "config.json"
        if not cfg_file.is_file():
            raise ValueError(f"{d}: no config.json (not a run dir of launch/train.py)")
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        curve, step, seconds = [], 0, 0.0
        for lineno, rec in jsonl_objects(d / "metrics.jsonl") if (d / "metrics.jsonl").is_file() else []:
            if isinstance(rec, str):
                raise ValueError(f"{d}/metrics.jsonl:{lineno}: {rec}")
            if rec.get("dataset") == dataset and rec.get("protocol") == protocol and key in rec:
                if "train_seconds" not in rec:
                    raise ValueError(f"{d}/metrics.jsonl: evaluation records carry no train_seconds")
                curve.append((float(rec["train_seconds"]), float(rec[key])))
                step, seconds = int(rec["step"]), float(rec["train_seconds"])
        if not curve:
            raise ValueError(f"{d}: no evaluation of {metric} in metrics.jsonl (did the run finish?)")
        rows = int(cfg["data"]["batch_size"]) * int(cfg["trainer"].get("accum_steps", 1))
        raw.append((d, cfg, _overrides(d), curve, step, seconds, rows, _quarter_loss(d, seconds)))
    shared = set.intersection(*(set(o) for _, _, o, *_ in raw)) if raw else set()
    runs = []
    for d, cfg, overrides, curve, step, seconds, rows, quarter in raw:
        own = [o for o in overrides if o not in shared and not o.startswith(SEED_KEY + "=")]
        label = " ".join(o[len("loss="):] if o.startswith("loss=") else o for o in own) or cfg["loss"].get("name", "run")
        runs.append(RunResult(d, label, cfg["trainer"].get("seed"), rows, sorted(curve), step, seconds, quarter))
    return runs


def _quarter_loss(run: Path, seconds: float) -> Optional[float]:
    """The image-caption loss logged first at or past a quarter of ``seconds`` of training."""
    log = run / "train_log.jsonl"
    if not log.is_file():
        return None
    for _, rec in jsonl_objects(log):
        if isinstance(rec, dict) and "image_caption" in rec and float(rec.get("train_seconds", 0.0)) >= seconds / 4:
            return float(rec["image_caption"])
    return None


def group(runs: Sequence[RunResult]) -> dict[str, list[RunResult]]:
    """Runs by recipe label, in first-seen order, each sorted by seed."""
    out: dict[str, list[RunResult]] = {}
    for r in runs:
        out.setdefault(r.label, []).append(r)
    return {k: sorted(v, key=lambda r: (r.seed is None, r.seed)) for k, v in out.items()}


def summary_rows(runs: Sequence[RunResult], baseline: str = "clip_only") -> list[dict]:
    """One dict per recipe: runs, median steps, median samples/s, step cost vs ``baseline`` (None
    when absent), final metric median / min / max and the values by seed."""
    groups = group(runs)
    sps = {k: statistics.median(r.samples_per_s for r in v) for k, v in groups.items()}
    rows = []
    for label, rs in groups.items():
        finals = [r.final for r in rs]
        rows.append({
            "recipe": label, "runs": len(rs), "steps": statistics.median(r.final_step for r in rs),
            "seconds": statistics.median(r.final_seconds for r in rs), "samples_per_s": sps[label],
            "step_cost": sps[baseline] / sps[label] if baseline in sps else None,
            "median": statistics.median(finals), "min": min(finals), "max": max(finals),
            "by_seed": {r.seed: r.final for r in rs}, "stalled": sum(r.stalled for r in rs),
        })
    return rows


def markdown_table(rows: Sequence[dict], metric: str = DEFAULT_METRIC, baseline: str = "clip_only") -> str:
    """The summary as a Markdown table (recipes in the order given)."""
    head = (f"| recipe | runs | steps | train s | samples/s | step cost vs {baseline} | {metric} median | min | max "
            f"| stalled at ¼ | by seed |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n")
    lines = []
    for r in rows:
        cost = "—" if r["step_cost"] is None else f"{r['step_cost']:.2f}×"
        seeds = ", ".join(f"{s}: {v:.2f}" for s, v in r["by_seed"].items())
        lines.append(f"| {r['recipe']} | {r['runs']} | {r['steps']:.0f} | {r['seconds']:.1f} | {r['samples_per_s']:.1f} "
                     f"| {cost} | **{r['median']:.2f}** | {r['min']:.2f} | {r['max']:.2f} | {r['stalled']} | {seeds} |")
    return head + "\n".join(lines) + "\n"


def plot_curves(runs: Sequence[RunResult], out_png: str | Path, metric: str = DEFAULT_METRIC) -> Path:
    """PNG of ``metric`` against training seconds: per recipe its median over runs (thick; each run
    interpolated onto the evaluation times of the recipe's first run) and every run (thin)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for i, (label, rs) in enumerate(group(runs).items()):
        color = f"C{i}"
        for r in rs:
            xs, ys = zip(*r.curve)
            ax.plot(xs, ys, color=color, alpha=0.25, linewidth=1)
        grid = np.array([x for x, _ in rs[0].curve])
        stack = np.array([np.interp(grid, *map(np.array, zip(*r.curve))) for r in rs])
        ax.plot(grid, np.median(stack, axis=0), color=color, linewidth=2.5, marker="o", markersize=3,
                label=f"{label} (median of {len(rs)})")
    ax.set_xlabel("training seconds (evaluation excluded)")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    plt.close(fig)
    return out_png
