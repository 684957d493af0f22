"""Training-step throughput, peak memory and model-FLOPs utilisation of the multi-view loss.

    python bench/train_step.py --preset base --amp bf16 --amp-level O2 --recompute     # on a GPU
    python bench/train_step.py --preset tiny --device cpu --batches 4,8 --steps 3       # CPU smoke run

For each per-device batch size (``--batches``, or doubling from ``--start`` until out of memory
when ``--batches`` is not given) it builds the model and the trainer exactly as a run would
(:class:`ernievil2.train.trainer.Trainer`, random inputs with the shapes of the real views), runs
``--warmup`` + ``--steps`` optimizer steps and reports samples/s, peak device memory and MFU:
model FLOPs per sample (forward + backward = 3× forward of both towers over the 3 image views and 3
texts; recompute's extra forward is not counted, by the usual MFU convention) × samples/s / the
device's peak (``--peak-tflops``; 989 for H100/H200 dense bf16). Prints a Markdown table and
writes it as JSON (``--out``).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Optional

import numpy as np
import paddle

from ernievil2.data.views import IMAGE_VIEWS, MAX_TAGS
from ernievil2.losses import LossConfig, MultiViewLoss
from ernievil2.models import build_model
from ernievil2.models.config import DualEncoderConfig, model_config
from ernievil2.models.flops import view_flops_per_sample
from ernievil2.train.config import OptimSchema, TrainerSchema
from ernievil2.train.optim import build_optimizer
from ernievil2.train.parallel import is_out_of_memory
from ernievil2.train.trainer import Trainer

TEXT_VIEWS = ("caption_ids", "text_view_ids", "objects_ids")


def make_batch(cfg: DualEncoderConfig, batch: int, text_len: int, rng: np.random.Generator) -> dict:
    size = cfg.vision.image_size
    out = {k: paddle.to_tensor(rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)) for k in IMAGE_VIEWS}
    for k in TEXT_VIEWS:
        ids = rng.integers(5, cfg.text.vocab_size, (batch, text_len))
        ids[:, 0], ids[:, -1] = 1, 2
        out[k] = paddle.to_tensor(ids)
    out["has_objects"] = paddle.ones([batch], dtype="float32")
    tags = np.zeros((batch, MAX_TAGS), np.int64)
    tags[:, 0] = np.arange(1, batch + 1)  # one distinct tag per row (loss.objects_true_texts)
    out["objects_tags"] = out["objects_text_tags"] = paddle.to_tensor(tags)
    return out


def synchronize() -> None:
    if paddle.get_device().startswith("gpu"):
        paddle.device.synchronize()


def peak_memory_gb() -> Optional[float]:
    if not paddle.get_device().startswith("gpu"):
        return None
    return paddle.device.cuda.max_memory_allocated() / 2**30


def measure(args: argparse.Namespace, batch: int) -> dict:
    """Steps per second etc. at one batch size (raises on out-of-memory)."""
    cfg = model_config(args.preset, attention=args.attention)
    paddle.seed(0)
    model = build_model(cfg)
    optimizer, scheduler = build_optimizer(model, OptimSchema(), args.warmup + args.steps)
    settings = TrainerSchema(max_steps=args.warmup + args.steps, amp=args.amp, amp_level=args.amp_level,
                             recompute=args.recompute, save_checkpoint=False)
    trainer = Trainer(model, MultiViewLoss(LossConfig()), optimizer, scheduler, None, [], None, args.out_dir, settings)
    rng = np.random.default_rng(0)
    data = make_batch(cfg, batch, args.text_len, rng)
    if paddle.get_device().startswith("gpu"):
        paddle.device.cuda.reset_max_memory_allocated()
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            synchronize()
            start = time.perf_counter()
        loss = trainer.train_step(data)["loss"]
        trainer._apply_update()
    synchronize()
    seconds = time.perf_counter() - start
    samples_per_s = batch * args.steps / seconds
    loss_cfg = LossConfig()
    views = {v: 1.0 for v in MultiViewLoss(loss_cfg).required_views}
    flops = sum(view_flops_per_sample(cfg, views, text_len=args.text_len).values())  # forward + backward
    mfu = flops * samples_per_s / (args.peak_tflops * 1e12) if args.peak_tflops else None
    return {"batch": batch, "samples_per_s": samples_per_s, "step_s": seconds / args.steps,
            "peak_memory_gb": peak_memory_gb(), "mfu": mfu, "model_tflop_per_sample": flops / 1e12,
            "loss": loss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="base")
    ap.add_argument("--device", default=None, help="gpu / cpu (default: paddle's)")
    ap.add_argument("--amp", default="bf16", choices=["none", "bf16", "fp16"])
    ap.add_argument("--amp-level", default="O2", choices=["O1", "O2"])
    ap.add_argument("--recompute", action="store_true")
    ap.add_argument("--attention", default="auto", help="auto (flash/SDPA on GPU), sdpa, math")
    ap.add_argument("--batches", default="", help="comma-separated per-device batch sizes")
    ap.add_argument("--start", type=int, default=64, help="first batch when doubling until out of memory")
    ap.add_argument("--text-len", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--out", default="outputs/bench/train_step.json")
    ap.add_argument("--out-dir", default="/tmp/bench_train_step")
    args = ap.parse_args()
    if args.device:
        paddle.set_device(args.device)
    sizes = [int(b) for b in args.batches.split(",") if b] or None
    rows = []
    batch = sizes[0] if sizes else args.start
    while True:
        try:
            rows.append(measure(args, batch))
        except Exception as exn:  # noqa: BLE001 - only out-of-memory ends the doubling; others re-raise
            if not is_out_of_memory(exn) or sizes:
                raise
            print(f"batch {batch}: out of memory")
            break
        print(json.dumps(rows[-1]))
        if sizes:
            if len(rows) == len(sizes):
                break
            batch = sizes[len(rows)]
        else:
            batch *= 2
        if paddle.get_device().startswith("gpu"):
            paddle.device.cuda.empty_cache()
    print(f"\n{args.preset}, amp {args.amp} {args.amp_level}, recompute {args.recompute}, attention {args.attention}, "
          f"device {paddle.get_device()}\n")
    print("| batch/device | samples/s | step s | peak memory GB | MFU |\n|---:|---:|---:|---:|---:|")
    for r in rows:
        mem = f"{r['peak_memory_gb']:.1f}" if r["peak_memory_gb"] is not None else "n/a"
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None and paddle.get_device().startswith("gpu") else "n/a"
        print(f"| {r['batch']} | {r['samples_per_s']:.1f} | {r['step_s']:.3f} | {mem} | {mfu} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
