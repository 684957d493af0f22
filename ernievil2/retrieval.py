"""Retrieval metrics for both evaluation protocols, ``official`` (1:1, as the upstream ``eval_retri.py``
computes it) and ``multi`` (multi-caption), vectorised, chunked, NumPy only.

Ranks use strict ``>``: an item tied with the ground truth does not push it down (the upstream
``eval_retri.py`` convention). All recalls are percentages.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

KS: tuple[int, ...] = (1, 5, 10)


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(start + size, n)


def _as_f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def _balanced_chunks(n: int, chunk: int) -> list[tuple[int, int]]:
    """``ceil(n / chunk)`` index ranges of near-equal size (no tiny last chunk: BLAS picks its kernel
    by shape, and small products may round differently)."""
    parts = max(1, -(-n // max(1, int(chunk))))
    edges = np.linspace(0, n, parts + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def one_to_one_ranks(text: np.ndarray, image: np.ndarray, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """``(t2i, i2t)`` ranks of the official 1:1 protocol from ONE score matrix ``S = T·Iᵀ`` (as the
    original ``eval_retri``, whose image→text ranks read the columns of the same ``S``).

    ``t2i[i] = #{j : S[i,j] > S[i,i]}``, ``i2t[j] = #{i : S[i,j] > S[j,j]}`` (strict ``>``: ties
    favour the ground truth). ``S`` is computed in square tiles of about ``chunk × chunk`` (the
    diagonal tiles first, which give every ``S[i,i]``), each score exactly once and in products of
    one shape, and counted for both directions as it is made: memory ``O(chunk²)``.
    """
    text, image = _as_f32(text), _as_f32(image)
    n = len(text)
    if n != len(image):
        raise ValueError(f"1:1 protocol needs as many texts as images, got {n} and {len(image)}")
    tiles = _balanced_chunks(n, chunk)
    diag = np.empty(n, dtype=np.float32)
    t2i = np.zeros(n, dtype=np.int64)
    i2t = np.zeros(n, dtype=np.int64)
    for a, b in tiles:
        scores = text[a:b] @ image[a:b].T
        d = np.ascontiguousarray(np.diagonal(scores))
        diag[a:b] = d
        t2i[a:b] += np.count_nonzero(scores > d[:, None], axis=1)
        i2t[a:b] += np.count_nonzero(scores > d[None, :], axis=0)
    for a, b in tiles:
        for c, e in tiles:
            if c == a:
                continue
            scores = text[a:b] @ image[c:e].T
            t2i[a:b] += np.count_nonzero(scores > diag[a:b, None], axis=1)
            i2t[c:e] += np.count_nonzero(scores > diag[None, c:e], axis=0)
    return t2i, i2t


def recall_at(ranks: np.ndarray, ks: Sequence[int] = KS) -> dict[int, float]:
    """Percentage of queries whose ground truth ranks within the top ``k``."""
    return {k: float((ranks < k).mean() * 100.0) for k in ks}


def official_recall(text_emb: np.ndarray, image_emb: np.ndarray, chunk: int = 2048,
                    ks: Sequence[int] = KS) -> dict[str, float]:
    """Official 1:1 protocol: line ``i``'s text and line ``i``'s image are the only pair. Recall at
    every ``k`` of ``ks`` (:func:`_table`: the means are over R@1/5/10)."""
    t2i, i2t = one_to_one_ranks(text_emb, image_emb, chunk)
    return _table(recall_at(i2t, ks), recall_at(t2i, ks))


def multi_caption_recall(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    text_image: np.ndarray,
    chunk: int = 2048,
    ks: Sequence[int] = KS,
    extra_pairs: np.ndarray | None = None,
    distractors: bool = False,
) -> dict[str, float]:
    """Multi-caption protocol: ``text_image[j]`` is the index of text ``j``'s image.

    Text→image: the rank of the text's image. Image→text: a query image scores at K when any of
    its captions is in the top K (the rank of its best-scoring caption). This is clip_benchmark's
    ``zeroshot_retrieval`` definition too (``image_retrieval_recall@K``: text→image, each caption a
    query; ``text_retrieval_recall@K``: image→text, any caption in the top K), except for exact
    ties, which count for the ground truth here (strict ``>``) and in ``torch.topk``'s order there.
    Recall at every ``k`` of ``ks`` (:func:`_table`: the means are over R@1/5/10).

    ``extra_pairs`` (int ``[P, 2]``): further ``(text, image)`` ground truths, for texts that
    caption several images (Chinese-CLIP's ``image_ids`` lists): text→image then ranks the text's
    best-scoring image (a hit when any of its images is in the top K, as Chinese-CLIP's
    ``evaluation.py`` counts), and the text is a caption of each of its images for image→text.

    ``distractors``: images that no text names are allowed (else a ``ValueError``): they are in the
    pool every text is ranked against (text→image, as Chinese-CLIP ranks every image of its
    ``imgs.tsv``), but are no image→text queries, whose recall is over the images with a text.
    """
    image_emb, text_emb = _as_f32(image_emb), _as_f32(text_emb)
    text_image = np.asarray(text_image, dtype=np.int64)
    extra = np.empty((0, 2), dtype=np.int64) if extra_pairs is None else np.asarray(extra_pairs, dtype=np.int64)
    n_img = len(image_emb)
    if len(text_image) != len(text_emb):
        raise ValueError(f"text_image has {len(text_image)} entries for {len(text_emb)} texts")
    if extra.ndim != 2 or extra.shape[1] != 2 or (len(extra) and (extra[:, 0].min() < 0
                                                                  or extra[:, 0].max() >= len(text_emb))):
        raise ValueError(f"extra_pairs must be (text, image) rows with texts in [0, {len(text_emb)})")
    every_image = np.concatenate([text_image, extra[:, 1]])
    if len(every_image) and (every_image.min() < 0 or every_image.max() >= n_img):
        raise ValueError(f"text_image holds indices outside [0, {n_img})")
    listed = np.unique(every_image)
    if len(listed) < n_img and not distractors:
        captionless = np.setdiff1d(np.arange(n_img), listed)
        raise ValueError(f"{len(captionless)} image(s) have no caption, e.g. index {int(captionless[0])}")
    if not len(listed):
        raise ValueError("no text: nothing to rank")

    t2i_ranks = np.empty(len(text_emb), dtype=np.int64)
    for a, b in _chunks(len(text_emb), chunk):
        scores = text_emb[a:b] @ image_emb.T
        gt = scores[np.arange(b - a), text_image[a:b]]
        more = extra[(extra[:, 0] >= a) & (extra[:, 0] < b)]
        if len(more):  # a text's best image: its other images score no higher, and ties do not count
            np.maximum.at(gt, more[:, 0] - a, scores[more[:, 0] - a, more[:, 1]])
        t2i_ranks[a:b] = (scores > gt[:, None]).sum(axis=1)

    i2t_ranks = np.empty(len(listed), dtype=np.int64)  # the queries: the images with a text
    for a, b in _chunks(len(listed), chunk):
        queries = listed[a:b]
        # every image a query (no distractor): the rows as a slice, the very product as before
        scores = (image_emb[a:b] if len(listed) == n_img else image_emb[queries]) @ text_emb.T  # [n, Nt]
        own = text_image[None, :] == queries[:, None]
        more = extra[np.isin(extra[:, 1], queries)]
        own[np.searchsorted(queries, more[:, 1]), more[:, 0]] = True
        best_gt = np.where(own, scores, -np.inf).max(axis=1)
        i2t_ranks[a:b] = ((scores > best_gt[:, None]) & ~own).sum(axis=1)
    return _table(recall_at(i2t_ranks, ks), recall_at(t2i_ranks, ks))


def group_by_image_id(ids: Sequence[str], image: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Deduplicate images by id (the first embedding of each id is kept): returns the unique image
    embeddings, each line's index into them (``text_image`` of :func:`multi_caption_recall`), and
    the unique ids in first-seen order."""
    index: dict[str, int] = {}
    text_image = np.empty(len(ids), dtype=np.int64)
    first: list[int] = []
    for line, image_id in enumerate(ids):
        k = index.get(image_id)
        if k is None:
            k = index[image_id] = len(first)
            first.append(line)
        text_image[line] = k
    return np.asarray(image)[np.asarray(first, dtype=np.int64)], text_image, list(index)


def _table(i2t: dict[int, float], t2i: dict[int, float]) -> dict[str, float]:
    """``i2t_rK`` / ``t2i_rK`` for every K given; the means over the K of :data:`KS` among them (the
    R@1/5/10 table; over every K given when none of :data:`KS` is), so extra Ks leave them unchanged."""
    out = {f"i2t_r{k}": v for k, v in i2t.items()}
    out.update({f"t2i_r{k}": v for k, v in t2i.items()})
    mean_ks = [k for k in KS if k in i2t] or list(i2t)
    out["i2t_mean"] = float(np.mean([i2t[k] for k in mean_ks]))
    out["t2i_mean"] = float(np.mean([t2i[k] for k in mean_ks]))
    out["mean_recall"] = float(np.mean([i2t[k] for k in mean_ks] + [t2i[k] for k in mean_ks]))
    return out


def format_table(metrics: dict[str, float], title: str = "") -> str:
    """A console table: rows Image2Text / Text2Image / MeanRecall, columns R@1 R@5 R@10 mean (a
    text→image-only record: rows Text2Image / MeanRecall)."""
    lines = [title] if title else []
    lines.append(f"{'':<12}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'mean':>8}")
    directions = [(name, p) for name, p in (("Image2Text", "i2t"), ("Text2Image", "t2i")) if f"{p}_mean" in metrics]
    for name, p in directions:
        vals = [metrics[f"{p}_r{k}"] for k in KS] + [metrics[f"{p}_mean"]]
        lines.append(f"{name:<12}" + "".join(f"{v:>8.2f}" for v in vals))
    avg = [float(np.mean([metrics[f"{p}_r{k}"] for _, p in directions])) for k in KS] + [metrics["mean_recall"]]
    lines.append(f"{'MeanRecall':<12}" + "".join(f"{v:>8.2f}" for v in avg))
    return "\n".join(lines)


# --------------------------------------------------------------------------- the upstream table
SEED_HEADERS: tuple[str, ...] = ("Name", "R@1", "R@5", "R@10", "meanRecall")


def seed_recalls(ranks: np.ndarray) -> list[float]:
    """``[R@1, R@5, R@10, meanRecall]`` as fractions, with the upstream ``eval_retri.py`` arithmetic
    (``count / n``; meanRecall ``(R@1 + R@5 + R@10) / 3``) so printed values match it digit for digit."""
    ranks = np.asarray(ranks)
    n = float(len(ranks))
    r1, r5, r10 = ((ranks < k).sum() / n for k in KS)
    return [float(r1), float(r5), float(r10), float((r1 + r5 + r10) / 3.0)]


def format_seed_table(t2i: Sequence[float], i2t: Sequence[float]) -> str:
    """The upstream ``eval_retri.py`` table: rows Text2Image, Image2Text, MeanRecall (the mean of the two
    directions), columns R@1 R@5 R@10 meanRecall, values ×100 with two decimals, laid out as
    ``tabulate(..., tablefmt="github")`` prints it. ``t2i``/``i2t`` are fractions as returned by
    :func:`seed_recalls`."""
    rows = [
        ["Text2Image"] + [round(v * 100, 2) for v in t2i[:4]],
        ["Image2Text"] + [round(v * 100, 2) for v in i2t[:4]],
        ["MeanRecall"] + [round((t2i[i] + i2t[i]) / 2 * 100, 2) for i in range(4)],
    ]
    cells = [[r[0]] + [f"{v:.2f}" for v in r[1:]] for r in rows]
    # tabulate: column width = max(widest cell, header + 2); text left-aligned, numbers right-aligned
    widths = [max(len(h) + 2, *(len(c[i]) for c in cells)) for i, h in enumerate(SEED_HEADERS)]

    def line(values: Sequence[str]) -> str:
        parts = [values[0].ljust(widths[0])] + [v.rjust(w) for v, w in zip(values[1:], widths[1:])]
        return "| " + " | ".join(parts) + " |"

    out = [line(SEED_HEADERS), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(c) for c in cells]
    return "\n".join(out)


def seed_table_from_metrics(metrics: dict[str, float]) -> str:
    """:func:`format_seed_table` for a metrics dict of :func:`official_recall` /
    :func:`multi_caption_recall` (percentages)."""
    t2i = [metrics[f"t2i_r{k}"] / 100 for k in KS] + [metrics["t2i_mean"] / 100]
    i2t = [metrics[f"i2t_r{k}"] / 100 for k in KS] + [metrics["i2t_mean"] / 100]
    return format_seed_table(t2i, i2t)
