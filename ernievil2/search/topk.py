"""Exact top-k inner-product search over L2-normalised vectors: NumPy, or faiss's flat index.

:func:`top_k` (NumPy: chunked matrix product + ``argpartition``), or :func:`faiss_top_k`
(``faiss.IndexFlatIP``; the optional ``search`` extra, ``pip install -e ".[search]"``). Both
return the top ``k`` by score, descending, ties broken by index order (lower row first); faiss
computes the scores with its own kernels, so where two scores differ by float rounding only, or tie
at the ``k``-th place, its order or cut may differ. :data:`BACKENDS` names the ways
:meth:`SearchIndex.search <ernievil2.search.index.SearchIndex.search>` searches: these two
(``"numpy"``, ``"faiss"``), the approximate IVF index (``"ivf"``, :mod:`ernievil2.search.ann`) and
``"auto"`` (IVF when the index has one, else NumPy).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ernievil2.search.identity import SearchError

__all__ = ["BACKENDS", "FAISS_HINT", "top_k", "faiss_top_k"]

BACKENDS: tuple[str, ...] = ("auto", "numpy", "faiss", "ivf")
FAISS_HINT = 'pip install -e ".[search]" (faiss-cpu==1.15.1)'


def _chunk_top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``scores`` ``[m, c]`` the columns of its ``k`` best, ties at the cut broken by
    lower column; returns ``(values [m, k], columns [m, k])`` (unsorted within a row)."""
    m, c = scores.shape
    if k >= c:
        cols = np.broadcast_to(np.arange(c), (m, c))
        return scores, cols
    kth = -np.partition(-scores, k - 1, axis=1)[:, k - 1 : k]  # the k-th largest value of each row
    above = scores > kth
    at = scores == kth
    need = k - above.sum(axis=1, keepdims=True)
    keep = above | (at & (np.cumsum(at, axis=1) <= need))
    rows, cols = np.nonzero(keep)  # row-major: exactly k per row, columns ascending
    cols = cols.reshape(m, k)
    return np.take_along_axis(scores, cols, axis=1), cols


def _sort_hits(values: np.ndarray, idx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((idx, -values), axis=-1)[:, :k]
    return np.take_along_axis(values, order, axis=1), np.take_along_axis(idx, order, axis=1)


def top_k(vectors: np.ndarray, queries: np.ndarray, k: int, chunk_elements: int = 1 << 24) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product search: ``(scores [m, k'], rows [m, k'])`` with ``k' = min(k, N)``, each
    row sorted by score descending, ties by lower row. ``vectors`` ``[N, D]`` is scanned in chunks
    of about ``chunk_elements`` scores (``m × chunk`` floats) at a time."""
    vectors, queries = _check_search_args(vectors, queries, k)
    n, m = len(vectors), len(queries)
    k = min(k, n)
    if k == 0 or m == 0:
        return np.empty((m, k), dtype=np.float32), np.empty((m, k), dtype=np.int64)
    chunk = max(k, chunk_elements // max(m, 1), 1)
    best_v = np.empty((m, 0), dtype=np.float32)
    best_i = np.empty((m, 0), dtype=np.int64)
    for a in range(0, n, chunk):
        scores = queries @ vectors[a : a + chunk].T
        v, c = _chunk_top_k(scores, k)
        best_v = np.concatenate([best_v, v.astype(np.float32, copy=False)], axis=1)
        best_i = np.concatenate([best_i, c.astype(np.int64) + a], axis=1)
        best_v, best_i = _sort_hits(best_v, best_i, k)
    return best_v, best_i


def _check_search_args(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    vectors = np.asarray(vectors, dtype=np.float32)
    queries = np.asarray(queries, dtype=np.float32)
    if queries.ndim == 1:
        queries = queries[None]
    if vectors.ndim != 2 or queries.ndim != 2 or queries.shape[1] != vectors.shape[1]:
        raise SearchError(f"queries {queries.shape} do not match the index vectors {vectors.shape}")
    if k < 1:
        raise SearchError(f"k must be >= 1, got {k}")
    return vectors, queries


def _import_faiss():
    try:
        import faiss
    except ImportError:
        raise SearchError(f"the faiss backend needs the faiss-cpu package: {FAISS_HINT}") from None
    return faiss


def faiss_top_k(vectors: np.ndarray, queries: np.ndarray, k: int, index: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`top_k` through ``faiss.IndexFlatIP`` (``index``: one already holding ``vectors``);
    the ``k`` rows faiss returns are re-sorted by (score desc, row asc), so equal scores come in
    index order (which of several rows tying at the ``k``-th score are kept is faiss's choice)."""
    faiss = _import_faiss()
    vectors, queries = _check_search_args(vectors, queries, k)
    k = min(k, len(vectors))
    m = len(queries)
    if k == 0 or m == 0:
        return np.empty((m, k), dtype=np.float32), np.empty((m, k), dtype=np.int64)
    if index is None:
        index = faiss.IndexFlatIP(vectors.shape[1])
        index.add(np.ascontiguousarray(vectors))
    values, rows = index.search(np.ascontiguousarray(queries), k)
    return _sort_hits(values.astype(np.float32), rows.astype(np.int64), k)
