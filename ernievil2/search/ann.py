"""Approximate search for large collections: an IVF-Flat faiss index (inner product).

**What.** ``faiss.IndexIVFFlat`` with ``METRIC_INNER_PRODUCT``: spherical k-means splits the
collection into ``nlist`` cells (:func:`choose_nlist`: about ``√N``, a power of two); a query
scans the ``nprobe`` cells whose centroids score highest, with exact inner products inside them.
The index holds a second copy of the vectors (``ann.faiss`` in the index folder, as large as
``vectors.npy``). It needs the optional ``faiss-cpu`` package (``pip install -e ".[search]"``).

**When.** ``mode="auto"`` (``launch/search.py index --ann auto``, the default) builds it for
collections of at least ``min_size`` vectors (:data:`DEFAULT_MIN_ANN_SIZE`: where an exact NumPy
query of 768-wide vectors passes about 10 ms on 2 cores, docs/BENCHMARKS.md) and keeps the exact
search below that, or without faiss (with a note); ``"ivf"`` builds it at any size (an error
without faiss); ``"off"`` never.

**Recall, measured at build time.** :func:`build_ivf` draws a seeded sample of the collection's own
rows (``sample_queries``, default 500), adds to each a Gaussian noise vector of the row's own norm
(cosine ≈ 0.71 to its row: a query off the photos, as a text query is) and L2-normalises it; the
row it came from is *held out*: dropped from both result lists (exact and approximate, top 11),
which keep their first 10. recall@10 is the mean share of the exact top 10 that the approximate top
10 returns. ``nprobe`` is the smallest (binary search; recall only grows with ``nprobe``) reaching
``target_recall`` (0.95), at most :data:`MAX_NPROBE`; :class:`AnnInfo` records it, the recall and
the sample, in ``index.json``.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np

from ernievil2.search import topk
from ernievil2.search.identity import SearchError

__all__ = [
    "ANN_FILE", "ANN_MODES", "DEFAULT_MIN_ANN_SIZE", "TARGET_RECALL", "MAX_NPROBE", "AnnInfo", "ann_decision",
    "choose_nlist", "build_ivf", "ivf_top_k", "read_ivf", "write_ivf",
]

ANN_FILE = "ann.faiss"
ANN_MODES: tuple[str, ...] = ("auto", "off", "ivf")
DEFAULT_MIN_ANN_SIZE = 100_000
TARGET_RECALL = 0.95
RECALL_K = 10
MAX_NPROBE = 256
TRAIN_POINTS_PER_LIST = 64  # k-means sample: 64 rows per cell (faiss asks for at least 39)
NOISE = 1.0  # the sample queries' noise, relative to their row's norm


@dataclass(frozen=True)
class AnnInfo:
    """The approximate index of an index folder, as ``index.json`` records it (``"ann"``)."""

    kind: str  # "ivf-flat"
    count: int  # rows it holds: the first ``count`` rows of vectors.npy
    nlist: int
    nprobe: int
    recall_at_10: float  # against exact search, on the sample below, at ``nprobe``
    target_recall: float
    sample_queries: int
    sample: str
    train_rows: int
    build_seconds: float  # all of it: k-means, filling, the recall measurement
    measure_seconds: float = 0.0  # the recall measurement and the choice of nprobe
    faiss_version: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "AnnInfo":
        fields = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in fields})

    def summary(self) -> str:
        """One line: what it is, its recall and how long it took."""
        reached = "" if self.recall_at_10 >= self.target_recall else f" (below the target {self.target_recall:.2f})"
        return (f"approximate search: IVF-Flat (nlist {self.nlist}, nprobe {self.nprobe}): recall@10 "
                f"{self.recall_at_10:.3f} against exact{reached} on {self.sample_queries} held-out perturbed rows, "
                f"built in {self.build_seconds:.1f} s ({self.measure_seconds:.1f} s measuring)")


def ann_decision(mode: str, n: int, min_size: int) -> tuple[bool, str]:
    """``(build an approximate index?, why not)`` for ``n`` vectors: ``mode`` ``"ivf"`` always
    (:class:`SearchError` without faiss), ``"off"`` never, ``"auto"`` from ``min_size`` vectors
    when faiss imports (else a one-line note)."""
    if mode not in ANN_MODES:
        raise SearchError(f"unknown --ann mode {mode!r}; choose one of {list(ANN_MODES)}")
    if mode == "off":
        return False, "exact search (--ann off)"
    if n == 0:
        return False, "exact search (empty index)"
    if mode == "ivf":
        topk._import_faiss()
        return True, ""
    if n < min_size:
        return False, f"exact search ({n:,} vectors < --min-ann-size {min_size:,})"
    try:
        topk._import_faiss()
    except SearchError:
        return False, f"exact search: no approximate index without faiss; {topk.FAISS_HINT}"
    return True, ""


def choose_nlist(n: int) -> int:
    """The number of cells for ``n`` vectors: the power of two nearest ``√n``, with at least 39
    rows per cell (faiss's k-means minimum), at least 1."""
    nlist = 2 ** int(round(np.log2(max(np.sqrt(n), 1.0))))
    return int(max(1, min(nlist, n // 39)))


def _held_out_queries(vectors: np.ndarray, m: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, queries)``: ``m`` seeded rows of ``vectors`` and their perturbed, normalised copies."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(vectors), size=min(m, len(vectors)), replace=False))
    base = vectors[rows]
    noise = rng.standard_normal(base.shape, dtype=np.float32)
    noise *= NOISE * np.linalg.norm(base, axis=1, keepdims=True) / np.linalg.norm(noise, axis=1, keepdims=True)
    queries = base + noise
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return rows, queries.astype(np.float32, copy=False)


def _drop_rows(found: np.ndarray, rows: np.ndarray, k: int) -> list[set[int]]:
    """Per query, its first ``k`` results other than its own row (and faiss's -1 fillers)."""
    out = []
    for got, own in zip(found, rows):
        keep = [int(r) for r in got if r != own and r >= 0]
        out.append(set(keep[:k]))
    return out


def _recall(found: list[set[int]], truth: list[set[int]]) -> float:
    return float(np.mean([len(f & t) / max(len(t), 1) for f, t in zip(found, truth)]))


def _choose_nprobe(index: Any, queries: np.ndarray, rows: np.ndarray, truth: list[set[int]], target: float,
                   k: int, max_nprobe: int) -> tuple[int, float]:
    """The smallest ``nprobe`` ≤ ``max_nprobe`` whose recall@k reaches ``target`` (``max_nprobe``
    when none does) and its recall: doubling, then a binary search."""
    cache: dict[int, float] = {}

    def recall(nprobe: int) -> float:
        if nprobe not in cache:
            index.nprobe = nprobe
            _, found = index.search(queries, k + 1)
            cache[nprobe] = _recall(_drop_rows(found, rows, k), truth)
        return cache[nprobe]

    lo, hi = 0, 1  # recall(lo) < target (lo = 0: none probed), recall(hi) is the candidate
    while hi < max_nprobe and recall(hi) < target:
        lo, hi = hi, min(2 * hi, max_nprobe)
    if recall(hi) < target:
        return hi, recall(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if recall(mid) >= target else (mid, hi)
    return hi, recall(hi)


def build_ivf(vectors: np.ndarray, *, target_recall: float = TARGET_RECALL, sample_queries: int = 500,
              max_nprobe: int = MAX_NPROBE, nlist: Optional[int] = None, seed: int = 0) -> tuple[Any, AnnInfo]:
    """Train and fill an IVF-Flat inner-product index over ``vectors`` ``[N, D]`` (L2-normalised),
    measure its recall@10 against exact search and choose ``nprobe`` (module docstring);
    ``(faiss index, AnnInfo)``."""
    faiss = topk._import_faiss()
    start = time.perf_counter()
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    if n == 0:
        raise SearchError("cannot build an approximate index over an empty index")
    nlist = int(nlist or choose_nlist(n))
    rng = np.random.default_rng(seed)
    train_rows = min(n, TRAIN_POINTS_PER_LIST * nlist)
    train = vectors if train_rows == n else vectors[np.sort(rng.choice(n, train_rows, replace=False))]
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    index.cp.min_points_per_centroid = 1  # nlist keeps 39 rows per cell where there are: no warning below
    index.train(train)
    del train
    index.add(vectors)
    measure = time.perf_counter()
    rows, queries = _held_out_queries(vectors, sample_queries, seed + 1)
    _, exact = topk.top_k(vectors, queries, RECALL_K + 1)
    truth = _drop_rows(exact, rows, RECALL_K)
    nprobe, recall = _choose_nprobe(index, queries, rows, truth, target_recall, RECALL_K, max(1, min(max_nprobe, nlist)))
    index.nprobe = nprobe
    info = AnnInfo(kind="ivf-flat", count=n, nlist=nlist, nprobe=nprobe, recall_at_10=round(recall, 4),
                   target_recall=target_recall, sample_queries=len(rows),
                   sample=f"held-out rows + Gaussian noise of {NOISE:g}x their norm, renormalised (seed {seed + 1})",
                   train_rows=train_rows, build_seconds=round(time.perf_counter() - start, 2),
                   measure_seconds=round(time.perf_counter() - measure, 2),
                   faiss_version=str(getattr(faiss, "__version__", "")))
    return index, info


def ivf_top_k(index: Any, queries: np.ndarray, k: int, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
    """Approximate top ``k`` through ``index`` (``nprobe`` cells): ``(scores [m, k'], rows [m, k'])``,
    each row sorted by score descending, ties by lower row; ``k' = min(k, ntotal)``; where the
    probed cells hold fewer than ``k'`` rows the tail is row -1 with score -inf."""
    queries = np.ascontiguousarray(np.atleast_2d(np.asarray(queries, dtype=np.float32)))
    if queries.shape[1] != index.d:
        raise SearchError(f"queries {queries.shape} do not match the approximate index (dim {index.d})")
    if k < 1:
        raise SearchError(f"k must be >= 1, got {k}")
    k = min(k, int(index.ntotal))
    if k == 0 or len(queries) == 0:
        return np.empty((len(queries), k), dtype=np.float32), np.empty((len(queries), k), dtype=np.int64)
    index.nprobe = nprobe
    values, rows = index.search(queries, k)
    missing, last = rows < 0, np.iinfo(np.int64).max
    values = np.where(missing, -np.inf, values).astype(np.float32)
    values, rows = topk._sort_hits(values, np.where(missing, last, rows).astype(np.int64), k)
    rows[rows == last] = -1
    return values, rows


def write_ivf(index: Any, path: str) -> None:
    """Save ``index`` to ``path`` (``faiss.write_index``)."""
    topk._import_faiss().write_index(index, str(path))


def read_ivf(path: str, info: AnnInfo, dim: int) -> Any:
    """Read the approximate index saved at ``path``; :class:`SearchError` when it does not match
    ``info`` (rows) and ``dim``."""
    faiss = topk._import_faiss()
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as exc:
        raise SearchError(f"{path}: unreadable approximate index: {str(exc).splitlines()[0]}") from None
    if int(index.ntotal) != info.count or int(index.d) != dim:
        raise SearchError(f"{path}: approximate index of {index.ntotal} × {index.d} vectors, "
                          f"index.json says {info.count} × {dim}")
    return index
