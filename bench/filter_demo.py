"""Does filtering by the model pay at equal compute? The demo with noisy web-like pairs, end to end.

    python bench/filter_demo.py

The scorer is a checkpoint trained on demo data of *another* seed (so it never saw these pairs):
by default the script trains one first (the default demo recipe and length, ``data.demo.seed=1``,
into ``OUT/runs/scorer``); ``--scorer CKPT`` scores with a given one. The script

1. makes the training data: the demo's training split with ``--mismatch`` of the pairs captioned
   with another scene's captions (``data.demo.mismatch``), seed 0;
2. scores it (``launch/filter.py score``) and reports the ROC AUC of the score at telling the true
   pairs from the mismatched ones (the demo knows which are which);
3. keeps the best ``--fraction`` (``launch/filter.py select``) and re-packs them
   (``launch/pack.py --keep-keys``); a perfect filter (the true pairs only) is packed the same way;
4. trains the default recipe on each of: all pairs, the filtered ones, the perfect filter's, for the
   same number of steps (equal compute: the recipe and the batch are the same, only the data differ)
   and ``--seeds``; each run's final demo-val mean recall is read from its ``metrics.jsonl``.

Everything goes through the command lines a user runs. Results: ``OUT/results.json`` and a table.
``--quick`` is a smoke run (a 2-step training on 200 pairs; numbers meaningless).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ernievil2.data.demo import ensure_demo_data, mismatched_indices  # noqa: E402
from ernievil2.filtering.select import read_scores  # noqa: E402
from ernievil2.train.config import DemoSchema  # noqa: E402


def run(args: list[str], log: Path | None = None) -> None:
    """Run a command line from the repository root; stop with its output on failure."""
    print("$", " ".join(args), flush=True)
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True)
    if log is not None:
        log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(args)}\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
    if log is None and proc.stdout.strip():
        print(proc.stdout.strip())


def roc_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(score of a random true pair > that of a random mismatched one), ties counting half."""
    scores = np.concatenate([positive, negative])
    order = scores.argsort(kind="stable")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    for value in np.unique(scores):  # average ranks of ties
        tie = scores == value
        ranks[tie] = ranks[tie].mean()
    n_pos, n_neg = len(positive), len(negative)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def final_mean_recall(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"demo_val"' in line]
    return float(rows[-1]["mean_recall"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scorer", help="checkpoint trained on demo data of another seed (default: train one)")
    ap.add_argument("--scorer-steps", type=int, help="training steps of the scorer the script trains (default: "
                    "the demo recipe's)")
    ap.add_argument("--out", type=Path, default=REPO / "outputs" / "bench" / "filter_demo")
    ap.add_argument("--mismatch", type=float, default=0.4)
    ap.add_argument("--fraction", type=float, default=0.6)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=516, help="training steps of every run (default: what the "
                    "default recipe reaches in 160 s on 2 cores, docs/BENCHMARKS.md)")
    ap.add_argument("--loss", help="train this loss config instead of the default recipe (e.g. clip_only); "
                    "its runs and results.json get the name as a suffix")
    ap.add_argument("--conditions", nargs="+", default=["all", "filtered", "perfect"],
                    choices=["all", "filtered", "perfect"], help="which training sets to train on")
    ap.add_argument("--quick", action="store_true", help="smoke run: 200 pairs, 2 steps, one seed")
    args = ap.parse_args()
    sizes = {"n_train": 200, "n_val": 20, "samples_per_shard": 50} if args.quick else {}
    if args.quick:
        args.seeds, args.steps = args.seeds[:1], 2
    # The demo's web-like data as conf/data/demo.yaml describes it (detector tags), with --mismatch;
    # data=shards starts from the schema's defaults, so every run names them.
    knobs = {**OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "data" / "demo.yaml").demo),
             "mismatch": args.mismatch, **sizes}
    schema = DemoSchema(**knobs)
    demo = [f"data.demo.{k}={v}" for k, v in knobs.items()]
    data = ensure_demo_data(schema.cache_dir, schema)
    out = args.out.resolve()  # the commands run from the repository root
    (out / "runs").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if args.scorer is None:
        scorer = out / "runs" / "scorer"
        if not (scorer / "done").exists():
            run(["launch/train.py", "data.demo.seed=1", *[d for d in demo if "mismatch" not in d],
                 *(["trainer.max_steps=2"] if args.quick else
                   [f"trainer.max_steps={args.scorer_steps}"] if args.scorer_steps else []),
                 f"hydra.run.dir={scorer}"],
                log=out / "runs" / "scorer.log")
            (scorer / "done").touch()
        args.scorer = str(scorer)

    scores = out / "scores"
    run(["launch/filter.py", "score", "--ckpt", args.scorer, "--shards", str(data.train_dir), "--out", str(scores),
         "--no-progress"])
    wrong = {f"train-{i:07d}" for i in mismatched_indices(schema)}
    shards = read_scores(scores)
    keys = [k for s in shards for k in s.keys]
    first = np.concatenate([s.score("first") for s in shards])
    is_wrong = np.array([k in wrong for k in keys])
    auc = roc_auc(first[~is_wrong], first[is_wrong])
    print(f"scorer ROC AUC (true vs mismatched pairs): {auc:.4f}")

    run(["launch/filter.py", "select", str(scores), "--fraction", str(args.fraction), "--out", str(out / "keep.txt")])
    kept = set((out / "keep.txt").read_text().split())
    (out / "true_pairs.txt").write_text("".join(f"{k}\n" for k in keys if k not in wrong))
    sets = {"all": str(data.train_dir)}
    for name, keep in (("filtered", out / "keep.txt"), ("perfect", out / "true_pairs.txt")):
        if name == "filtered" or not (out / name / "sizes.json").exists():  # the kept keys follow the scorer
            run(["launch/pack.py", "--format", "shards", "--input", str(data.train_dir), "--keep-keys", str(keep),
                 "--output", str(out / name), "--overwrite", "--no-progress"])
        sets[name] = str(out / name)

    suffix = f"_{args.loss}" if args.loss else ""
    sets = {name: path for name, path in sets.items() if name in args.conditions}
    results: dict[str, dict[str, float]] = {name: {} for name in sets}
    for seed in args.seeds:
        for name, shards_dir in sets.items():
            run_dir = out / "runs" / f"{name}{suffix}_s{seed}"
            if not (run_dir / "done").exists():
                run(["launch/train.py", *([f"loss={args.loss}"] if args.loss else []), "data=shards", f"data.train_shards={shards_dir}", "data.num_workers=1",
                     "data.shuffle_buffer=1000", *demo, f"trainer.seed={seed}", f"trainer.max_steps={args.steps}",
                     f"eval.every_n_steps={max(args.steps // 2, 1)}", "trainer.save_checkpoint=false",
                     f"hydra.run.dir={run_dir}"], log=run_dir.with_suffix(".log"))
                (run_dir / "done").touch()
            results[name][str(seed)] = final_mean_recall(run_dir)
            print(f"{name} seed {seed}: mean recall {results[name][str(seed)]:.2f}", flush=True)

    table = {name: {"median": statistics.median(v.values()), "min": min(v.values()), "max": max(v.values()),
                    "by_seed": v} for name, v in results.items()}
    report = {"scorer": args.scorer, "loss": args.loss or "default (multiview)", "mismatch": args.mismatch, "fraction": args.fraction, "steps": args.steps,
              "roc_auc": auc, "kept": len(kept), "kept_mismatched": len(kept & wrong), "pairs": len(keys),
              "mismatched": len(wrong), "results": table, "seconds": round(time.perf_counter() - start, 1)}
    (out / f"results{suffix}.json").write_text(json.dumps(report, indent=1) + "\n")
    base = table[next(iter(table))]["median"]
    print(f"\nkept {len(kept)} of {len(keys)} pairs ({len(kept & wrong)} of {len(wrong)} mismatched); AUC {auc:.4f}")
    print(f"| data | median | min | max | vs {next(iter(table))} |\n|---|---:|---:|---:|---:|")
    for name, row in table.items():
        print(f"| {name} | {row['median']:.2f} | {row['min']:.2f} | {row['max']:.2f} | {row['median'] / base:.2f}× |")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
