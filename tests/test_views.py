"""Multi-view sample transform."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import paddle
import pytest

from ernievil2.data.device_views import ViewFinisher, gaussian_kernels
from ernievil2.data.preprocess import IMAGENET_MEAN, IMAGENET_STD, preprocess
from ernievil2.data.sample import RawSample
from ernievil2.data.views import (
    ALL_VIEWS,
    MultiViewTransform,
    ViewConfig,
    augment_text_ids,
    decode_rgb,
    objects_text,
    random_resized_crop_box,
    stable_hash,
    tag_key,
)
from ernievil2.tokenizer import WordPieceTokenizer

MEAN = np.array(IMAGENET_MEAN, dtype=np.float32)
STD = np.array(IMAGENET_STD, dtype=np.float32)
SIZE = 64


def _encode(rgb: np.ndarray, ext: str = ".png") -> bytes:
    bgr = rgb[..., ::-1] if rgb.ndim == 3 and rgb.shape[2] == 3 else rgb
    ok, buf = cv2.imencode(ext, np.ascontiguousarray(bgr))
    assert ok
    return buf.tobytes()


def _textured(h: int = 120, w: int = 160, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 255 // (h + w)], axis=-1)
    img = img + rng.integers(0, 40, size=(h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _diff(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of two uint8 images, in grey levels."""
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


# What the tests below tokenise: a WordPiece vocab built from these texts holds each of their words.
VOCAB_TEXTS = ["a red dog runs on the grass", "two cats sleep on a sofa", "穿着连衣裙的小女孩。",
               "the picture contains dog, grass, star, circle, square", "图中有狗、猫",
               "a little girl climbing the stairs to her playhouse", "x z"]


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory) -> Path:
    """A stand-in vocab built here: the transform works with any WordPiece vocab."""
    return WordPieceTokenizer.build_vocab(VOCAB_TEXTS, tmp_path_factory.mktemp("vocab") / "vocab.txt", vocab_size=300)


@pytest.fixture(scope="module")
def tok(vocab_file: Path) -> WordPieceTokenizer:
    return WordPieceTokenizer(vocab_file)


@pytest.fixture(scope="module")
def sample() -> RawSample:
    return RawSample(
        key="synthetic/0001",
        image=_encode(_textured()),
        captions=["a red dog runs on the grass", "two cats sleep on a sofa", "穿着连衣裙的小女孩。"],
        objects=["dog", "grass", "dog"],
        lang="en",
    )


def _transform(tok, seed: int = 0, **cfg) -> MultiViewTransform:
    return MultiViewTransform(ViewConfig(image_size=SIZE, **cfg), tok, max_length=16, seed=seed)


# --------------------------------------------------------------------------- shapes / differences
def test_shapes_and_dtypes(tok, sample):
    t = _transform(tok)
    out = t(sample)
    assert tuple(out) == t.output_keys
    assert [k for k in out if not k.endswith("_photometric")] == list(ALL_VIEWS)
    for k in ("image_view1_photometric", "image_view2_photometric"):
        assert out[k].shape == (12,) and out[k].dtype == np.float32
    for k in ("image", "image_view1", "image_view2"):
        assert out[k].shape == (SIZE, SIZE, 3) and out[k].dtype == np.uint8 and out[k].flags.c_contiguous
    for k in ("caption_ids", "text_view_ids", "objects_ids"):
        assert out[k].shape == (16,) and out[k].dtype == np.int64
        assert out[k][0] == tok.cls_id and tok.sep_id in out[k]
    assert out["has_objects"].shape == () and out["has_objects"].dtype == np.float32
    assert float(out["has_objects"]) == 1.0


def test_views_differ(tok, sample):
    out = _transform(tok)(sample)
    a, b, c = out["image"], out["image_view1"], out["image_view2"]
    assert _diff(a, b) > 3 and _diff(a, c) > 3 and _diff(b, c) > 3
    assert not np.array_equal(out["caption_ids"], out["text_view_ids"])


def test_objects_output(tok, sample):
    out = _transform(tok)(sample)
    expected = tok("the picture contains dog, grass", max_length=16)[0]
    np.testing.assert_array_equal(out["objects_ids"], expected)


