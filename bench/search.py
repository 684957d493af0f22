"""Benchmark: photo search (``ernievil2.search``) on CPU — index build speed and query latency.

    python bench/search.py                 # tiny + base presets over 64 images; 10k, 100k and 1M × 768 vectors
    python bench/search.py --quick         # smoke run: tiny preset, 8 images, 2k and 5k vectors
    python bench/search.py --presets '' --sizes 100000 --compare hnsw,sq8   # vectors only; other faiss indexes too

*Index build*: ``build_index`` over N generated JPEGs (640×480, smooth colour fields plus noise)
with a randomly initialised model of each preset (speed does not depend on the weights), batch
size 32, 2 decoding threads; images/s is end to end (read, decode, preprocess, embed, save),
after one warm-up forward pass.

*Query latency*: one query, top 10, over N L2-normalised float32 vectors (dim 768, the base
model's width): exact NumPy (``top_k``: chunked matrix product + ``argpartition``) and, when
``faiss-cpu`` is installed, ``faiss.IndexFlatIP`` (its one-off ``add`` time reported as build;
it must return the rows of the exact search) and the approximate IVF-Flat index of
:mod:`ernievil2.search.ann` (build: ``build_ivf`` as ``launch/search.py index`` runs it, k-means,
filling, the recall@10 measurement on 500 held-out perturbed rows and the choice of ``nprobe``).
Medians over ``--repeats`` queries; the IVF index's recall@10 against exact is also measured on
200 held-out queries (``recall@10 (queries)``).

*The vectors* are embedding-like, not isotropic (where IVF would be meaningless):
:func:`clustered_unit`, a mixture of 2,000 Gaussian clusters of log-normal sizes (σ = 1) in a
random 64-dimensional subspace of the 768: a point is ``c + 0.8 g`` (``c`` its cluster's centre,
``c, g ~ N(0, I_64)``) scaled by 1/8 and mapped into the 768 by a random orthonormal basis, plus
isotropic noise ``N(0, 0.5² / 768 · I_768)`` and a shared offset of norm 0.6 (embeddings share a
mean direction), then L2-normalised. Queries are further points drawn the same way (held out: not
in the collection). The JSON records the mean cosine of random pairs and of each query's 1st and
10th nearest vector.

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


def clustered_unit(n: int, queries: int, dim: int, seed: int = 0, clusters: int = 2000, latent: int = 64,
                   spread: float = 0.8, noise: float = 0.5, offset: float = 0.6,
                   chunk: int = 100_000) -> tuple[np.ndarray, np.ndarray]:
    """``(collection [n, dim], queries [queries, dim])``, float32, L2-normalised, embedding-like
    (module docstring: a mixture of ``clusters`` Gaussians in a random ``latent``-dim subspace, plus
    isotropic noise and a shared offset); the queries are further draws, not in the collection.
    Generated in chunks into one array: no float64 copy."""
    rng = np.random.default_rng(seed)
    mean = rng.standard_normal(dim).astype(np.float32)
    mean *= np.float32(offset) / np.linalg.norm(mean)
    basis = np.linalg.qr(rng.standard_normal((dim, latent)))[0].T.astype(np.float32) / np.float32(np.sqrt(latent))
    centres = rng.standard_normal((clusters, latent)).astype(np.float32)
    weights = rng.lognormal(0.0, 1.0, clusters)
    weights /= weights.sum()

    def draw(m: int) -> np.ndarray:
        out = np.empty((m, dim), dtype=np.float32)
        for a in range(0, m, chunk):
            b = min(chunk, m - a)
            z = centres[rng.choice(clusters, b, p=weights)] + np.float32(spread) * rng.standard_normal((b, latent), dtype=np.float32)
            x = z @ basis + np.float32(noise / np.sqrt(dim)) * rng.standard_normal((b, dim), dtype=np.float32) + mean
            out[a : a + b] = x / np.linalg.norm(x, axis=1, keepdims=True)
        return out

    return draw(n), draw(queries)


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``, as ``lscpu`` shows it), or ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def faiss_version() -> str | None:
    try:
        import faiss
    except ImportError:
        return None
    return str(faiss.__version__)


def _median_ms(fn, repeats: int) -> tuple[float, list]:
    """Median wall time of ``fn(i)`` for ``i < repeats``, and the results."""
    times, results = [], []
    for i in range(repeats):
        t = time.perf_counter()
        results.append(fn(i))
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times), results


def _recall(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of each exact top-k among the rows found."""
    return float(np.mean([len(set(f.tolist()) & set(e.tolist())) / len(e) for f, e in zip(found, exact)]))


