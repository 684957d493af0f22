"""Multi-view vs CLIP-only on the embedded demo, side by side in one run.

    python bench/demo_loss_table.py [--out-root /tmp/demo_bench] [extra Hydra overrides...]

Runs `launch/train.py` three times — multi-view (the demo default), CLIP-only with the same number
of steps, CLIP-only with the steps that fill the multi-view run's training time — and prints a
Markdown table of the final demo_val retrieval (multi-caption protocol) with wall times.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(name: str, overrides: list[str], out_root: Path) -> dict:
    run_dir = out_root / name
    start = time.perf_counter()
    subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), f"hydra.run.dir={run_dir}", *overrides],
                   check=True, cwd=REPO)
    wall = time.perf_counter() - start
    final = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    rate = sum(r["samples_per_s"] for r in log[1:]) / max(1, len(log) - 1)
    return {"name": name, "overrides": " ".join(overrides), "wall_s": wall, "samples_per_s": rate, **final}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out-root", default="/tmp/demo_bench")
    args, extra = ap.parse_known_args()
    out_root = Path(args.out_root)
    rows = [run("multiview", list(extra), out_root)]
    steps = rows[0]["step"]
    rows.append(run("clip_only_same_steps", ["loss=clip_only", *extra], out_root))
    # Same training time: scale the steps by the measured throughput ratio.
    same_time = int(round(steps * rows[1]["samples_per_s"] / rows[0]["samples_per_s"]))
    rows.append(run("clip_only_same_time", ["loss=clip_only", f"trainer.max_steps={same_time}",
                                            f"eval.every_n_steps={same_time}", *extra], out_root))
    print("| run | overrides | steps | samples/s | wall s | i2t R@1/5/10 | t2i R@1/5/10 | mean recall |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        i2t = "/".join(f"{r[f'i2t_r{k}']:.1f}" for k in (1, 5, 10))
        t2i = "/".join(f"{r[f't2i_r{k}']:.1f}" for k in (1, 5, 10))
        print(f"| {r['name']} | `{r['overrides']}` | {r['step']} | {r['samples_per_s']:.0f} | {r['wall_s']:.0f} "
              f"| {i2t} | {t2i} | **{r['mean_recall']:.2f}** |")


if __name__ == "__main__":
    main()