# --------------------------------------------------------------------------- determinism
def test_deterministic_per_seed_epoch_key(tok, sample):
    a = _transform(tok, seed=3)(sample, epoch=2)
    b = _transform(tok, seed=3)(sample, epoch=2)  # a fresh instance: nothing carried in state
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])

    def differs(x, y):
        return not np.array_equal(x["image"], y["image"]) and not np.array_equal(x["image_view1"], y["image_view1"])

    assert differs(a, _transform(tok, seed=4)(sample, epoch=2))
    assert differs(a, _transform(tok, seed=3)(sample, epoch=3))
    other_key = RawSample(key="synthetic/0002", image=sample.image, captions=sample.captions)
    assert differs(a, _transform(tok, seed=3)(other_key, epoch=2))
    # captions chosen across epochs cover more than one caption
    picks = {tuple(_transform(tok)(sample, epoch=e)["caption_ids"]) for e in range(12)}
    assert len(picks) > 1


def test_views_subset_skips_work_and_matches_full(tok, sample):
    full = _transform(tok, seed=5)(sample, epoch=1)
    t = MultiViewTransform(ViewConfig(image_size=SIZE), tok, max_length=16, seed=5, views=["image", "caption_ids"])
    part = t(sample, epoch=1)
    assert set(part) == {"image", "caption_ids"}
    np.testing.assert_array_equal(part["image"], full["image"])
    np.testing.assert_array_equal(part["caption_ids"], full["caption_ids"])
    # text-only views never decode the image
    t_text = MultiViewTransform(ViewConfig(), tok, views=["caption_ids", "objects_ids"])
    bad_image = RawSample(key="k", image=b"not an image", captions=["a dog"], objects=None)
    out = t_text(bad_image)
    assert set(out) == {"caption_ids", "objects_ids", "has_objects", "objects_tags", "objects_text_tags"}
    # the loss's view names are accepted as aliases
    aliased = MultiViewTransform(ViewConfig(image_size=SIZE), tok, max_length=16, seed=5, views=("image", "caption"))
    assert set(aliased(sample, epoch=1)) == {"image", "caption_ids"}
    assert set(MultiViewTransform(ViewConfig(), tok, views=["objects", "text_view"]).views) == {
        "text_view_ids", "objects_ids", "has_objects", "objects_tags", "objects_text_tags"}
    with pytest.raises(ValueError, match="unknown views"):
        MultiViewTransform(ViewConfig(), tok, views=["image", "depth"])


@pytest.mark.slow
def test_same_views_in_another_process(tok, sample, vocab_file, tmp_path):
    here = _transform(tok, seed=7)(sample, epoch=4)
    img_file = tmp_path / "img.png"
    img_file.write_bytes(sample.image)
    code = f"""
import numpy as np
from ernievil2.data.device_views import ViewFinisher, gaussian_kernels
from ernievil2.data.sample import RawSample
from ernievil2.data.views import MultiViewTransform, ViewConfig
from ernievil2.tokenizer import WordPieceTokenizer
tok = WordPieceTokenizer({str(vocab_file)!r})
s = RawSample(key={sample.key!r}, image=open({str(img_file)!r}, "rb").read(), captions={sample.captions!r},
              objects={sample.objects!r})
out = MultiViewTransform(ViewConfig(image_size={SIZE}), tok, max_length=16, seed=7)(s, epoch=4)
np.savez({str(tmp_path / "out.npz")!r}, **out)
"""
    env = dict(os.environ, PYTHONHASHSEED="12345")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)
    there = np.load(tmp_path / "out.npz")
    for k in here:
        np.testing.assert_array_equal(here[k], there[k])
    assert stable_hash("synthetic/0001") == stable_hash("synthetic/0001") != stable_hash("synthetic/0002")


# --------------------------------------------------------------------------- images
def _finish(view: np.ndarray, params: np.ndarray | None = None) -> np.ndarray:
    """One view finished as the trainer does (photometric draws applied, normalised), as [0, 1] HWC."""
    out = ViewFinisher(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))(
        paddle.to_tensor(view[None]), None if params is None else params[None])
    return out.numpy()[0].transpose(1, 2, 0)


