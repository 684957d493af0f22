"""Each loss term against a NumPy reference: value and gradient with respect to the features."""
from __future__ import annotations

import numpy as np
import paddle
import pytest

from ernievil2.losses import FeatureExchange, LossConfig, MultiViewLoss, info_nce, masked_info_nce, nt_xent

RTOL = 1e-5


def _normed(rng, n, d):
    x = rng.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _ce_rows(logits, labels):
    """Per-row cross entropy and d(row loss)/d(logits)."""
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    loss = -np.log(p[np.arange(len(labels)), labels])
    grad = p.copy()
    grad[np.arange(len(labels)), labels] -= 1.0
    return loss, grad


def ref_info_nce(a, b, s):
    n = len(a)
    lab = np.arange(n)
    l1, g1 = _ce_rows(s * a @ b.T, lab)
    l2, g2 = _ce_rows(s * b @ a.T, lab)
    loss = (l1.mean() + l2.mean()) / 2
    # dL/da from both directions (g1 rows are a, g2 columns are a).
    ga = s * (g1 @ b + g2.T @ b) / (2 * n)
    gb = s * (g1.T @ a + g2 @ a) / (2 * n)
    return loss, ga, gb


def ref_masked(a, t, m, s):
    n = len(a)
    lab = np.arange(n)
    logits1 = s * a @ t.T + np.where(m[None, :] > 0, 0.0, -1e9)
    l1, g1 = _ce_rows(logits1, lab)
    l2, g2 = _ce_rows(s * t @ a.T, lab)
    w = m / max(m.sum(), 1.0)
    l1 = np.where(m > 0, l1, 0.0)
    loss = ((l1 + l2) * w).sum() / 2
    g1 = g1 * w[:, None] / 2
    g2 = g2 * w[:, None] / 2
    ga = s * (g1 @ t + g2.T @ t)
    gt = s * (g1.T @ a + g2 @ a)
    return loss, ga, gt


def ref_nt_xent(v1, v2, s):
    n = len(v1)
    z = np.concatenate([v1, v2])
    logits = s * z @ z.T
    np.fill_diagonal(logits, -1e9)
    pos = np.concatenate([np.arange(n, 2 * n), np.arange(n)])
    per_row, g = _ce_rows(logits, pos)
    g = g / (2 * n)
    np.fill_diagonal(g, 0.0)
    gz = s * (g @ z + g.T @ z)
    return per_row.mean(), gz[:n], gz[n:]


def _tensors(*arrays):
    out = []
    for a in arrays:
        t = paddle.to_tensor(a, dtype="float64")
        t.stop_gradient = False
        out.append(t)
    return out


def test_info_nce_matches_numpy():
    rng = np.random.default_rng(0)
    a, b = _normed(rng, 6, 5), _normed(rng, 6, 5)
    ta, tb = _tensors(a, b)
    loss = info_nce(ta, tb, paddle.to_tensor(7.0, dtype="float64"), FeatureExchange())
    loss.backward()
    ref, ga, gb = ref_info_nce(a, b, 7.0)
    np.testing.assert_allclose(float(loss), ref, rtol=RTOL)
    np.testing.assert_allclose(ta.grad.numpy(), ga, rtol=RTOL, atol=1e-10)
    np.testing.assert_allclose(tb.grad.numpy(), gb, rtol=RTOL, atol=1e-10)