def bench_other(kind: str, vectors: np.ndarray, queries: np.ndarray, exact: np.ndarray, repeats: int, k: int,
                data: dict) -> dict:
    """A faiss index the search does not use, for comparison (``--compare``): ``"hnsw"``
    (``IndexHNSWFlat``, M 32, efConstruction 40) or ``"sq8"`` (``IndexIVFScalarQuantizer``, 8-bit
    codes, the IVF-Flat's nlist, k-means on 64 × nlist vectors); its search knob (efSearch 16…256,
    nprobe 1…256) the smallest power of two whose recall@10 on the held-out queries reaches 0.95."""
    import faiss

    from ernievil2.search import choose_nlist

    dim, t = vectors.shape[1], time.perf_counter()
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 40
        knobs, name = [16, 32, 64, 128, 256], "ef_search"
    elif kind == "sq8":
        nlist = choose_nlist(len(vectors))
        index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(dim), dim, nlist, faiss.ScalarQuantizer.QT_8bit,
                                              faiss.METRIC_INNER_PRODUCT)
        rows = np.random.default_rng(0).choice(len(vectors), min(len(vectors), 64 * nlist), replace=False)
        index.train(vectors[np.sort(rows)])
        knobs, name = [v for v in (1, 2, 4, 8, 16, 32, 64, 128, 256) if v <= nlist], "nprobe"
    else:
        raise SystemExit(f"--compare: unknown index {kind!r} (hnsw, sq8)")
    index.add(vectors)
    build = time.perf_counter() - t
    for knob in knobs:
        if kind == "hnsw":
            index.hnsw.efSearch = knob
        else:
            index.nprobe = knob
        recall = _recall(index.search(queries, k)[1], exact)
        if recall >= 0.95:
            break
    ms, _ = _median_ms(lambda i: index.search(queries[i : i + 1], k), repeats)
    extra = {"nlist": nlist} if kind == "sq8" else {}
    return {**data, "backend": kind, "build_s": build, "median_ms": ms, "recall_at_10": recall, name: knob, **extra}


def bench_query(n: int, dim: int, repeats: int, k: int = 10, recall_queries: int = 200,
                compare: tuple[str, ...] = ()) -> list[dict]:
    """Single-query top-``k`` latency over ``n`` clustered vectors (median over ``repeats``
    held-out queries): exact NumPy, and (if installed) faiss's flat index (same rows asserted) and
    the IVF index (:func:`build_ivf`: the index's own build, recall measurement and ``nprobe``
    choice), whose recall@10 against exact is also measured on ``recall_queries`` held-out queries."""
    from ernievil2.search import build_ivf, faiss_top_k, ivf_top_k, top_k

    vectors, queries = clustered_unit(n, max(repeats, recall_queries), dim, seed=n)
    _, exact = top_k(vectors, queries, k)
    scores = np.einsum("mkd,md->mk", vectors[exact], queries)
    pairs = vectors[: min(n, 1000)] @ vectors[-min(n, 1000):].T
    data = {"n": n, "dim": dim, "k": k, "queries": len(queries), "random_pair_cos": round(float(pairs.mean()), 3),
            "top1_cos": round(float(scores[:, 0].mean()), 3), "top10_cos": round(float(scores[:, k - 1].mean()), 3)}
    ms, got = _median_ms(lambda i: top_k(vectors, queries[i : i + 1], k)[1][0], repeats)
    assert np.array_equal(np.array(got), exact[:repeats])
    rows = [{**data, "backend": "numpy", "build_s": 0.0, "median_ms": ms, "recall_at_10": 1.0}]
    try:
        import faiss
    except ImportError:
        return rows
    t = time.perf_counter()
    flat = faiss.IndexFlatIP(dim)
    flat.add(vectors)
    build = time.perf_counter() - t
    ms, got = _median_ms(lambda i: faiss_top_k(vectors, queries[i : i + 1], k, flat)[1][0], repeats)
    assert np.array_equal(np.array(got), exact[:repeats]), "faiss's flat index and the exact search disagree"
    rows.append({**data, "backend": "faiss", "build_s": build, "median_ms": ms, "recall_at_10": 1.0})
    flat.reset()  # one faiss copy of the vectors at a time
    t = time.perf_counter()
    ivf, info = build_ivf(vectors)
    build = time.perf_counter() - t
    ms, _ = _median_ms(lambda i: ivf_top_k(ivf, queries[i : i + 1], k, info.nprobe), repeats)
    recall = _recall(ivf_top_k(ivf, queries, k, info.nprobe)[1], exact)
    rows.append({**data, "backend": "ivf", "build_s": build, "median_ms": ms, "recall_at_10": recall,
                 "nlist": info.nlist, "nprobe": info.nprobe, "build_recall_at_10": info.recall_at_10,
                 "measure_s": info.measure_seconds})
    ivf.reset()
    for kind in compare:
        rows.append(bench_other(kind, vectors, queries, exact, repeats, k, data))
    return rows