def test_constant_colour_normalisation(tok):
    colour = np.array([200, 100, 50], dtype=np.uint8)
    img = np.broadcast_to(colour, (90, 70, 3)).copy()
    s = RawSample(key="const", image=_encode(img), captions=["a"])
    t = _transform(tok, color_jitter_prob=1.0, grayscale_prob=0.0, blur_prob=1.0)
    out = t(s)
    for k in ("image", "image_view1", "image_view2"):
        assert (out[k] == colour).all()  # crop, resize and flip of a constant image change no pixel
    expected = (colour / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    # hand computed: R (200/255-.485)/.229, G (100/255-.456)/.224, B (50/255-.406)/.225
    np.testing.assert_allclose(expected, [1.30712, -0.28501, -0.93289], atol=1e-4)
    pixels = ViewFinisher()(paddle.to_tensor(np.stack([out["image"], out["image"]]))).numpy()
    assert pixels.shape == (2, 3, SIZE, SIZE) and pixels.dtype == np.float32
    for c in range(3):
        np.testing.assert_allclose(pixels[:, c], expected[c], atol=1e-5)
    # blur keeps a constant image constant; grayscale makes it the grey of the colour
    t_gray = _transform(tok, color_jitter_prob=0.0, grayscale_prob=1.0, blur_prob=1.0)
    v = t_gray(s)
    assert v["image_view1_photometric"][9] == 1.0 and v["image_view1_photometric"][10] > 0  # grey and blur drawn
    gray = (0.299 * 200 + 0.587 * 100 + 0.114 * 50) / 255.0
    np.testing.assert_allclose(_finish(v["image_view1"], v["image_view1_photometric"]), gray, atol=1e-5)


def test_view_finisher_matches_eval_arithmetic():
    """Views without photometric draws are normalised on the device as evaluation and inference do
    on the host (ernievil2.data.preprocess); anything but uint8 NHWC is refused, naming the view."""
    from ernievil2.data.preprocess import normalize_batch

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (4, SIZE, SIZE, 3), dtype=np.uint8)
    np.testing.assert_allclose(ViewFinisher()(paddle.to_tensor(pixels)).numpy(), normalize_batch(pixels),
                               rtol=0, atol=1e-6)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    got = ViewFinisher(mean, std)(paddle.to_tensor(pixels)).numpy()
    assert got.shape == (4, 3, SIZE, SIZE) and got.dtype == np.float32
    np.testing.assert_allclose(got, (pixels / 255.0 - mean).transpose(0, 3, 1, 2) / np.reshape(std, (1, 3, 1, 1)),
                               atol=1e-5)
    with pytest.raises(TypeError, match="image_view1: expected RGB uint8"):
        ViewFinisher()(paddle.to_tensor(pixels.astype(np.float32)), name="image_view1")
    with pytest.raises(TypeError, match="uint8 pixels"):
        ViewFinisher()(paddle.to_tensor(pixels.transpose(0, 3, 1, 2).copy()))
    with pytest.raises(ValueError, match=r"draws must be \[4, 12\]"):
        ViewFinisher()(paddle.to_tensor(pixels), np.zeros((4, 11), np.float32))


def _reference_photometric(img: np.ndarray, params: np.ndarray) -> np.ndarray:
    """The photometric part written plainly on the host with OpenCV (float64 [0, 1] HWC in and out):
    torchvision's ColorJitter formulas clipped after each step, hue through cv2's HSV, then grey,
    then cv2.GaussianBlur."""
    x = img.astype(np.float32) / 255.0

    def grey(y: np.ndarray) -> np.ndarray:
        return cv2.cvtColor(y, cv2.COLOR_RGB2GRAY)

    if params[0] > 0.5:
        for op in params[1:5].astype(int):
            f = float(params[5 + op])
            if op == 0:
                x = x * f
            elif op == 1:
                x = x * f + (1 - f) * float(grey(x).mean())
            elif op == 2:
                x = x * f + (1 - f) * grey(x)[..., None]
            else:
                hsv = cv2.cvtColor(x, cv2.COLOR_RGB2HSV)
                hsv[..., 0] = np.mod(hsv[..., 0] + f * 360.0, 360.0)
                x = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
            x = np.clip(x, 0.0, 1.0).astype(np.float32)
    if params[9] > 0.5:
        x = cv2.cvtColor(grey(x), cv2.COLOR_GRAY2RGB)
    if params[10] > 0:
        k = int(params[11])
        x = cv2.GaussianBlur(x, (k, k), sigmaX=float(params[10]), sigmaY=float(params[10]))
    return x.astype(np.float64)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_photometric_on_device_matches_opencv_reference(tok, dtype):
    """A batch of SimCLR views finished on the device equals each view's photometric part done
    with OpenCV on the host, for the transform's own draws (all four jitter orders, grey, blur)."""
    t = _transform(tok, color_jitter=(0.4, 0.4, 0.4, 0.1), color_jitter_prob=0.8, grayscale_prob=0.3, blur_prob=0.5)
    views, draws = [], []
    for i in range(24):
        s = RawSample(key=f"k{i}", image=_encode(_textured(seed=i)), captions=["a"])
        out = t(s, epoch=i)
        for v in ("image_view1", "image_view2"):
            views.append(out[v])
            draws.append(out[v + "_photometric"])
    draws = np.stack(draws)
    assert {0.0, 1.0} <= set(draws[:, 0]) and {0.0, 1.0} <= set(draws[:, 9]) and (draws[:, 10] == 0).any()
    previous = paddle.get_default_dtype()
    paddle.set_default_dtype(dtype)
    try:
        got = ViewFinisher(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))(
            paddle.to_tensor(np.stack(views)), paddle.to_tensor(draws)).numpy().transpose(0, 2, 3, 1)
    finally:
        paddle.set_default_dtype(previous)
    for i, (view, params) in enumerate(zip(views, draws)):
        want = _reference_photometric(view, params)
        np.testing.assert_allclose(got[i], want, rtol=0, atol=2e-5, err_msg=f"view {i}, draws {params}")
    assert np.abs(got - np.stack(views) / 255.0).mean() > 0.01  # the draws did change the views


