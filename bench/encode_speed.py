"""CPU encode speed: images/s and texts/s of the one encode path, dygraph against Paddle Inference
(oneDNN, float32 and bfloat16) and ONNX Runtime, beside open_clip's ViT-B-16 on torch.

    python bench/encode_speed.py --presets tiny base --torch-python /tmp/torchvenv/bin/python

Randomly initialised towers (speed does not depend on the weights), ``--batch-size`` images at the
model's size and ``--batch-size`` captions of ``--text-length`` tokens. The contenders take turns,
one batch each per round, for ``--rounds`` rounds after a warm-up, so load on the machine falls on
all of them alike; the table holds each one's median. Every row goes through
:mod:`ernievil2.encode` (``embed_pixels`` / ``embed_token_ids``), as search, inference, filtering
and evaluation do. open_clip (``ViT-B-16``, float32, its 77-token context) runs in the Python given
by ``--torch-python`` (one with ``torch`` and ``open_clip_torch``; the row is skipped without it),
next to the base row. ``--metric-ckpt CKPT --metric-set FORMAT:PATH`` also evaluates a trained
checkpoint's retrieval with each precision (``launch/benchmark.py eval``), to put the bfloat16
change of the metric beside its speed. ``--quick``: tiny only, 2 rounds (numbers meaningless).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# The open_clip side, run by --torch-python: reads "image" / "text" lines, answers seconds per batch.
# torchvision's C ops do not load beside a CPU-only torch from PyPI, and torchvision's import then
# fails registering their shape functions; open_clip imports torchvision (for its transforms), so
# that one module is replaced by an empty one first (no torchvision op is ever run here).
OPEN_CLIP_WORKER = r"""
import sys, time, types
sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
import torch
import open_clip
torch.set_num_threads(int(sys.argv[1]))
model, _, _ = open_clip.create_model_and_transforms("ViT-B-16", pretrained=None)  # random weights
model.eval()
print(f"ready {open_clip.__version__} {torch.__version__}", flush=True)
for line in sys.stdin:
    tower, batch = line.split()
    if tower == "image":
        encode, data = model.encode_image, torch.randn(int(batch), 3, 224, 224)
    else:
        encode, data = model.encode_text, torch.randint(1, 49000, (int(batch), 77))
    t = time.perf_counter()
    with torch.inference_mode():
        encode(data)
    print(time.perf_counter() - t, flush=True)
