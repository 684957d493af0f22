"""Training data throughput: the full multi-view sample against decoding alone, 1 and 2 loader workers.

One run measures, through the real training loader (``ernievil2.data.loader.build_train_data``),
samples/s of

- ``decode``: the JPEG decode that the views start from (``decode_for_views``), nothing else;
- ``decode + ship``: the same decode, then filled arrays of the full sample's shapes and dtypes (three
  uint8 ``[S, S, 3]`` images, three int64 ``[48]`` id rows, two photometric draws) sent through the
  loader: the cost of moving a sample from a worker to the trainer, whatever makes the views;
- ``full``: the loader worker's whole share of the ERNIE-ViL 2.0 sample (decode, caption view,
  two SimCLR views, every random draw, caption, text view and objects text tokenized, collated),

with 1 and 2 loader workers, over the same shards; and, in this process without a loader, the
milliseconds per sample of the decode and of each part of the full sample, and of the trainer's
share (``ViewFinisher``: the SimCLR views' colour jitter, grayscale and blur, and the
normalisation, batched; on the GPU in a real run, timed here on this CPU). Image sets:

- ``small``: the shared real JPEGs as they are (``../shared/data/*/images``; Flickr8k-CN
  150x200, COCO-mini up to 640x480), else synthetic 500x375 JPEGs;
- ``large``: the same pictures upscaled to 640x480 (landscape) or 480x640 (portrait) and
  re-encoded at JPEG quality 90, the size of typical LAION / COCO images.

    python bench/data_pipeline.py [--sets small,large] [--image-size 224] [--epochs 2] [--batch-size 32]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import paddle

from ernievil2.data.device_views import ViewFinisher
from ernievil2.data.loader import StreamSource, build_train_data
from ernievil2.data.loader_workers import collate_arrays
from ernievil2.data.sample import RawSample
from ernievil2.data.shard_writer import ShardWriter
from ernievil2.data.views import IMAGE_VIEWS, PHOTOMETRIC_SUFFIX, MultiViewTransform, ViewConfig, decode_for_views
from ernievil2.tokenizer import WordPieceTokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared"
MAX_LENGTH = 48
ID_VIEWS = ("caption_ids", "text_view_ids", "objects_ids")


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


def upscaled(images: list[bytes], long_side: int = 640, short_side: int = 480) -> list[bytes]:
    """The same pictures resized (bicubic) to ``long_side x short_side``, orientation kept, JPEG quality 90."""
    out = []
    for data in images:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        h, w = img.shape[:2]
        size = (long_side, short_side) if w >= h else (short_side, long_side)
        big = cv2.resize(img, size, interpolation=cv2.INTER_CUBIC)
        out.append(cv2.imencode(".jpg", big, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes())
    return out


class DecodeOnly:
    """The decode the full sample starts from, and no more (a 1-element array keeps collation trivial)."""

    def __init__(self, cfg: ViewConfig):
        self.cfg = cfg

    def decode(self, sample: RawSample) -> np.ndarray:
        """The RGB uint8 image the views are made from."""
        c = self.cfg
        return decode_for_views(sample.image, sample.key, c.max_image_pixels, c.min_image_side,
                                int(np.ceil(c.reduce_on_decode * c.image_size)))

    def __call__(self, sample: RawSample, epoch: int) -> dict[str, np.ndarray]:
        return {"h": np.array(self.decode(sample).shape[0], dtype=np.int64)}


class DecodeAndShip(DecodeOnly):
    """The decode, then filled arrays of the full sample's shapes: what the loader's transport costs."""

    def __init__(self, cfg: ViewConfig, full: MultiViewTransform):
        super().__init__(cfg)
        self.layout = full.fixed_outputs()

    def fixed_outputs(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """The full sample's layout: the arrays travel as the full sample's do (shared batch slots)."""
        return self.layout

    def __call__(self, sample: RawSample, epoch: int) -> dict[str, np.ndarray]:
        self.decode(sample)
        # written like the views' outputs (np.zeros' untouched pages would be cheaper to read)
        return {k: np.full(shape, 1, dtype) for k, (shape, dtype) in self.layout.items()}


def rate(shards: Path, transform: Callable[[RawSample, int], dict], workers: int, batch_size: int,
         epochs: int) -> float:
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


def in_process_ms(samples: list[RawSample], cfg: ViewConfig, tok: WordPieceTokenizer) -> dict[str, float]:
    """Milliseconds per sample, in this process: the decode alone and each part of the full sample.

    A part's time is that of a transform making only that part, less the decode where it decodes.
    """
    def per_sample(fn: Callable[[RawSample], object]) -> float:
        for s in samples[:20]:  # warm-up
            fn(s)
        start = time.perf_counter()
        for s in samples:
            fn(s)
        return (time.perf_counter() - start) / len(samples) * 1e3

    decode = per_sample(DecodeOnly(cfg).decode)
    parts = {"decode": decode}
    for name, views in (("caption view", ["image"]), ("SimCLR view 1", ["image_view1"]),
                        ("SimCLR view 2", ["image_view2"])):
        parts[name] = per_sample(MultiViewTransform(cfg, tok, MAX_LENGTH, seed=0, views=views)) - decode
    parts["caption + text view"] = per_sample(MultiViewTransform(cfg, tok, MAX_LENGTH, seed=0, views=list(ID_VIEWS[:2])))
    parts["objects text"] = per_sample(MultiViewTransform(cfg, tok, MAX_LENGTH, seed=0, views=["objects_ids"]))
    full = MultiViewTransform(cfg, tok, MAX_LENGTH, seed=0)
    parts["full sample"] = per_sample(full)
    parts["device share, on this CPU"] = device_share_ms(samples, full)
    return parts


def device_share_ms(samples: list[RawSample], full: MultiViewTransform, batch: int = 32) -> float:
    """Milliseconds per sample of the trainer's share of the image views (``ViewFinisher`` on
    batches of ``batch``), here on this CPU."""
    finish = ViewFinisher()
    batches = [collate_arrays([full(s, 0) for s in samples[i:i + batch]])
               for i in range(0, len(samples) - batch + 1, batch)][:8]
    tensors = [{k: paddle.to_tensor(v) for k, v in b.items()} for b in batches]

    def run(b: dict) -> None:
        for view in IMAGE_VIEWS:
            finish(b[view], b.get(view + PHOTOMETRIC_SUFFIX), view).numpy()

    run(tensors[0])  # warm-up
    start = time.perf_counter()
    for b in tensors:
        run(b)
    return (time.perf_counter() - start) / (len(tensors) * batch) * 1e3


def measure_set(images: list[bytes], tok: WordPieceTokenizer, cfg: ViewConfig, args: argparse.Namespace,
                tmp: Path) -> tuple[list[tuple[int, float, float, float]], dict[str, float]]:
    """Loader rows ``(workers, decode, decode + ship, full)`` in samples/s, and the in-process breakdown."""
    samples = [RawSample(key=f"b{i:06d}", image=data, objects=["dog", "red ball", "grass"],
                         captions=[f"a dog number {i} plays with a red ball on the grass", f"一只小狗在草地上玩红色的球 {i}"])
               for i, data in enumerate(images)]
    shards = tmp / "shards"
    with ShardWriter(shards, max_samples=max(1, len(samples) // 4)) as w:
        for sample in samples:
            w.write(sample)
    full = MultiViewTransform(cfg, tok, max_length=MAX_LENGTH, seed=0)
    rows = []
    for workers in (1, 2):
        dec = rate(shards, DecodeOnly(cfg), workers, args.batch_size, args.epochs)
        ship = rate(shards, DecodeAndShip(cfg, full), workers, args.batch_size, args.epochs)
        ful = rate(shards, full, workers, args.batch_size, args.epochs)
        rows.append((workers, dec, ship, ful))
    return rows, in_process_ms(samples, cfg, tok)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default="small,large", help="comma-separated: small (as stored), large (640x480)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--limit", type=int, default=2000)
    args = parser.parse_args()
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    unknown = set(sets) - {"small", "large"}
    if unknown or not sets:
        parser.error(f"--sets: unknown {sorted(unknown)}; choose from small, large")
    images, what = load_images(args.limit)
    cfg = ViewConfig(image_size=args.image_size)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        vocab = SHARED / "assets" / "ernie-3.0-base-zh" / "vocab.txt"
        if not vocab.exists():
            vocab = WordPieceTokenizer.build_vocab(["a dog plays with a red ball on the grass 一只小狗在草地上玩红色的球"],
                                                   Path(tmp) / "vocab.txt", 200)
        tok = WordPieceTokenizer(vocab)
        for name in sets:
            data = images if name == "small" else upscaled(images)
            (Path(tmp) / name).mkdir()
            results[name] = measure_set(data, tok, cfg, args, Path(tmp) / name)

    print(f"# {what}; views {args.image_size} px; batch {args.batch_size}; {args.epochs} epochs each")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
          f"OpenCV {cv2.__version__}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print("| images | loader workers | decode-only samples/s (per worker) | decode + ship outputs samples/s "
          "(per worker) | full multi-view samples/s (per worker) | full / decode |")
    print("|---|---|---|---|---|---|")
    for name, (rows, _) in results.items():
        for workers, dec, ship, ful in rows:
            print(f"| {name} | {workers} | {dec:.0f} ({dec / workers:.0f}) | {ship:.0f} ({ship / workers:.0f}) | "
                  f"{ful:.0f} ({ful / workers:.0f}) | {ful / dec:.2f} |")
    for name, (rows, _) in results.items():
        print(f"{name}: scaling 1 -> 2 workers: decode x{rows[1][1] / rows[0][1]:.2f}, "
              f"decode + ship x{rows[1][2] / rows[0][2]:.2f}, full x{rows[1][3] / rows[0][3]:.2f}")
    print()
    print("In this process, no loader (ms per sample):")
    names = list(results)
    print("| part | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for part in results[names[0]][1]:
        print(f"| {part} | " + " | ".join(f"{results[n][1][part]:.2f}" for n in names) + " |")


if __name__ == "__main__":
    main()
