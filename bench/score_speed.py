"""Benchmark: scoring speed of ``launch/filter.py score`` (pairs per second, end to end, one process).

    python bench/score_speed.py                  # tiny on a demo shard (2,000 pairs), base on 256 web-like pairs
    python bench/score_speed.py --quick          # smoke run: 64 tiny pairs, 8 base pairs

Each preset is measured scoring every caption (``--captions all``) and the first caption only
(``--captions first``), side by side.

*tiny*: the demo preset (64 px) on the first training shard of the demo data (2,000 pairs, four
captions each, as the demo's filtering experiment scores them). *base*: the released model's size
(224 px) on generated shards of 512×384 JPEGs with two 20-character Chinese captions each, the
shape of LAION-zh / Wukong pairs. Models are randomly initialised (speed does not depend on the
weights); the score is :func:`ernievil2.filtering.score.score_shards`: read the tar, decode and
crop (2 threads), embed images and every caption, write the sidecar. One warm-up batch first.

Writes ``outputs/bench/score_speed.json`` (``--out``) and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from ernievil2.threads import use_all_cpu_threads

use_all_cpu_threads()  # as launch/filter.py

REPO = Path(__file__).resolve().parents[1]
ZH = "红色的圆形在蓝色的方块左边一只小猫坐在窗台上看着外面的雨"


def web_shards(folder: Path, n: int, seed: int = 0) -> Path:
    """``n`` pairs of 512×384 JPEGs (smooth colour fields plus noise) with two Chinese captions."""
    import cv2

    from ernievil2.data.sample import RawSample
    from ernievil2.data.shard_writer import ShardWriter

    rng = np.random.default_rng(seed)
    with ShardWriter(folder, max_samples=1000) as w:
        for i in range(n):
            small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
            img = cv2.resize(small, (512, 384), interpolation=cv2.INTER_CUBIC).astype(np.int16)
            img = np.clip(img + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
            ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
            caps = ["".join(rng.choice(list(ZH), 20)) for _ in range(2)]
            w.write(RawSample(f"web{i:06d}", buf.tobytes(), caps, lang="zh"), "jpg")
    return folder


def demo_shard(n: int, folder: Path) -> Path:
    """The first ``n`` pairs of the demo's first training shard, as a shard of their own."""
    from ernievil2.data.demo import ensure_demo_data
    from ernievil2.data.shard_reader import iter_samples, list_shards
    from ernievil2.data.shard_writer import ShardWriter
    from ernievil2.train.config import DemoSchema

    spec = DemoSchema()
    data = ensure_demo_data(spec.cache_dir, spec)
    samples = iter_samples(list_shards(data.train_dir)[0])
    with ShardWriter(folder, max_samples=n) as w:
        for _, s in zip(range(n), samples):
            w.write(s, "jpg")
    return folder


def measure(preset: str, shards: Path, work: Path, vocab: Path, batch_size: int, captions: str) -> dict:
    import paddle

    from ernievil2.filtering.score import ScoreOptions, score_shards
    from ernievil2.models import build_model, model_config
    from ernievil2.search import Encoder
    from ernievil2.tokenizer import WordPieceTokenizer

    paddle.set_device("cpu")
    paddle.seed(0)
    tokenizer = WordPieceTokenizer(vocab)
    model = build_model(model_config(preset, text={"vocab_size": tokenizer.vocab_size}))
    encoder = Encoder.from_model(model, tokenizer, text_max_length=64 if preset != "tiny" else 32)
    options = ScoreOptions(batch_size=batch_size, workers=2, progress=False, captions=captions)
    score_shards(shards, work / "warmup", encoder, options)  # warm-up
    start = time.perf_counter()
    report = score_shards(shards, work / "scores", encoder, options)
    seconds = time.perf_counter() - start
    return {"preset": preset, "pairs": report.samples, "seconds": round(seconds, 2),
            "pairs_per_s": round(report.samples / seconds, 1), "batch_size": batch_size, "captions": captions,
            "image_size": int(model.cfg.vision.image_size)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 64 tiny pairs, 8 base pairs")
    ap.add_argument("--out", type=Path, default=REPO / "outputs" / "bench" / "score_speed.json")
    ap.add_argument("--presets", default="tiny,base", help="comma-separated: tiny, base (default %(default)s)")
    ap.add_argument("--vocab", type=Path, default=REPO.parent / "shared" / "assets" / "ernie-3.0-base-zh" / "vocab.txt")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        vocab = args.vocab
        if not vocab.is_file():  # a small vocab of the captions' characters
            from ernievil2.tokenizer import WordPieceTokenizer

            vocab = Path(WordPieceTokenizer.build_vocab([ZH, "large red circle left of a small blue square"] * 3,
                                                        tmp / "vocab.txt", vocab_size=300))
        n_tiny, n_base = (64, 8) if args.quick else (2000, 256)
        shards = {"tiny": lambda: demo_shard(n_tiny, tmp / "tiny"), "base": lambda: web_shards(tmp / "base", n_base)}
        for preset in args.presets.split(","):
            made = shards[preset]()
            for captions in ("all", "first"):
                rows.append(measure(preset, made, tmp / f"{preset}-{captions}", vocab, 64 if preset == "tiny" else 32,
                                    captions))
    result = {"machine": f"{platform.machine()}, {__import__('os').cpu_count()} CPUs", "rows": rows,
              "date": time.strftime("%Y-%m-%d")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print("| model | captions | pairs | seconds | pairs/s |\n|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['preset']} ({r['image_size']} px, batch {r['batch_size']}) | {r['captions']} | {r['pairs']} | "
              f"{r['seconds']} | {r['pairs_per_s']} |")


if __name__ == "__main__":
    main()