def test_gaussian_kernels_match_opencv():
    for sigma in (0.1, 0.7, 2.0):
        np.testing.assert_allclose(gaussian_kernels(np.array([sigma]), 5)[0],
                                   cv2.getGaussianKernel(5, sigma, cv2.CV_64F).ravel(), atol=1e-12)
    np.testing.assert_array_equal(gaussian_kernels(np.array([0.0]), 3)[0], [0.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="odd"):
        gaussian_kernels(np.array([1.0]), 4)


def test_grayscale_and_jitter_effects(tok, sample):
    t = _transform(tok, color_jitter_prob=0.0, grayscale_prob=1.0, blur_prob=0.0)
    out = t(sample)
    raw = _finish(out["image_view2"], out["image_view2_photometric"])
    np.testing.assert_allclose(raw[..., 0], raw[..., 1], atol=1e-6)
    np.testing.assert_allclose(raw[..., 1], raw[..., 2], atol=1e-6)
    # with jitter always on, the SimCLR view's colours differ from the plain crop of the same box
    plain = _transform(tok, color_jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0)(sample)
    jit = _transform(tok, color_jitter_prob=1.0, grayscale_prob=0.0, blur_prob=0.0)(sample)
    np.testing.assert_array_equal(plain["image_view1"], jit["image_view1"])  # same crop: the draws are separate
    assert np.abs(_finish(plain["image_view1"], plain["image_view1_photometric"])
                  - _finish(jit["image_view1"], jit["image_view1_photometric"])).mean() > 0.01


def test_random_resized_crop_box_bounds():
    rng = np.random.default_rng(0)
    areas = []
    for _ in range(300):
        top, left, h, w = random_resized_crop_box(rng, 100, 150, (0.08, 1.0))
        assert 0 <= top and top + h <= 100 and 0 <= left and left + w <= 150 and h > 0 and w > 0
        areas.append(h * w / (100 * 150))
    assert 0.05 < min(areas) < 0.2 and max(areas) > 0.8
    # impossible ratios fall back to a centre crop with the ratio clamped
    assert random_resized_crop_box(rng, 10, 1000, (0.99, 1.0), (1.0, 1.0)) == (0, 495, 10, 10)
    assert random_resized_crop_box(rng, 1, 1, (0.5, 1.0)) == (0, 0, 1, 1)


def test_blur_kernel_scales_with_size(tok):
    assert MultiViewTransform(ViewConfig(image_size=224), tok).blur_kernel == 5
    assert MultiViewTransform(ViewConfig(image_size=64), tok).blur_kernel == 3
    assert MultiViewTransform(ViewConfig(image_size=448), tok).blur_kernel == 11


def test_decode_variants():
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[..., 0] = 255  # pure red
    dec = decode_rgb(_encode(rgb))
    assert dec.shape == (20, 30, 3) and (dec[..., 0] == 255).all() and (dec[..., 1:] == 0).all()

    gray = np.full((25, 35), 77, np.uint8)
    dec = decode_rgb(_encode(gray, ".jpg"))
    assert dec.shape == (25, 35, 3) and np.abs(dec.astype(int) - 77).max() <= 2

    bgra = np.zeros((16, 12, 4), np.uint8)
    bgra[..., 1] = 200  # green, half transparent
    bgra[..., 3] = 128
    ok, buf = cv2.imencode(".png", bgra)
    dec = decode_rgb(buf.tobytes())
    assert dec.shape == (16, 12, 3) and (dec[..., 1] == 200).all()


def test_undecodable_image_names_key(tok):
    t = _transform(tok)
    for data in (b"definitely not an image", b""):
        with pytest.raises(ValueError, match="broken/key-42"):
            t(RawSample(key="broken/key-42", image=data, captions=["a dog"]))


# --------------------------------------------------------------------------- texts
def test_text_view_is_another_caption(tok, sample):
    encoded = {tuple(tok(c, max_length=16)[0]) for c in sample.captions}
    t = _transform(tok)
    pairs = set()
    for epoch in range(30):
        out = t(sample, epoch=epoch)
        cap, view = tuple(out["caption_ids"]), tuple(out["text_view_ids"])
        assert cap in encoded and view in encoded and cap != view
        pairs.add((cap, view))
    assert len(pairs) >= 4  # several (caption, other caption) combinations occur


def test_single_caption_token_augmentation(tok):
    s = RawSample(key="one", image=b"", captions=["a little girl climbing the stairs to her playhouse"])
    base = tok.encode(s.captions[0], 16)
    n_pieces = len(base) - 2
    t_mask = MultiViewTransform(
        ViewConfig(text_mask_prob=1.0, text_delete_prob=0.0, text_swap_prob=0.0), tok, max_length=16,
        views=["caption_ids", "text_view_ids"],
    )
    out = t_mask(s)
    np.testing.assert_array_equal(out["caption_ids"], tok.pad([base], 16)[0])
    view = out["text_view_ids"]
    assert view[0] == tok.cls_id and view[n_pieces + 1] == tok.sep_id
    assert (view[1 : n_pieces + 1] == tok.mask_id).all() and (view[n_pieces + 2 :] == tok.pad_id).all()

    t_del = MultiViewTransform(
        ViewConfig(text_mask_prob=0.0, text_delete_prob=0.5, text_swap_prob=0.0), tok, max_length=16,
        views=["text_view_ids"],
    )
    lengths = []
    for epoch in range(40):
        v = t_del(s, epoch=epoch)["text_view_ids"]
        ids = v[v != tok.pad_id].tolist()
        assert ids[0] == tok.cls_id and ids[-1] == tok.sep_id and len(ids) >= 3
        kept = ids[1:-1]
        assert all(i in base[1:-1] for i in kept)
        lengths.append(len(kept))
    assert max(lengths) <= n_pieces and np.mean(lengths) < n_pieces - 1


def test_augment_text_ids_rules():
    rng = np.random.default_rng(0)
    ids = [1, 10, 11, 12, 13, 14, 2]
    assert augment_text_ids(ids, rng, mask_id=3, mask_prob=0, delete_prob=0, swap_prob=1.0) == [1, 11, 10, 13, 12, 14, 2]
    for _ in range(20):
        out = augment_text_ids(ids, rng, mask_id=3, mask_prob=0, delete_prob=1.0, swap_prob=0)
        assert len(out) == 3 and out[1] in ids[1:-1]  # never empty
    assert augment_text_ids(ids, rng, mask_id=3, mask_prob=1.0, delete_prob=0, swap_prob=0) == [1, 3, 3, 3, 3, 3, 2]
    assert augment_text_ids([1, 2], rng, mask_id=3) == [1, 2]
    assert augment_text_ids(ids, rng, mask_id=3, mask_prob=0, delete_prob=0, swap_prob=0) == ids


def test_objects_text_and_masking(tok):
    assert objects_text(["dog", "cat", "dog", " ", "cat "], "en") == "the picture contains dog, cat"
    assert objects_text(["狗", "猫", "狗"], "zh") == "图中有狗、猫"
    assert objects_text(["狗", "猫"], "zh-CN") == "图中有狗、猫"
    assert objects_text(None, "en") is None and objects_text([], "zh") is None and objects_text([""], "en") is None
    assert objects_text(["a"], "fr", {"en": "x {objects}"}, {"en": ";"}) == "x a"

    t = MultiViewTransform(ViewConfig(), tok, max_length=16, views=["objects_ids"])
    for objs in (None, []):
        out = t(RawSample(key="n", image=b"", captions=["a dog"], objects=objs))
        assert float(out["has_objects"]) == 0.0
        assert (out["objects_ids"] == tok.pad_id).all() and out["objects_ids"].shape == (16,)
    zh = t(RawSample(key="z", image=b"", captions=["狗"], objects=["狗", "猫", "狗"], lang="zh"))
    assert float(zh["has_objects"]) == 1.0
    np.testing.assert_array_equal(zh["objects_ids"], tok("图中有狗、猫", max_length=16)[0])
    assert tok.token_to_id("、") in zh["objects_ids"]
    with pytest.raises(ValueError, match="objects"):
        MultiViewTransform(ViewConfig(objects_templates={"en": "no placeholder"}), tok)


# --------------------------------------------------------------------------- real images
def test_real_images(tok, flickr8k_dir: Path, coco_mini_dir: Path):
    rec_f = json.loads((flickr8k_dir / "captions.jsonl").read_text(encoding="utf-8").splitlines()[0])
    rec_c = json.loads((coco_mini_dir / "captions.jsonl").read_text(encoding="utf-8").splitlines()[0])
    samples = [
        RawSample(key=rec_f["image_id"], image=(flickr8k_dir / rec_f["image"]).read_bytes(),
                  captions=rec_f["captions_zh"], lang="zh"),
        RawSample(key=str(rec_c["image_id"]), image=(coco_mini_dir / rec_c["image"]).read_bytes(),
                  captions=rec_c["captions_en"], objects=[o["name"] for o in rec_c["objects"]]),
    ]
    t = MultiViewTransform(ViewConfig(), tok)
    for s in samples:
        out = t(s)
        for k in ("image", "image_view1", "image_view2"):
            assert out[k].shape == (224, 224, 3) and out[k].dtype == np.uint8
        assert _diff(out["image"], out["image_view1"]) > 3
        e = preprocess(s.image, size=224)
        assert e.shape == (3, 224, 224) and -2.2 < e.min() < e.max() < 2.7
    assert float(t(samples[0])["has_objects"]) == 0.0 and float(t(samples[1])["has_objects"]) == 1.0


def test_objects_tag_keys_and_picking(tok):
    """The transform ships the keys of all the sample's tags and of the tags its text names; equal
    tags have equal keys; no tags is all 0. ``objects_pick=one`` names one tag per sample and epoch,
    ``objects_tag_dropout`` a non-empty subset."""
    assert tag_key(" star") == tag_key("star") > 0 and tag_key("star") != tag_key("circle")
    t = MultiViewTransform(ViewConfig(), tok, views=["objects"])
    a = t(RawSample(key="a", image=b"", captions=["x"], objects=["star", "circle", "star"]))
    none = t(RawSample(key="c", image=b"", captions=["z"], objects=[]))
    assert a["objects_tags"].dtype == np.int64 and a["objects_tags"].shape == (16,)
    assert list(a["objects_tags"][:3]) == [tag_key("star"), tag_key("circle"), 0]
    np.testing.assert_array_equal(a["objects_text_tags"], a["objects_tags"])
    assert not none["objects_tags"].any() and not none["objects_text_tags"].any()
    tags = ["star", "circle", "square"]
    one = MultiViewTransform(ViewConfig(objects_pick="one"), tok, views=["objects"], seed=1)
    picked = set()
    for epoch in range(12):
        out = one(RawSample(key="p", image=b"", captions=["x"], objects=tags), epoch=epoch)
        named = [k for k in out["objects_text_tags"] if k]
        assert len(named) == 1 and set(out["objects_tags"][:3]) == {tag_key(x) for x in tags}
        picked.add(int(named[0]))
        word = tok.decode(out["objects_ids"]) if hasattr(tok, "decode") else None
        assert word is None or any(x in word for x in tags)
    assert picked == {tag_key(x) for x in tags}
    drop = MultiViewTransform(ViewConfig(objects_tag_dropout=0.5), tok, views=["objects"], seed=1)
    sizes = {sum(1 for k in drop(RawSample(key="p", image=b"", captions=["x"], objects=tags), epoch=e)
                 ["objects_text_tags"] if k) for e in range(20)}
    assert sizes <= {1, 2, 3} and len(sizes) > 1
    with pytest.raises(ValueError, match="objects_pick"):
        MultiViewTransform(ViewConfig(objects_pick="two"), tok)
