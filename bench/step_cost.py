"""Where a training step's time goes, per tower and view, and what each loss recipe costs.

    python bench/step_cost.py                      # tiny on this CPU (timed) + base (FLOP counts)
    python bench/step_cost.py --repeats 30 --out outputs/bench/step_cost.json

Part 1 times, on the current device with the ``tiny`` model and a synthetic batch (``--batch``
rows, texts of ``--text-len`` tokens, object-tags texts of ``--objects-len``), forward + backward
of each piece alone: the image tower at its native size, at the low resolution of the auxiliary
views and with patch dropout; the text tower; the four loss terms; the AdamW update. Then whole optimizer steps (the trainer's
``train_step`` + update) of each recipe of ``conf/loss/`` (median of ``--repeats``), all in one
process, alternating recipes, so the ratios are side by side.

Part 2 counts forward + backward FLOPs per sample of each recipe's views for ``tiny`` and ``base``
(:mod:`ernievil2.models.flops`), the cost a GPU step follows when it is compute-bound.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import paddle
from hydra import compose, initialize_config_dir

from ernievil2.data.views import MAX_TAGS
from ernievil2.losses import MultiViewLoss
from ernievil2.models import build_model
from ernievil2.models.config import model_config
from ernievil2.models.flops import view_flops_per_sample
from ernievil2.train.config import OptimSchema, TrainerSchema, register_schemas, validate
from ernievil2.train.optim import build_optimizer
from ernievil2.train.trainer import Trainer

CONF = Path(__file__).resolve().parents[1] / "conf"
RECIPES = ("clip_only", "multiview", "multiview_paper")


def recipe(name: str):
    """The loss config and SimCLR view side (fraction of the image side) a ``loss=NAME`` run uses."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = validate(compose(config_name="config", overrides=[f"loss={name}"]))
    return cfg.loss, cfg.data.views.aux_image_scale


def timed(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def synthetic_batch(b: int, size: int, aux: int, text_len: int, objects_len: int, vocab: int,
                    rng: np.random.Generator) -> dict:
    out = {"image": rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8)}
    for v in ("image_view1", "image_view2"):
        out[v] = rng.integers(0, 256, (b, aux, aux, 3), dtype=np.uint8)
        params = np.zeros((b, 12), np.float32)
        params[:, 0], params[:, 1:5], params[:, 5:8], params[:, 11] = 1.0, [0, 1, 2, 3], 1.1, 3
        out[v + "_photometric"] = params
    for k in ("caption_ids", "text_view_ids", "objects_ids"):
        ids = rng.integers(5, vocab, (b, objects_len if k == "objects_ids" else text_len))
        ids[:, 0], ids[:, -1] = 1, 2
        out[k] = ids
    out["has_objects"] = np.ones(b, np.float32)
    # one distinct tag per row (what loss.objects_true_texts reads; every text true of its own image only)
    out["objects_tags"] = np.zeros((b, MAX_TAGS), np.int64)
    out["objects_tags"][:, 0] = np.arange(1, b + 1)
    out["objects_text_tags"] = out["objects_tags"].copy()
    return out


