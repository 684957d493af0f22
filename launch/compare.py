"""Compare recipes over run dirs (e.g. a Hydra multirun's jobs): a Markdown table and a PNG.

    python launch/compare.py RUN_DIR [RUN_DIR ...] --out outputs/compare
    python launch/compare.py outputs/multirun/demo/TIME/* --metric demo_val/multi/mean_recall --baseline clip_only

Writes ``OUT/compare.md`` (per recipe: runs, steps, training seconds, samples/s, step cost vs the
baseline, the metric's median / min / max over seeds) and ``OUT/compare.png`` (the metric against
training seconds, one line per recipe), and prints the table. See :mod:`ernievil2.compare`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ernievil2.compare import DEFAULT_METRIC, load_runs, markdown_table, plot_curves, summary_rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="run dirs (each with config.json and metrics.jsonl)")
    ap.add_argument("--out", default="outputs/compare", help="folder for compare.md and compare.png")
    ap.add_argument("--metric", default=DEFAULT_METRIC, help="DATASET/PROTOCOL/KEY of metrics.jsonl")
    ap.add_argument("--baseline", default="clip_only", help="recipe the step cost is relative to")
    args = ap.parse_args(argv)
    dirs = [d for d in args.runs if Path(d).is_dir()]  # a multirun folder also holds multirun.yaml
    try:
        runs = load_runs(dirs, args.metric)
    except ValueError as exn:
        print(f"compare: {exn}", file=sys.stderr)
        return 2
    table = markdown_table(summary_rows(runs, args.baseline), args.metric, args.baseline)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(table, encoding="utf-8")
    png = plot_curves(runs, out / "compare.png", args.metric)
    print(table)
    print(f"wrote {out / 'compare.md'} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