def markdown(result: dict) -> str:
    lines = ["| preset | images | image size | dim | seconds | images/s |", "|---|---:|---:|---:|---:|---:|"]
    for r in result["index_build"]:
        lines.append(f"| {r['preset']} | {r['images']} | {r['image_size']} | {r['dim']} | {r['seconds']:.2f} | "
                     f"{r['images_per_s']:.1f} |")
    lines += ["", "| vectors | dim | backend | build s | nprobe / nlist, efSearch | recall@10 (build sample) | "
              "recall@10 (queries) | query ms (median, top 10) |", "|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in result["query"]:
        exact = r["backend"] in ("numpy", "faiss")
        probe = (f"{r['nprobe']} / {r['nlist']}" if "nprobe" in r else f"efSearch {r['ef_search']}"
                 if "ef_search" in r else "exact")
        build_recall = f"{r['build_recall_at_10']:.3f}" if "build_recall_at_10" in r else "1" if exact else "-"
        lines.append(f"| {r['n']:,} | {r['dim']} | {r['backend']} | {r['build_s']:.2f} | {probe} | {build_recall} | "
                     f"{r['recall_at_10']:.3f} | {r['median_ms']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: tiny preset, 8 images, 2k/5k vectors")
    p.add_argument("--images", type=int, help="generated images per preset (default 64; 8 with --quick)")
    p.add_argument("--presets", help="comma-separated model presets (default tiny,base; tiny with --quick; "
                                     "'' for none)")
    p.add_argument("--sizes", help="comma-separated vector counts (default 10000,100000,1000000; 2000,5000 "
                                   "with --quick)")
    p.add_argument("--dim", type=int, default=768, help="query vectors' width (default %(default)s, base)")
    p.add_argument("--repeats", type=int, help="queries per latency (default 50; 3 with --quick)")
    p.add_argument("--compare", default="", help="also these faiss indexes, not used by the search: hnsw, sq8 "
                                                 "(comma-separated; default none)")
    p.add_argument("--out", type=Path, help="JSON output (default outputs/bench/search[_quick].json)")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", message="No ccache found")
    import paddle  # noqa: F401  (it installs an INFO root log handler: quietened here)

    logging.getLogger().setLevel(logging.WARNING)
    n_images = args.images or (8 if args.quick else 64)
    named = args.presets if args.presets is not None else "tiny" if args.quick else "tiny,base"
    presets = [p for p in named.split(",") if p]
    sizes = [int(s) for s in (args.sizes or ("2000,5000" if args.quick else "10000,100000,1000000")).split(",")]
    repeats = args.repeats or (3 if args.quick else 50)
    out = args.out or REPO / "outputs" / "bench" / ("search_quick.json" if args.quick else "search.json")

    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "host": platform.node(), "cpu_count": os.cpu_count(),
              "cpu_model": cpu_model(), "machine": platform.machine(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
              "faiss": faiss_version(), "quick": args.quick, "index_build": [], "query": []}
    with tempfile.TemporaryDirectory() as tmp:
        images = Path(tmp) / "images"
        make_images(images, n_images if presets else 0)
        for preset in presets:
            result["index_build"].append(bench_index(preset, images, n_images, Path(tmp)))
            print(f"index {preset}: {result['index_build'][-1]['images_per_s']:.1f} images/s", file=sys.stderr)
    for n in sizes:
        result["query"] += bench_query(n, args.dim, repeats, compare=tuple(c for c in args.compare.split(",") if c))
        print(f"query {n:,}: done", file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(markdown(result))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
