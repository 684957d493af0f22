"""PNG plots of a training run, to judge it without a dashboard (ernievil2.plots).

    python launch/plot.py RUN_DIR              # writes RUN_DIR/plots/*.png
    python launch/plot.py RUN_DIR --out DIR
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ernievil2.plots import plot_run


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, write the PNGs, print their paths; return the exit status."""
    parser = argparse.ArgumentParser(description="PNG plots of a training run (losses, scalars, evaluations).")
    parser.add_argument("run_dir", help="a run folder holding train_log.jsonl and/or metrics.jsonl")
    parser.add_argument("--out", help="where to write the PNGs (default RUN_DIR/plots)")
    args = parser.parse_args(argv)
    try:
        written = plot_run(args.run_dir, args.out)
    except (OSError, ValueError) as exc:
        print(f"plot.py: error: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