def test_masked_info_nce_matches_numpy_and_ignores_untagged_samples():
    rng = np.random.default_rng(1)
    a, t = _normed(rng, 7, 5), _normed(rng, 7, 5)
    m = np.array([1, 0, 1, 1, 0, 1, 1], dtype=np.float64)
    ta, tt = _tensors(a, t)
    loss = masked_info_nce(ta, tt, paddle.to_tensor(m), paddle.to_tensor(5.0, dtype="float64"), FeatureExchange())
    loss.backward()
    ref, ga, gt = ref_masked(a, t, m, 5.0)
    np.testing.assert_allclose(float(loss), ref, rtol=RTOL)
    np.testing.assert_allclose(ta.grad.numpy(), ga, rtol=RTOL, atol=1e-10)
    np.testing.assert_allclose(tt.grad.numpy(), gt, rtol=RTOL, atol=1e-10)
    # The objects text of an untagged sample gets no gradient: it is neither query nor candidate.
    np.testing.assert_allclose(tt.grad.numpy()[m == 0], 0.0, atol=1e-20)
    # Whatever those padding texts are, the loss does not change.
    t2 = t.copy()
    t2[m == 0] = _normed(rng, 2, 5)
    loss2 = masked_info_nce(*_tensors(a, t2), paddle.to_tensor(m), paddle.to_tensor(5.0, dtype="float64"), FeatureExchange())
    np.testing.assert_allclose(float(loss2), float(loss), rtol=1e-12)


def ref_true_texts(a, t, m, image_tags, text_tags, s, mode):
    """Value of the image-objects term when texts true of an image (every tag they name is the
    image's) are masked out of its candidates or are equal-share targets (tags as Python sets)."""
    n = len(a)
    true = np.array([[bool(text_tags[j]) and text_tags[j] <= image_tags[i] and m[i] > 0 and m[j] > 0
                      for j in range(n)] for i in range(n)]) | np.eye(n, dtype=bool)
    rows = []
    for logits, tr in ((s * a @ t.T + np.where(m[None, :] > 0, 0.0, -1e9), true), (s * t @ a.T, true.T)):
        z = logits - logits.max(axis=1, keepdims=True)
        if mode == "masked":
            z = np.where(tr & ~np.eye(n, dtype=bool), -np.inf, z)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        target = np.eye(n) if mode == "masked" else tr / tr.sum(axis=1, keepdims=True)
        rows.append(-(np.where(target > 0, target * logp, 0.0)).sum(axis=1))
    per_row = np.where(m > 0, rows[0] + rows[1], 0.0)
    return per_row.sum() / (2 * max(m.sum(), 1.0))


def _tag_array(sets, k=4):
    out = np.zeros((len(sets), k), dtype=np.int64)
    for i, tags in enumerate(sets):
        out[i, : len(tags)] = sorted(tags)
    return out


@pytest.mark.parametrize("mode", ["masked", "positive"])
def test_texts_true_of_an_image_are_never_its_negatives(mode):
    """Rows 0, 2, 5 name the same tags {9}; row 3 names {4} of its {4, 8}; row 6 names {4, 8}; row 4
    names {8}; row 1 is untagged. Text 3 ({4}) is true of images 3 and 6, text 0 of images 0, 2, 5,
    identical texts of each other's images. ``masked`` and ``positive`` match a NumPy reference and
    differ from plain InfoNCE."""
    rng = np.random.default_rng(4)
    a, t = _normed(rng, 7, 5), _normed(rng, 7, 5)
    m = np.array([1, 0, 1, 1, 1, 1, 1], dtype=np.float64)
    image_sets = [{9}, set(), {9, 8}, {4, 8}, {8}, {9}, {4, 8}]
    text_sets = [{9}, set(), {9}, {4}, {8}, {9}, {4, 8}]
    scale = paddle.to_tensor(5.0, dtype="float64")
    tags = (paddle.to_tensor(_tag_array(image_sets)), paddle.to_tensor(_tag_array(text_sets)))

    def term(mode_):
        ta, tt = _tensors(a, t)
        loss = masked_info_nce(ta, tt, paddle.to_tensor(m), scale, FeatureExchange(), True, tags, mode_)
        loss.backward()
        return float(loss), tt.grad.numpy()

    value, gt = term(mode)
    np.testing.assert_allclose(value, ref_true_texts(a, t, m, image_sets, text_sets, 5.0, mode), rtol=RTOL)
    plain = term("negative")[0]
    np.testing.assert_allclose(plain, ref_masked(a, t, m, 5.0)[0], rtol=RTOL)
    assert abs(value - plain) > 1e-3
    # Untagged rows are neither queries nor candidates in either mode.
    np.testing.assert_allclose(gt[m == 0], 0.0, atol=1e-20)