def part_timings(args: argparse.Namespace) -> list[tuple[str, float]]:
    cfg = model_config("tiny")
    paddle.seed(0)
    model = build_model(cfg)
    model.train()
    rng = np.random.default_rng(0)
    b, s = args.batch, cfg.vision.image_size
    px = {n: paddle.to_tensor(rng.standard_normal((b, 3, n, n)).astype("float32")) for n in (s, s // 2)}
    ids = paddle.to_tensor(rng.integers(5, cfg.text.vocab_size, (b, args.text_len)))

    def fwd_bwd(f):
        def run():
            f().sum().backward()
            model.clear_gradients()
        return run

    opt, _ = build_optimizer(model, OptimSchema(), 10)
    model.encode_image(px[s]).sum().backward()
    model.encode_text(ids).sum().backward()
    rows = [
        (f"image tower, {s} px ({cfg.vision.num_patches + 1} tokens)", timed(fwd_bwd(lambda: model.encode_image(px[s])), args.repeats)),
        (f"image tower, {s // 2} px ({(s // 2 // cfg.vision.patch_size) ** 2 + 1} tokens)",
         timed(fwd_bwd(lambda: model.encode_image(px[s // 2])), args.repeats)),
        (f"image tower, {s} px, patch dropout 0.5", timed(fwd_bwd(lambda: model.encode_image(px[s], patch_dropout=0.5)), args.repeats)),
        (f"text tower, {args.text_len} tokens", timed(fwd_bwd(lambda: model.encode_text(ids)), args.repeats)),
        ("AdamW update (all parameters)", timed(lambda: opt.step(), args.repeats)),
    ]
    return rows


def recipe_steps(args: argparse.Namespace) -> dict[str, float]:
    """Median seconds of a whole optimizer step per recipe, recipes interleaved."""
    cfg = model_config("tiny")
    trainers, batches = {}, {}
    for name in RECIPES:
        loss_cfg, aux = recipe(name)
        paddle.seed(0)
        model = build_model(cfg)
        opt, sched = build_optimizer(model, OptimSchema(), 10**6)
        trainers[name] = Trainer(model, MultiViewLoss(loss_cfg), opt, sched, None, [], None, "/tmp/bench_step_cost",
                                 TrainerSchema(save_checkpoint=False))
        batches[name] = synthetic_batch(args.batch, cfg.vision.image_size, round(aux * cfg.vision.image_size), args.text_len,
                                        args.objects_len, cfg.text.vocab_size, np.random.default_rng(0))
    times: dict[str, list[float]] = {n: [] for n in RECIPES}
    for i in range(args.repeats + 1):
        for name in RECIPES:
            t0 = time.perf_counter()
            trainers[name].train_step(batches[name])
            trainers[name]._apply_update()
            if i:
                times[name].append(time.perf_counter() - t0)
    return {n: statistics.median(t) for n, t in times.items()}


def recipe_flops(preset: str, text_len: int, objects_len: int) -> dict[str, dict[str, float]]:
    cfg = model_config(preset)
    out = {}
    for name in RECIPES:
        loss_cfg, aux = recipe(name)
        loss = MultiViewLoss(loss_cfg)
        shares = {v: loss.rows(v, 10_000) / 10_000 for v in loss.required_views}
        out[name] = view_flops_per_sample(cfg, shares, text_len=text_len, aux_image_size=round(aux * cfg.vision.image_size),
                                          patch_dropout=loss_cfg.patch_dropout, objects_len=objects_len)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--text-len", type=int, default=32, help="tokens per text (the demo's captions reach 32)")
    ap.add_argument("--objects-len", type=int, default=23, help="tokens per object-tags text (the demo's reach 23)")
    ap.add_argument("--base-text-len", type=int, default=64)
    ap.add_argument("--base-objects-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default="outputs/bench/step_cost.json")
    args = ap.parse_args()
    register_schemas()
    parts = part_timings(args)
    steps = recipe_steps(args)
    flops = {"tiny": recipe_flops("tiny", args.text_len, args.objects_len),
             "base": recipe_flops("base", args.base_text_len, args.base_objects_len)}
    print(f"\ntiny on {paddle.get_device()}, batch {args.batch}, forward + backward, median of {args.repeats}\n")
    print("| piece | ms per batch |\n|---|---:|")
    for name, sec in parts:
        print(f"| {name} | {1e3 * sec:.1f} |")
    print("\n| recipe | step ms | vs clip_only | tiny GFLOP/sample (ratio) | base GFLOP/sample (ratio) |")
    print("|---|---:|---:|---:|---:|")
    for name in RECIPES:
        cells = []
        for preset in ("tiny", "base"):
            total, ref = sum(flops[preset][name].values()), sum(flops[preset]["clip_only"].values())
            cells.append(f"{total / 1e9:.4g} ({total / ref:.2f}×)")
        print(f"| {name} | {1e3 * steps[name]:.1f} | {steps[name] / steps['clip_only']:.2f}× | {cells[0]} | {cells[1]} |")
    print("\nbase, GFLOP per sample by view (forward + backward):")
    for name in RECIPES:
        print(f"  {name}: " + ", ".join(f"{v} {f / 1e9:.1f}" for v, f in flops["base"][name].items()))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "parts_s": dict(parts), "step_s": steps, "flops": flops}, indent=1))


if __name__ == "__main__":
    main()
