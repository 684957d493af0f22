"""Retrieval metrics against brute-force loops, ties included."""
from __future__ import annotations

import numpy as np
import pytest

from ernievil2.retrieval import format_table, multi_caption_recall, official_recall


def _brute_multi(img, txt, owner, k):
    s = img @ txt.T
    i2t = []
    for i in range(len(img)):
        # strict ">" ranking: a caption ranks by the number of captions strictly above it
        ranks = {j: int((s[i] > s[i, j]).sum()) for j in range(len(txt))}
        i2t.append(min(ranks[j] for j in range(len(txt)) if owner[j] == i) < k)
    t2i = [int((s[:, j] > s[owner[j], j]).sum()) < k for j in range(len(txt))]
    return 100 * np.mean(i2t), 100 * np.mean(t2i)


def test_multi_caption_matches_brute_force_with_small_chunks():
    rng = np.random.default_rng(0)
    img = rng.standard_normal((13, 4)).astype(np.float32)
    owner = np.repeat(np.arange(13), 3)[:37]
    owner = np.concatenate([owner, [12, 12]])
    txt = rng.standard_normal((len(owner), 4)).astype(np.float32)
    m = multi_caption_recall(img, txt, owner, chunk=5)
    for k in (1, 5, 10):
        i2t, t2i = _brute_multi(img, txt, owner, k)
        assert m[f"i2t_r{k}"] == pytest.approx(i2t)
        assert m[f"t2i_r{k}"] == pytest.approx(t2i)
    assert m["mean_recall"] == pytest.approx(np.mean([m[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)]))


def test_perfect_embeddings_score_100_and_ties_favour_ground_truth():
    img = np.eye(4, dtype=np.float32)
    txt = np.repeat(img, 2, axis=0)
    m = multi_caption_recall(img, txt, np.repeat(np.arange(4), 2))
    assert m["mean_recall"] == 100.0
    # All-equal scores: every ground truth ties with everything and still ranks first.
    m = official_recall(np.ones((5, 3), np.float32), np.ones((5, 3), np.float32))
    assert m["t2i_r1"] == 100.0 and m["i2t_r1"] == 100.0


def test_official_protocol_hand_example():
    txt = np.array([[1, 0], [0, 1], [1, 1]], dtype=np.float32)
    img = np.array([[1, 0], [1, 0.1], [0, 1]], dtype=np.float32)
    m = official_recall(txt, img)
    # t0 → img0 best (1 vs 1 tie with img1? 1*1=1, 1*1=1: tie, counts as rank 0); t1 → img1 0.1 < img2 1: rank 1;
    # t2 → img2 score 1 < img1 1.1 and = img0 1: rank 1.
    assert m["t2i_r1"] == pytest.approx(100 / 3)
    assert m["t2i_r5"] == 100.0
    assert "MeanRecall" in format_table(m)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="no caption"):
        multi_caption_recall(np.eye(3), np.eye(3)[:2], np.array([0, 1]))
    with pytest.raises(ValueError, match="1:1 protocol"):
        official_recall(np.eye(3), np.eye(2))