def ref_sigmoid(a, t, m, image_tags, text_tags, s, mode):
    """The sigmoid image-objects term in NumPy: a binary cross entropy per (tagged image, tagged
    text) pair, the logits shifted so their mean over the scored pairs is the logit of the share of
    positive pairs, each row's sum divided by its positives, the mean over tagged rows."""
    n = len(a)
    true = np.array([[bool(text_tags[j]) and text_tags[j] <= image_tags[i] for j in range(n)]
                     for i in range(n)]) if mode != "negative" else np.zeros((n, n), dtype=bool)
    own = np.eye(n, dtype=bool)
    target = true | own
    weight = np.outer(m > 0, m > 0).astype(float)
    if mode == "masked":
        weight = weight * ~(target & ~own)
        target = own
    logits = s * a @ t.T
    prior = (target * weight).sum() / weight.sum()
    z = logits - (logits * weight).sum() / weight.sum() + np.log(prior / (1 - prior))
    bce = np.logaddexp(0.0, z) - target * z
    rows = (bce * weight).sum(axis=1) / np.maximum((target * weight).sum(axis=1), 1.0)
    return np.where(m > 0, rows, 0.0).sum() / max(m.sum(), 1.0)


@pytest.mark.parametrize("mode", ["negative", "masked", "positive"])
def test_sigmoid_objects_matches_numpy_and_pulls_true_texts_in(mode):
    """The multi-label objective: with ``positive`` another sample's identical text is a target of
    the image, as its own pair is; with ``masked`` it is left out; the gradient reaches no
    untagged sample's text."""
    rng = np.random.default_rng(5)
    a, t = _normed(rng, 7, 5), _normed(rng, 7, 5)
    m = np.array([1, 0, 1, 1, 1, 1, 1], dtype=np.float64)
    image_sets = [{9}, set(), {9, 8}, {4, 8}, {8}, {9}, {4, 8}]
    text_sets = [{9}, set(), {9}, {4}, {8}, {9}, {4, 8}]
    tags = (paddle.to_tensor(_tag_array(image_sets)), paddle.to_tensor(_tag_array(text_sets)))
    ta, tt = _tensors(a, t)
    loss = masked_info_nce(ta, tt, paddle.to_tensor(m), paddle.to_tensor(5.0, dtype="float64"), FeatureExchange(),
                           True, tags, mode, "sigmoid")
    loss.backward()
    np.testing.assert_allclose(float(loss), ref_sigmoid(a, t, m, image_sets, text_sets, 5.0, mode), rtol=RTOL)
    np.testing.assert_allclose(tt.grad.numpy()[m == 0], 0.0, atol=1e-20)
    # the reference's targets hold every text true of the image (positive) or only the own pair
    if mode != "negative":
        plain = ref_sigmoid(a, t, m, image_sets, text_sets, 5.0, "negative")
        assert abs(float(loss) - plain) > 1e-3


def test_sigmoid_objects_ignores_the_embeddings_common_offset():
    """At the start of training every cosine is near 1; the bias follows the batch, so adding one
    constant to every logit (a larger logit scale on collinear features) changes nothing."""
    rng = np.random.default_rng(6)
    base = _normed(rng, 1, 8)
    a = base + 0.05 * rng.standard_normal((6, 8))
    t = base + 0.05 * rng.standard_normal((6, 8))
    a, t = a / np.linalg.norm(a, axis=1, keepdims=True), t / np.linalg.norm(t, axis=1, keepdims=True)
    m = np.ones(6)
    value = masked_info_nce(*_tensors(a, t), paddle.to_tensor(m), paddle.to_tensor(5.0, dtype="float64"),
                            FeatureExchange(), True, None, "negative", "sigmoid")
    # one positive among 6 candidates per row: at the prior the row loss is near -ln(1/6) + 5·(-ln(5/6))
    prior = -np.log(1 / 6) - 5 * np.log(5 / 6)
    assert abs(float(value) - prior) < 0.5


