"""Benchmark: photo search (``ernievil2.search``) on CPU — index build speed and query latency.

    python bench/search.py                 # tiny + base presets over 64 images; 10k and 1M × 768 vectors
    python bench/search.py --quick         # smoke run: tiny preset, 8 images, 2k and 5k vectors

*Index build*: ``build_index`` over N generated JPEGs (640×480, smooth colour fields plus noise)
with a randomly initialised model of each preset (speed does not depend on the weights), batch
size 32, 2 decoding threads; images/s is end to end (read, decode, preprocess, embed, save),
after one warm-up forward pass.

*Query latency*: one query, top 10, over N random L2-normalised float32 vectors (dim 768, the
base model's width): exact NumPy (``top_k``: chunked matrix product + ``argpartition``) and,
when ``faiss-cpu`` is installed, ``faiss.IndexFlatIP`` (its one-off ``add`` time reported as
build). Both must return the same rows. Medians over ``--repeats`` queries.

Writes ``outputs/bench/search.json`` (``search_quick.json`` with ``--quick``; ``--out`` to
choose) and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from ernievil2.threads import use_all_cpu_threads

use_all_cpu_threads()  # as launch/search.py

REPO = Path(__file__).resolve().parents[1]


def make_images(folder: Path, n: int, h: int = 480, w: int = 640, seed: int = 0) -> None:
    """``n`` JPEGs of smooth random colour fields plus noise (realistic JPEG sizes)."""
    import cv2

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        img = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC).astype(np.int16)
        img = np.clip(img + rng.integers(-12, 13, (h, w, 3)), 0, 255).astype(np.uint8)
        sub = folder / f"{i // 100:03d}"  # 100 images per sub-folder
        sub.mkdir(exist_ok=True)
        cv2.imwrite(str(sub / f"img{i:05d}.jpg"), img)


def bench_index(preset: str, images: Path, n: int, workdir: Path) -> dict:
    """Index ``images`` with a random ``preset`` model; images/s end to end."""
    import paddle

    from ernievil2.models import build_model, model_config
    from ernievil2.search import Encoder, build_index
    from ernievil2.tokenizer import WordPieceTokenizer

    paddle.set_device("cpu")
    vocab = WordPieceTokenizer.build_vocab(["a red circle", "两只猫在沙发上睡觉"], workdir / "vocab.txt", vocab_size=100)
    tokenizer = WordPieceTokenizer(vocab)
    paddle.seed(0)
    model = build_model(model_config(preset, text={"vocab_size": tokenizer.vocab_size}))
    encoder = Encoder.from_model(model, tokenizer, checkpoint=f"<random {preset}>")
    s = encoder.image_size
    encoder.encode_pixels(np.zeros((2, 3, s, s), dtype=np.float32))  # warm-up
    report = build_index(images, workdir / f"index-{preset}", encoder, batch_size=32, num_workers=2, progress=False)
    assert report.added == n, report.summary()
    return {"preset": preset, "images": n, "image_size": s, "dim": encoder.identity.dim,
            "seconds": report.seconds, "images_per_s": n / report.seconds}


def random_unit(n: int, dim: int, seed: int = 0, chunk: int = 100_000) -> np.ndarray:
    """``[n, dim]`` float32 rows, each L2-normalised (generated in chunks: no float64 copy)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for a in range(0, n, chunk):
        block = rng.standard_normal((min(chunk, n - a), dim), dtype=np.float32)
        out[a : a + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def _median_ms(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times), result


def bench_query(n: int, dim: int, repeats: int, k: int = 10) -> list[dict]:
    """Single-query top-``k`` latency, exact NumPy and (if installed) faiss; same rows asserted."""
    from ernievil2.search import faiss_top_k, top_k

    vectors = random_unit(n, dim, seed=n)
    query = random_unit(1, dim, seed=n + 1)
    ms, (_, exact) = _median_ms(lambda: top_k(vectors, query, k), repeats)
    rows = [{"n": n, "dim": dim, "k": k, "backend": "numpy", "build_s": 0.0, "median_ms": ms}]
    try:
        import faiss
    except ImportError:
        return rows
    t = time.perf_counter()
    index = faiss.IndexFlatIP(dim)
    index.add(vectors)
    build = time.perf_counter() - t
    ms, (_, got) = _median_ms(lambda: faiss_top_k(vectors, query, k, index), repeats)
    assert np.array_equal(got, exact), f"faiss {got} != exact {exact}"
    rows.append({"n": n, "dim": dim, "k": k, "backend": "faiss", "build_s": build, "median_ms": ms})
    return rows


def markdown(result: dict) -> str:
    lines = ["| preset | images | image size | dim | seconds | images/s |", "|---|---:|---:|---:|---:|---:|"]
    for r in result["index_build"]:
        lines.append(f"| {r['preset']} | {r['images']} | {r['image_size']} | {r['dim']} | {r['seconds']:.2f} | "
                     f"{r['images_per_s']:.1f} |")
    lines += ["", "| vectors | dim | backend | build s | query ms (median, top 10) |", "|---:|---:|---|---:|---:|"]
    for r in result["query"]:
        lines.append(f"| {r['n']:,} | {r['dim']} | {r['backend']} | {r['build_s']:.2f} | {r['median_ms']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: tiny preset, 8 images, 2k/5k vectors")
    p.add_argument("--images", type=int, help="generated images per preset (default 64; 8 with --quick)")
    p.add_argument("--presets", help="comma-separated model presets (default tiny,base; tiny with --quick)")
    p.add_argument("--sizes", help="comma-separated vector counts (default 10000,1000000; 2000,5000 with --quick)")
    p.add_argument("--dim", type=int, default=768, help="query vectors' width (default %(default)s, base)")
    p.add_argument("--repeats", type=int, help="queries per measurement (default 20; 3 with --quick)")
    p.add_argument("--out", type=Path, help="JSON output (default outputs/bench/search[_quick].json)")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", message="No ccache found")
    import paddle  # noqa: F401  (it installs an INFO root log handler: quietened here)

    logging.getLogger().setLevel(logging.WARNING)
    n_images = args.images or (8 if args.quick else 64)
    presets = (args.presets or ("tiny" if args.quick else "tiny,base")).split(",")
    sizes = [int(s) for s in (args.sizes or ("2000,5000" if args.quick else "10000,1000000")).split(",")]
    repeats = args.repeats or (3 if args.quick else 20)
    out = args.out or REPO / "outputs" / "bench" / ("search_quick.json" if args.quick else "search.json")

    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "host": platform.node(), "cpu_count": os.cpu_count(),
              "machine": platform.machine(), "quick": args.quick, "index_build": [], "query": []}
    with tempfile.TemporaryDirectory() as tmp:
        images = Path(tmp) / "images"
        make_images(images, n_images)
        for preset in presets:
            result["index_build"].append(bench_index(preset, images, n_images, Path(tmp)))
            print(f"index {preset}: {result['index_build'][-1]['images_per_s']:.1f} images/s", file=sys.stderr)
    for n in sizes:
        result["query"] += bench_query(n, args.dim, repeats)
        print(f"query {n:,}: done", file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(markdown(result))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