"""


class OpenClipWorker:
    """open_clip ViT-B-16 in another Python, timed one batch per request."""

    def __init__(self, python: str, threads: int):
        self.proc = subprocess.Popen([python, "-c", OPEN_CLIP_WORKER, str(threads)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        ready = self.proc.stdout.readline().split()
        if not ready or ready[0] != "ready":
            raise RuntimeError(f"open_clip worker did not start ({python})")
        self.versions = {"open_clip": ready[1], "torch": ready[2]}

    def __call__(self, tower: str, batch: int) -> float:
        self.proc.stdin.write(f"{tower} {batch}\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def contenders(model, precisions: list[str], threads: int, folder: Path) -> dict[str, object]:
    """Name → what the encode path embeds with: dygraph, the predictors, ONNX Runtime when installed."""
    from ernievil2.inference.onnx_export import OnnxTowers, export_onnx
    from ernievil2.inference.predictor import compile_towers

    found: dict[str, object] = {"Paddle dygraph": model}
    for precision in precisions:
        found[f"Paddle Inference, oneDNN, {precision}"] = compile_towers(model, precision, threads, cache_dir=folder)
    try:
        onnx_dir = folder / "onnx"
        export_onnx(model, onnx_dir, model.cfg.vision.image_size, model.cfg.text.max_positions)
        found["ONNX Runtime, fp32"] = OnnxTowers(onnx_dir, intra_op_num_threads=threads)
    except Exception as exc:  # the onnx extra is optional
        print(f"ONNX Runtime row skipped: {exc}", file=sys.stderr)
    return found


def race(runs: dict[str, Callable[[], float]], rounds: int, pause: float) -> dict[str, list[float]]:
    """Seconds per batch of every contender, taking turns; one warm-up call each first. Each turn
    starts ``pause`` seconds after the last: the thread pools of the one before (OpenMP, ONNX
    Runtime) spin for a while after their work and would slow the next one down."""
    for run in runs.values():
        run()
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            time.sleep(pause)
            seconds[name].append(run())
    return seconds


def timed(fn: Callable[[], object]) -> Callable[[], float]:
    def run() -> float:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t
    return run


def measure_preset(preset: str, args: argparse.Namespace, worker: OpenClipWorker | None) -> list[dict]:
    import paddle

    from ernievil2.encode import embed_pixels, embed_token_ids
    from ernievil2.inference.predictor import bf16_supported
    from ernievil2.models import build_model
    from ernievil2.models.config import model_config

    paddle.set_device("cpu")
    paddle.seed(0)
    model = build_model(model_config(preset))
    model.eval()
    size = model.cfg.vision.image_size
    rng = np.random.default_rng(0)
    precisions = ["fp32"] + (["bf16"] if bf16_supported() else [])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        found = contenders(model, precisions, args.threads, Path(tmp))
        prepare_s = time.perf_counter() - t
        for n, tower in ((n, tower) for n in args.batch_size for tower in ("image", "text")):
            if tower == "image":
                data, embed = rng.standard_normal((n, 3, size, size)).astype(np.float32), embed_pixels
            else:
                data = rng.integers(5, model.cfg.text.vocab_size, (n, args.text_length)).astype(np.int64)
                data[:, 0], data[:, -1], embed = 1, 2, embed_token_ids
            runs = {name: timed(lambda r=runner, d=data, e=embed, n=n: e(r, d, n)) for name, runner in found.items()}
            if worker is not None and preset == "base":
                runs["open_clip ViT-B-16 (torch), fp32"] = lambda tower=tower, n=n: worker(tower, n)
            seconds = race(runs, args.rounds, args.pause)
            for name, values in seconds.items():
                rows.append({"preset": preset, "tower": tower, "backend": name, "batch": n,
                             "input": f"{size} px" if tower == "image" else
                             f"{77 if 'open_clip' in name else args.text_length} tokens",
                             "per_s": n / statistics.median(values), "seconds": values})
    print(f"{preset}: exports and predictors made in {prepare_s:.1f} s", flush=True)
    return rows


def metric_change(args: argparse.Namespace) -> dict[str, float]:
    """Mean recall of ``--metric-ckpt`` on ``--metric-set`` with dygraph and each predictor precision."""
    from ernievil2.benchmark import BenchmarkOptions, run_benchmark
    from ernievil2.inference.predictor import bf16_supported

    out: dict[str, float] = {}
    variants = [("dygraph", "fp32"), ("predictor", "fp32")] + ([("predictor", "bf16")] if bf16_supported() else [])
    with tempfile.TemporaryDirectory() as tmp:
        for backend, precision in variants:
            opts = BenchmarkOptions(dataset=[args.metric_set], ckpt=args.metric_ckpt, task="zeroshot_retrieval",
                                    output=f"{tmp}/{backend}_{precision}.json", backend=backend, precision=precision)
            [path] = run_benchmark(opts)
            metrics = json.loads(Path(path).read_text())["metrics"]
            out[f"{backend} {precision}"] = statistics.mean(v for k, v in metrics.items() if "recall@" in k)
    return out


def main() -> None:
    from ernievil2.threads import available_cpus

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "base"])
    ap.add_argument("--batch-size", type=int, nargs="+", default=[8], help="one or more batch sizes")
    ap.add_argument("--text-length", type=int, default=32, help="tokens per caption of our text tower")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=available_cpus())
    ap.add_argument("--pause", type=float, default=1.0, help="seconds of idle before each timed batch")
    ap.add_argument("--torch-python", help="a Python with torch and open_clip_torch (default: skip that row)")
    ap.add_argument("--metric-ckpt", help="a trained checkpoint for the precision's change of retrieval")
    ap.add_argument("--metric-set", help="its retrieval set, as launch/benchmark.py --dataset takes it")
    ap.add_argument("--out", type=Path, default=REPO / "outputs" / "bench" / "encode_speed.json")
    ap.add_argument("--quick", action="store_true", help="tiny only, 2 rounds")
    args = ap.parse_args()
    if args.quick:
        args.presets, args.rounds, args.pause = ["tiny"], 2, 0.1
    worker = None
    if args.torch_python and "base" in args.presets:
        try:
            worker = OpenClipWorker(args.torch_python, args.threads)
        except (OSError, RuntimeError) as exc:
            print(f"open_clip row skipped: {exc}", file=sys.stderr)
    rows = [row for preset in args.presets for row in measure_preset(preset, args, worker)]
    report = {"cpu": _cpu_model(), "threads": args.threads, "date": time.strftime("%Y-%m-%d"), "rows": rows,
              "versions": worker.versions if worker else {}}
    if worker is not None:
        worker.close()
    if args.metric_ckpt and args.metric_set:
        report["mean_recall"] = metric_change(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"{report['cpu']}, {args.threads} threads\n| preset | tower | backend | batch | input | per second |\n"
          "|---|---|---|---:|---|---:|")
    for r in rows:
        print(f"| {r['preset']} | {r['tower']} | {r['backend']} | {r['batch']} | {r['input']} | {r['per_s']:.2f} |")
    for name, value in report.get("mean_recall", {}).items():
        print(f"mean recall, {name}: {value:.4f}")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    main()