def test_caption_agreement_weighs_down_captions_that_disagree_with_the_tags():
    from ernievil2.losses import caption_agreement_weights

    rng = np.random.default_rng(7)
    objects = _normed(rng, 6, 8)
    captions = objects + 0.1 * rng.standard_normal((6, 8))
    captions[2] = -objects[2]  # a caption written for another scene
    captions = captions / np.linalg.norm(captions, axis=1, keepdims=True)
    mask = np.array([1, 1, 1, 1, 0, 1], dtype=np.float64)
    w = caption_agreement_weights(paddle.to_tensor(captions), paddle.to_tensor(objects),
                                  paddle.to_tensor(mask), 0.2).numpy()
    assert w[4] == 1.0  # untagged: no evidence either way
    assert w[2] < 1e-3 and all(w[i] > 1.0 for i in (0, 1, 3, 5))
    np.testing.assert_allclose(w[mask > 0].sum(), mask.sum(), rtol=1e-6)  # mean 1 over the tagged rows
    # Objects view on the first 4 rows only (aux_fraction): the rest weigh 1.
    w4 = caption_agreement_weights(paddle.to_tensor(captions), paddle.to_tensor(objects[:4]),
                                   paddle.to_tensor(mask[:4]), 0.2).numpy()
    np.testing.assert_array_equal(w4[4:], 1.0)
    # The weighted InfoNCE: each pair's two rows weighed; weights of 1 give the plain value.
    a, b = _normed(rng, 6, 5), _normed(rng, 6, 5)
    scale = paddle.to_tensor(7.0, dtype="float64")
    plain = float(info_nce(*_tensors(a, b), scale, FeatureExchange()))
    ones = float(info_nce(*_tensors(a, b), scale, FeatureExchange(), True, paddle.ones([6], dtype="float64")))
    assert ones == pytest.approx(plain, rel=1e-12)
    l1, _ = _ce_rows(7.0 * a @ b.T, np.arange(6))
    l2, _ = _ce_rows(7.0 * b @ a.T, np.arange(6))
    weighted = float(info_nce(*_tensors(a, b), scale, FeatureExchange(), True, paddle.to_tensor(w)))
    assert weighted == pytest.approx(((w * l1).mean() + (w * l2).mean()) / 2, rel=RTOL)


def test_new_objects_options_are_checked_by_key():
    with pytest.raises(ValueError, match="loss.objects_objective"):
        LossConfig(objects_objective="sigmod")
    with pytest.raises(ValueError, match="loss.caption_agreement"):
        LossConfig(caption_agreement=0.0)
    with pytest.raises(ValueError, match="caption_agreement.*image_objects"):
        MultiViewLoss(LossConfig(image_objects=0.0, image_image=0.0, text_text=0.0, caption_agreement=0.2))


