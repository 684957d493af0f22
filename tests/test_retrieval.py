"""Retrieval metrics against brute-force loops, ties included; the embeddings file's ``.npy``
sidecars (ernievil2.embeddings_file, launch/eval_retri.py)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ernievil2 import embeddings_file
from ernievil2.retrieval import (
    format_table,
    group_by_image_id,
    multi_caption_recall,
    official_recall,
    one_to_one_ranks,
    recall_at,
)

REPO = Path(__file__).resolve().parents[1]


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


@pytest.mark.parametrize("chunk", [2, 5, 2048])
def test_images_no_text_names_are_text_to_image_distractors(chunk):
    """Images without a text are candidates of every text query and no image query; exact ties (half-
    integer vectors, a distractor equal to a ground truth) still count for the ground truth."""
    rng = np.random.default_rng(7)
    img = rng.integers(-1, 2, (11, 6)).astype(np.float32) / 2
    img[9] = img[0]  # distractor 9 ties with image 0 for every text
    owner = np.array([0, 0, 2, 4, 4, 4, 7, 8])  # images 1, 3, 5, 6, 9, 10 are no text's first image
    extra = np.array([[2, 3], [6, 0]])  # text 2 also names image 3 (1, 5, 6, 9, 10: no text), text 6 image 0
    txt = rng.integers(-1, 2, (len(owner), 6)).astype(np.float32) / 2
    with pytest.raises(ValueError, match="5 image\\(s\\) have no caption"):
        multi_caption_recall(img, txt, owner, extra_pairs=extra)
    m = multi_caption_recall(img, txt, owner, chunk=chunk, extra_pairs=extra, distractors=True)
    s = txt @ img.T
    truth = [{int(owner[t])} | {int(i) for tt, i in extra if tt == t} for t in range(len(txt))]
    t2i = [int((s[t] > max(s[t, i] for i in truth[t])).sum()) for t in range(len(txt))]  # all 11 images
    queries = [i for i in range(len(img)) if any(i in g for g in truth)]  # 0, 2, 3, 4, 7, 8
    own = {i: [t for t in range(len(txt)) if i in truth[t]] for i in queries}
    i2t = [int(sum(s[t, i] > max(s[o, i] for o in own[i]) for t in range(len(txt)) if t not in own[i]))
           for i in queries]
    for k in (1, 5, 10):
        assert m[f"t2i_r{k}"] == pytest.approx(100 * np.mean(np.array(t2i) < k))
        assert m[f"i2t_r{k}"] == pytest.approx(100 * np.mean(np.array(i2t) < k))
    assert len(queries) == 6 and sum(s[t, 9] == s[t, 0] for t in range(len(txt))) == len(txt)
    # the distractors only make text->image harder; image->text is unchanged
    keep = np.array(queries)
    remap = {int(i): n for n, i in enumerate(keep)}
    plain = multi_caption_recall(img[keep], txt, np.array([remap[int(i)] for i in owner]), chunk=chunk,
                                 extra_pairs=np.array([[t, remap[int(i)]] for t, i in extra]))
    assert all(plain[f"t2i_r{k}"] >= m[f"t2i_r{k}"] for k in (1, 5, 10))
    assert {k: v for k, v in plain.items() if k.startswith("i2t")} == {k: v for k, v in m.items() if k.startswith("i2t")}
    with pytest.raises(ValueError, match="no text"):
        multi_caption_recall(img, txt[:0], owner[:0], distractors=True)


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


def _brute_one_to_one(text: np.ndarray, image: np.ndarray) -> tuple[list[int], list[int]]:
    """Official 1:1 ranks from the full ``S = T·Iᵀ``, one Python loop per direction (strict ``>``)."""
    s = text.astype(np.float32) @ image.astype(np.float32).T
    n = len(s)
    return [int((s[i] > s[i, i]).sum()) for i in range(n)], [int((s[:, j] > s[j, j]).sum()) for j in range(n)]


@pytest.mark.parametrize("chunk", [1, 4, 7, 16, 60, 4096])
def test_one_to_one_ranks_equal_brute_force_with_exact_ties(chunk):
    """Half-integer vectors: every score is exact in float32 whatever the summation order, so ties
    are real ties; duplicated texts, duplicated images and text == image pairs add more."""
    rng = np.random.default_rng(5)
    n, d = 60, 8
    text = rng.integers(-1, 2, (n, d)).astype(np.float32) / 2
    image = rng.integers(-1, 2, (n, d)).astype(np.float32) / 2
    image[10:20] = image[0]
    text[30:40] = text[25]
    image[45:50] = text[45:50]
    text[55:] = 0.0  # a zero text ties with every image: rank 0
    s = text @ image.T
    ties = s == np.diag(s)[:, None]
    assert ties.sum() - n > 3 * n  # many ground truths are tied with other images
    t2i, i2t = one_to_one_ranks(text, image, chunk)
    want_t2i, want_i2t = _brute_one_to_one(text, image)
    assert t2i.tolist() == want_t2i and i2t.tolist() == want_i2t
    assert (t2i[55:] == 0).all() and t2i.dtype == i2t.dtype == np.int64
    # official_recall is these ranks' recalls
    m = official_recall(text, image, chunk)
    assert [m[f"t2i_r{k}"] for k in (1, 5, 10)] == list(recall_at(np.array(want_t2i)).values())
    assert [m[f"i2t_r{k}"] for k in (1, 5, 10)] == list(recall_at(np.array(want_i2t)).values())


@pytest.mark.parametrize("chunk", [3, 50, 2048])
def test_one_to_one_ranks_equal_brute_force_on_random_floats(chunk):
    rng = np.random.default_rng(chunk)
    n, d = 101, 32
    text = rng.standard_normal((n, d)).astype(np.float32)
    image = (text + 1.5 * rng.standard_normal((n, d))).astype(np.float32)
    t2i, i2t = one_to_one_ranks(text, image, chunk)
    want_t2i, want_i2t = _brute_one_to_one(text, image)
    assert t2i.tolist() == want_t2i and i2t.tolist() == want_i2t
    assert 0 < (t2i == 0).sum() < n  # neither trivial nor hopeless
    empty = one_to_one_ranks(np.empty((0, 4)), np.empty((0, 4)), chunk)
    assert empty[0].shape == empty[1].shape == (0,)


def test_group_by_image_id_keeps_the_first_embedding():
    image = np.arange(10, dtype=np.float32).reshape(5, 2)
    unique, text_image, ids = group_by_image_id(["b", "a", "b", "c", "a"], image)
    assert ids == ["b", "a", "c"] and text_image.tolist() == [0, 1, 0, 2, 1]
    np.testing.assert_array_equal(unique, image[[0, 1, 3]])


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="no caption"):
        multi_caption_recall(np.eye(3), np.eye(3)[:2], np.array([0, 1]))
    with pytest.raises(ValueError, match="1:1 protocol"):
        official_recall(np.eye(3), np.eye(2))


# --------------------------------------------------------------------------- embeddings-file sidecars
def _eval_retri(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "launch/eval_retri.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def _infer_written(tmp_path, n=40, d=6, seed=0):
    """An embeddings file as launch/infer.py writes it with write_npy=true (O + its .npy sidecars)."""
    from ernievil2.embeddings_file import format_embedding_lines

    rng = np.random.default_rng(seed)
    text = rng.standard_normal((n, d)).astype(np.float32)
    image = (text + 0.8 * rng.standard_normal((n, d))).astype(np.float32)
    path = tmp_path / "O.tsv"
    path.write_text(format_embedding_lines(text, image), encoding="utf-8")
    np.save(f"{path}.text.npy", text)
    np.save(f"{path}.image.npy", image)
    return path, text, image


def test_eval_retri_reads_verified_sidecars_with_the_same_numbers(tmp_path):
    path, text, image = _infer_written(tmp_path)
    t, i = embeddings_file.read_verified_sidecars(path)
    np.testing.assert_array_equal(t, text)
    np.testing.assert_array_equal(i, image)
    table_npy, info_npy = embeddings_file.evaluate_embeddings_file(path, "official", chunk=7)
    table_txt, info_txt = embeddings_file.evaluate_embeddings_file(path, "official", chunk=7, sidecars=False)
    assert (info_npy["source"], info_txt["source"]) == ("npy", "text")
    assert table_npy == table_txt and info_npy["t2i"] == info_txt["t2i"] and info_npy["i2t"] == info_txt["i2t"]
    # the metrics of the parsed text equal the arrays' own (strict ">" ranks by brute force)
    s = text @ image.T
    ranks = (s > np.diag(s)[:, None]).sum(axis=1)
    assert info_txt["t2i"][:3] == [float((ranks < k).sum() / len(ranks)) for k in (1, 5, 10)]
    proc = _eval_retri(str(path))
    assert proc.returncode == 0 and proc.stdout.splitlines()[0] == (
        "official 1:1 protocol: 40 texts, 40 images (read from the verified .npy sidecars)")
    assert proc.stdout.split("\n", 1)[1] == table_npy + "\n"
    proc = _eval_retri(str(path), "--no-npy")
    assert proc.returncode == 0 and proc.stdout == "official 1:1 protocol: 40 texts, 40 images\n" + table_txt + "\n"


@pytest.mark.parametrize("damage", ["value", "rows", "dtype", "missing"])
def test_eval_retri_ignores_sidecars_that_do_not_match(tmp_path, damage):
    path, text, image = _infer_written(tmp_path)
    if damage == "value":  # the last line is always among the checked ones
        changed = image.copy()
        changed[-1, 2] = np.nextafter(changed[-1, 2], np.float32(np.inf))
        np.save(f"{path}.image.npy", changed)
    elif damage == "rows":
        np.save(f"{path}.text.npy", text[:-1])
        np.save(f"{path}.image.npy", image[:-1])
    elif damage == "dtype":
        np.save(f"{path}.text.npy", text.astype(np.float64))
    else:
        (tmp_path / "O.tsv.image.npy").unlink()
    assert embeddings_file.read_verified_sidecars(path) is None
    t, i = embeddings_file.read_embeddings(path)  # falls back to parsing O
    np.testing.assert_array_equal(t, text)
    np.testing.assert_array_equal(i, image)
    assert embeddings_file.evaluate_embeddings_file(path, "official")[1]["source"] == "text"


def test_eval_retri_sidecars_need_the_fixed_width_layout(tmp_path):
    path, text, image = _infer_written(tmp_path)
    # same values, written the upstream run_infer.py's way (str of float32): not infer.py's layout, so O is parsed
    path.write_text("".join(" ".join(map(str, t)) + "\t" + " ".join(map(str, i)) + "\t1\n"
                            for t, i in zip(text, image)), encoding="utf-8")
    assert embeddings_file.read_verified_sidecars(path) is None
    np.testing.assert_array_equal(embeddings_file.read_embeddings(path)[0], text)
