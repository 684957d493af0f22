"""Training data throughput: the full multi-view sample against decoding alone, 1 and 2 loader workers.

One run measures, through the real training loader (``ernievil2.data.loader.build_train_data``),
samples/s of

- ``decode``: the JPEG decode that the views start from (``decode_for_views``), nothing else;
- ``full``: the whole ERNIE-ViL 2.0 sample (decode, caption view, two SimCLR views, caption, text
  view and objects text tokenized, collated),

with 1 and 2 loader workers, over the same shards. Images: the shared real JPEGs
(``../shared/data/*/images``) when present, else synthetic 500x375 JPEGs.

    python bench/data_pipeline.py [--image-size 224] [--epochs 2] [--batch-size 32]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from ernievil2.data.loader import StreamSource, build_train_data
from ernievil2.data.sample import RawSample
from ernievil2.data.shards import ShardWriter
from ernievil2.data.views import MultiViewTransform, ViewConfig, decode_for_views
from ernievil2.tokenizer import WordPieceTokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared"


def load_images(limit: int) -> tuple[list[bytes], str]:
    """Real JPEG bytes from the shared data, else synthetic ones; and a description."""
    files = sorted(SHARED.glob("data/*/images/*.jpg"))[:limit]
    if files:
        return [f.read_bytes() for f in files], f"{len(files)} real JPEGs from {SHARED}/data (flickr8k-cn, coco-mini)"
    rng = np.random.default_rng(0)
    out = []
    for _ in range(min(limit, 400)):
        img = cv2.GaussianBlur(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8), (9, 9), 3)
        out.append(cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes())
    return out, f"{len(out)} synthetic 500x375 JPEGs"


class DecodeOnly:
    """The decode the full sample starts from, and no more (a 1-element array keeps collation trivial)."""

    def __init__(self, cfg: ViewConfig):
        self.cfg = cfg

    def __call__(self, sample: RawSample, epoch: int) -> dict:
        c = self.cfg
        img = decode_for_views(sample.image, sample.key, c.max_image_pixels, c.min_image_side,
                               int(np.ceil(c.reduce_on_decode * c.image_size)))
        return {"h": np.array(img.shape[0], dtype=np.int64)}


def rate(shards: Path, transform, workers: int, batch_size: int, epochs: int) -> float:
    """Samples/s over ``epochs`` epochs, the first batch of each (worker start-up) excluded."""
    data = build_train_data([StreamSource.of("bench", shards)], transform, batch_size=batch_size,
                            num_workers=workers, shuffle_buffer=0, seed=0, world_size=1)
    samples, seconds = 0, 0.0
    for epoch in range(epochs):
        it = data.batches(epoch)
        first = next(it)
        start = time.perf_counter()
        for batch in it:
            samples += len(next(iter(batch.values())))
        seconds += time.perf_counter() - start
        del first
    return samples / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--limit", type=int, default=2000)
    args = parser.parse_args()
    images, what = load_images(args.limit)
    vocab = SHARED / "assets" / "ernie-3.0-base-zh" / "vocab.txt"
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "shards"
        with ShardWriter(shards, max_samples=max(1, len(images) // 4)) as w:
            for i, data in enumerate(images):
                w.write(RawSample(key=f"b{i:06d}", image=data, objects=["dog", "red ball", "grass"],
                                  captions=[f"a dog number {i} plays with a red ball on the grass",
                                            f"一只小狗在草地上玩红色的球 {i}"]))
        if not vocab.exists():
            vocab = WordPieceTokenizer.build_vocab((c for c in ["a dog plays with a red ball on the grass 一只小狗在草地上玩红色的球"]),
                                                   Path(tmp) / "vocab.txt", 200)
        cfg = ViewConfig(image_size=args.image_size)
        full = MultiViewTransform(cfg, WordPieceTokenizer(vocab), max_length=48, seed=0)
        rows = []
        for workers in (1, 2):
            dec = rate(shards, DecodeOnly(cfg), workers, args.batch_size, args.epochs)
            ful = rate(shards, full, workers, args.batch_size, args.epochs)
            rows.append((workers, dec, ful))
    print(f"# {what}; views {args.image_size} px; batch {args.batch_size}; {args.epochs} epochs each")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print("| loader workers | decode-only samples/s (per worker) | full multi-view samples/s (per worker) | full / decode |")
    print("|---|---|---|---|")
    for workers, dec, ful in rows:
        print(f"| {workers} | {dec:.0f} ({dec / workers:.0f}) | {ful:.0f} ({ful / workers:.0f}) | {ful / dec:.2f} |")
    print(f"scaling 1 -> 2 workers: decode x{rows[1][1] / rows[0][1]:.2f}, full x{rows[1][2] / rows[0][2]:.2f}")


if __name__ == "__main__":
    main()