def test_texts_true_of_images():
    images = _tag_array([{1, 2}, {2}, {3}, set()])
    texts = _tag_array([{2}, {1, 2}, {1, 3}, set()])
    from ernievil2.losses import texts_true_of_images

    got = texts_true_of_images(paddle.to_tensor(images), paddle.to_tensor(texts)).numpy()
    np.testing.assert_array_equal(got, [[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    previous = paddle.get_default_dtype()
    paddle.set_default_dtype("float64")  # as the distributed tests run it
    try:
        again = texts_true_of_images(paddle.to_tensor(images), paddle.to_tensor(texts)).numpy()
    finally:
        paddle.set_default_dtype(previous)
    np.testing.assert_array_equal(again, got)
    rng = np.random.default_rng(0)
    for _ in range(30):  # against set containment on random keys (0 is padding)
        images, texts = rng.integers(0, 6, (int(rng.integers(1, 9)), 4)), rng.integers(0, 6, (int(rng.integers(1, 9)), 4))
        want = [[bool(set(t[t > 0])) and set(t[t > 0]) <= set(i[i > 0]) for t in texts] for i in images]
        got = texts_true_of_images(paddle.to_tensor(images), paddle.to_tensor(texts)).numpy()
        np.testing.assert_array_equal(got, want)


def test_masked_info_nce_with_no_tagged_sample_is_zero():
    rng = np.random.default_rng(2)
    ta, tt = _tensors(_normed(rng, 4, 3), _normed(rng, 4, 3))
    loss = masked_info_nce(ta, tt, paddle.zeros([4], dtype="float64"), paddle.to_tensor(5.0, dtype="float64"), FeatureExchange())
    loss.backward()
    assert float(loss) == 0.0
    np.testing.assert_array_equal(ta.grad.numpy(), 0.0)


def test_nt_xent_matches_numpy_and_excludes_self_similarity():
    rng = np.random.default_rng(3)
    v1, v2 = _normed(rng, 5, 4), _normed(rng, 5, 4)
    t1, t2 = _tensors(v1, v2)
    loss = nt_xent(t1, t2, paddle.to_tensor(10.0, dtype="float64"), FeatureExchange())
    loss.backward()
    ref, g1, g2 = ref_nt_xent(v1, v2, 10.0)
    np.testing.assert_allclose(float(loss), ref, rtol=RTOL)
    np.testing.assert_allclose(t1.grad.numpy(), g1, rtol=RTOL, atol=1e-10)
    np.testing.assert_allclose(t2.grad.numpy(), g2, rtol=RTOL, atol=1e-10)
    # With self-similarity (cos = 1, the largest logit) left in, the value would be much larger.
    z = np.concatenate([v1, v2])
    logits = 10.0 * z @ z.T
    pos = np.concatenate([np.arange(5, 10), np.arange(5)])
    with_self, _ = _ce_rows(logits, pos)
    assert with_self.mean() > ref + 0.5


def test_multiview_loss_weights_terms_and_clip_only_needs_two_views():
    rng = np.random.default_rng(4)
    names = ["image", "caption", "objects", "image_view1", "image_view2", "text_view"]
    feats = {k: paddle.to_tensor(_normed(rng, 6, 8)) for k in names}
    mask = paddle.to_tensor(np.array([1, 1, 0, 1, 0, 1], dtype=np.float64))
    scale = paddle.to_tensor(np.exp(2.0))
    cfg = LossConfig(image_caption=1.0, image_objects=0.5, image_image=2.0, text_text=0.25, intra_temperature=0.2)
    out = MultiViewLoss(cfg)(feats, scale, mask)
    f = {k: v.numpy() for k, v in feats.items()}
    s = float(np.exp(2.0))
    expect = {
        "image_caption": ref_info_nce(f["image"], f["caption"], s)[0],
        "image_objects": ref_masked(f["image"], f["objects"], mask.numpy(), s)[0],
        "image_image": ref_nt_xent(f["image_view1"], f["image_view2"], 5.0)[0],
        "text_text": ref_nt_xent(f["caption"], f["text_view"], 5.0)[0],
    }
    for k, v in expect.items():
        np.testing.assert_allclose(float(out[k]), v, rtol=RTOL)
    total = expect["image_caption"] + 0.5 * expect["image_objects"] + 2.0 * expect["image_image"] + 0.25 * expect["text_text"]
    np.testing.assert_allclose(float(out["loss"]), total, rtol=RTOL)

    clip = MultiViewLoss(LossConfig(image_objects=0.0, image_image=0.0, text_text=0.0))
    assert clip.required_views == ("image", "caption")
    out = clip({"image": feats["image"], "caption": feats["caption"]}, scale)
    assert set(out) == {"loss", "image_caption"}
    np.testing.assert_allclose(float(out["loss"]), expect["image_caption"], rtol=RTOL)


def test_all_weights_zero_is_refused():
    with pytest.raises(ValueError, match="all loss weights are 0"):
        MultiViewLoss(LossConfig(0.0, 0.0, 0.0, 0.0))
