"""Does starting from an existing image tower pay? Chinese-CLIP's two stages on the demo, end to end.

    python bench/transfer_demo.py

1. **Stage 0** (the "existing" tower): a demo model trained on the English captions only
   (``data.caption_languages=[en]``), on demo data of another seed (``data.demo.seed=1``: other
   images than the Chinese runs see), the default recipe and length.
2. **Transfer** (Chinese-CLIP's stage 1 + 2, ``conf/experiment/lit_zh.yaml``): a Chinese model
   (``data.caption_languages=[zh]``, a vocab built from the Chinese captions, a fresh text tower)
   whose image tower starts from stage 0 (``model.vision.init_from``), locked for the first half
   of the run (``model.vision.locked=true optim.unlock_at=0.5``), contrastive image–caption loss.
3. **From scratch**: the same Chinese model, every tower fresh.

Both Chinese runs train the same number of steps, ``--steps`` (the default recipe's steps in 160 s
on 2 cores); a locked step is cheaper, so the transferred run gets no more compute than the run
from scratch. ``--time-budget 160`` trains each for 160 s instead (``trainer.time_budget_s``, the
unlock at half of it): equal time, where the cheaper locked steps count, on an otherwise idle machine.
``--stage0-steps``: a longer stage 0 (an existing tower has usually had far more compute than the
run that reuses it). Each run's last Chinese retrieval (``demo_val`` with ``caption_languages=[zh]``: the
500 held-out images and their Chinese captions) is read from ``metrics.jsonl``; the locked and
unlocked halves' training speed from ``train_log.jsonl``. Results: ``OUT/results.json`` and a table.
``--quick``: a 2-step smoke run (numbers meaningless).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ZH_EVAL = ["eval.datasets.0.caption_languages=[zh]", "eval.classification=[]"]


def run(args: list[str], log: Path) -> None:
    """Run a command line from the repository root; stop with its output on failure."""
    print("$", " ".join(args), flush=True)
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True)
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(args)}\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")


def final_record(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"demo_val"' in line]
    return rows[-1]


def last_step(run_dir: Path) -> int:
    log = run_dir / "train_log.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return max((r["step"] for r in rows if "step" in r), default=0)


def speed(run_dir: Path) -> tuple[float, float]:
    """Median samples/s of the first and the second half of a run's logged steps (after step 10)."""
    log = run_dir / "train_log.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    rows = [r for r in rows if "samples_per_s" in r and r["step"] > 10]
    steps = max((r["step"] for r in rows), default=0)
    first = [r["samples_per_s"] for r in rows if r["step"] <= steps // 2] or [0.0]
    second = [r["samples_per_s"] for r in rows if r["step"] > steps // 2] or [0.0]
    return statistics.median(first), statistics.median(second)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "outputs" / "bench" / "transfer_demo")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=516, help="steps of each Chinese run (default: the default "
                    "recipe's steps in 160 s on 2 cores, docs/BENCHMARKS.md)")
    ap.add_argument("--unlock-at", default="0.5", help="optim.unlock_at of the transferred run; 'never': locked "
                    "throughout (LiT); other than 0.5 the run is named transfer_unlock<VALUE>")
    ap.add_argument("--time-budget", type=float, help="train each Chinese run for this many seconds "
                    "(trainer.time_budget_s; unlock_at is then a fraction of it) instead of --steps: equal time, "
                    "so the cheaper locked steps count; needs an otherwise idle machine")
    ap.add_argument("--stage0-steps", type=int, default=480, help="training steps of the stage-0 model (the "
                    "\"existing\" tower; an existing tower usually had far more compute than the run that reuses it)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 steps, one seed, a small demo")
    args = ap.parse_args()
    small = ["data.demo.n_train=64", "data.demo.n_val=16", "data.demo.samples_per_shard=32"] if args.quick else []
    stage0_steps = 2 if args.quick else args.stage0_steps
    if args.quick:
        args.seeds, args.steps = args.seeds[:1], 2
    out = args.out.resolve()  # the commands run from the repository root
    (out / "runs").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    stage0 = out / "runs" / ("stage0_en" if stage0_steps in (2, 480) else f"stage0_en_{stage0_steps}")
    if not (stage0 / "done").exists():
        run(["launch/train.py", "data.caption_languages=[en]", "data.demo.seed=1", *small,
             f"trainer.max_steps={stage0_steps}", f"hydra.run.dir={stage0}"], out / "runs" / "stage0_en.log")
        (stage0 / "done").touch()
    ckpt = stage0 / "checkpoints" / f"step_{stage0_steps:07d}"
    stage0_zh = final_record(stage0)

    length = ([f"trainer.time_budget_s={args.time_budget:g}", "trainer.max_steps=1000000",
               "eval.every_n_steps=1000000"] if args.time_budget else
              [f"trainer.max_steps={args.steps}", f"eval.every_n_steps={max(args.steps // 2, 1)}"])
    common = ["loss=clip_only", "data.caption_languages=[zh]", *ZH_EVAL, *small, *length, "trainer.save_checkpoint=false"]
    tag = f"_t{args.time_budget:g}" if args.time_budget else ""
    unlock = [] if args.unlock_at == "never" else [f"optim.unlock_at={args.unlock_at}", "optim.unlock_warmup_steps=30"]
    name = "transfer" if args.unlock_at == "0.5" else f"transfer_unlock{args.unlock_at}"
    recipes = {"scratch": [], name: [f"model.vision.init_from={ckpt}", "model.vision.locked=true", *unlock]}
    results: dict[str, dict[str, float]] = {name: {} for name in recipes}
    speeds: dict[str, list[tuple[float, float]]] = {name: [] for name in recipes}
    for seed in args.seeds:
        for name, extra in recipes.items():
            run_dir = out / "runs" / f"{name}{tag}_s{seed}"
            if not (run_dir / "done").exists():
                run(["launch/train.py", *common, *extra, f"trainer.seed={seed}", f"hydra.run.dir={run_dir}"],
                    out / "runs" / f"{name}{tag}_s{seed}.log")
                (run_dir / "done").touch()
            results[name][str(seed)] = final_record(run_dir)["mean_recall"]
            speeds[name].append(speed(run_dir))
            print(f"{name} seed {seed}: Chinese mean recall {results[name][str(seed)]:.2f}", flush=True)

    table = {name: {"median": statistics.median(v.values()), "min": min(v.values()), "max": max(v.values()),
                    "by_seed": v,
                    "samples_per_s_first_half": statistics.median(s[0] for s in speeds[name]),
                    "samples_per_s_second_half": statistics.median(s[1] for s in speeds[name])}
             for name, v in results.items()}
    report = {"steps": None if args.time_budget else args.steps, "time_budget_s": args.time_budget,
              "steps_by_seed": {n: [last_step(out / "runs" / f"{n}{tag}_s{seed}") for seed in args.seeds] for n in recipes},
              "stage0_steps": stage0_steps, "stage0": str(ckpt), "stage0_demo_val_mean_recall_all_languages":
              stage0_zh["mean_recall"], "results": table, "seconds": round(time.perf_counter() - start, 1)}
    (out / (f"results{tag}.json" if name == "transfer" else f"results_{name}{tag}.json")).write_text(json.dumps(report, indent=1) + "\n")
    base = table["scratch"]["median"]
    print("| Chinese model | median | min | max | vs scratch | samples/s 1st half | 2nd half |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, row in table.items():
        print(f"| {name} | {row['median']:.2f} | {row['min']:.2f} | {row['max']:.2f} | {row['median'] / base:.2f}× "
              f"| {row['samples_per_s_first_half']:.0f} | {row['samples_per_s_second_half']:.0f} |")


if __name__ == "__main__":
    main()
