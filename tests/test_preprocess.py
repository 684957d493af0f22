"""Preprocessing profiles (official inference and PaddleNLP processor) against hand-computed resize dims, crop offsets and pixels."""
from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
from PIL import Image

from ernievil2.data.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    crop_offsets,
    decode,
    normalize,
    preprocess,
    resize_crop,
    resize_dims,
)

NEEDS_PADDLENLP = "needs paddlenlp (the paddlenlp extra: pip install -e '.[paddlenlp]')"

MEAN = np.asarray(IMAGENET_MEAN).reshape(3, 1, 1)
STD = np.asarray(IMAGENET_STD).reshape(3, 1, 1)


def png(rgb: np.ndarray) -> bytes:
    """Lossless encoding, so decoded pixels equal ``rgb`` exactly."""
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return buf.tobytes()


def denormalize(x: np.ndarray) -> np.ndarray:
    """Back to uint8 HWC (exact for the float32 arithmetic of both profiles)."""
    return np.rint((x * STD + MEAN) * 255).astype(np.int64).transpose(1, 2, 0)


def coordinate_image(h: int, w: int) -> np.ndarray:
    """R = column mod 256, G = column // 256, B = row mod 256: a pixel says where it came from."""
    rows, cols = np.mgrid[0:h, 0:w]
    return np.stack([cols % 256, cols // 256, rows % 256], axis=-1).astype(np.uint8)


def noise_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# (h, w, size) -> (resized h, resized w), (top, left), worked out by hand from the upstream preprocess_image.py.
OFFICIAL = {
    # landscape: short side h=200 -> 224; long side int(224 / 200 * 301) + 1 = int(337.12) + 1 = 338
    (200, 301, 224): ((224, 338), (0, 57)),  # left = ceil((338 - 224) / 2) = 57
    (301, 200, 224): ((338, 224), (57, 0)),  # portrait, mirrored
    (224, 224, 224): ((224, 224), (0, 0)),  # short side already S: kept, no resampling
    (224, 300, 224): ((224, 300), (0, 38)),  # short side already S: kept; left = ceil(76 / 2) = 38
    (224, 227, 224): ((224, 227), (0, 2)),  # kept; left = ceil(3 / 2) = 2 (ceil, not floor)
    # int(224 / 225 * 300) + 1 = int(298.67) + 1 = 299; left = ceil(75 / 2) = 38
    (225, 300, 224): ((224, 299), (0, 38)),
    # upscaling: int(224 / 50 * 80) + 1 = int(358.4) + 1 = 359; left = ceil(135 / 2) = 68
    (50, 80, 224): ((224, 359), (0, 68)),
    (80, 50, 224): ((359, 224), (68, 0)),
    # a square counts its height as the short side: 224 high, int(224 / 300 * 300) + 1 = 225 wide
    (300, 300, 224): ((224, 225), (0, 1)),
    # odd output size: int(63 / 100 * 150) + 1 = int(94.5) + 1 = 95; left = ceil(32 / 2) = 16
    (100, 150, 63): ((63, 95), (0, 16)),
    (150, 100, 63): ((95, 63), (16, 0)),
}
PADDLENLP = {
    # int(224 * 301 / 200) = int(337.12) = 337; left = (337 - 224) // 2 = 56
    (200, 301, 224): ((224, 337), (0, 56)),
    (301, 200, 224): ((337, 224), (56, 0)),
    (224, 224, 224): ((224, 224), (0, 0)),
    (224, 300, 224): ((224, 300), (0, 38)),  # (300 - 224) // 2 = 38
    (224, 227, 224): ((224, 227), (0, 1)),  # (227 - 224) // 2 = 1 (floor; round(1.5) would give 2)
    (225, 300, 224): ((224, 298), (0, 37)),  # int(224 * 300 / 225) = int(298.67) = 298; 74 // 2 = 37
    (50, 80, 224): ((224, 358), (0, 67)),  # int(224 * 80 / 50) = int(358.4) = 358; 134 // 2 = 67
    (80, 50, 224): ((358, 224), (67, 0)),
    (300, 300, 224): ((224, 224), (0, 0)),  # a square stays square
    (100, 150, 63): ((63, 94), (0, 15)),  # int(63 * 150 / 100) = int(94.5) = 94; 31 // 2 = 15
    (150, 100, 63): ((94, 63), (15, 0)),
}
CASES = [("official", k, v) for k, v in OFFICIAL.items()] + [("paddlenlp", k, v) for k, v in PADDLENLP.items()]
IDS = [f"{p}-{h}x{w}-S{s}" for p, (h, w, s), _ in CASES]


@pytest.mark.parametrize("profile,hws,expected", CASES, ids=IDS)
def test_resize_dims_and_crop_offsets(profile, hws, expected):
    h, w, size = hws
    dims, offsets = expected
    assert resize_dims(h, w, size, profile) == dims
    assert crop_offsets(*dims, size, profile) == offsets


@pytest.mark.parametrize("profile,hws,expected", CASES, ids=IDS)
def test_pixels_come_from_the_expected_window(profile, hws, expected):
    """Full pipeline on a noise image equals resize-to-the-hand-computed-dims + slice at the
    hand-computed offsets, and a window moved by one pixel does not (the check is sensitive)."""
    h, w, size = hws
    (nh, nw), (top, left) = expected
    img = noise_image(h, w)
    out = preprocess(png(img), profile, size)
    assert out.shape == (3, size, size) and out.dtype == np.float32 and out.flags.c_contiguous

    if (nh, nw) == (h, w):
        resized = img
    elif profile == "official":
        resized = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)
    else:
        resized = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BICUBIC))
    assert resized.shape[:2] == (nh, nw)
    got = denormalize(out)
    np.testing.assert_array_equal(got, resized[top : top + size, left : left + size])
    for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0)):
        y, x = top + dy, left + dx
        if 0 <= y <= nh - size and 0 <= x <= nw - size:
            assert not np.array_equal(got, resized[y : y + size, x : x + size])


@pytest.mark.parametrize("profile", ["official", "paddlenlp"])
@pytest.mark.parametrize("h,w", [(224, 300), (300, 224), (224, 227), (227, 224), (224, 224)])
def test_crop_window_by_coordinates(profile, h, w):
    """Without resampling (short side already 224) every output pixel names its source pixel."""
    size = 224
    out = denormalize(preprocess(png(coordinate_image(h, w)), profile, size))
    top, left = crop_offsets(h, w, size, profile)
    cols = out[..., 0] + 256 * out[..., 1]
    rows = out[..., 2]
    np.testing.assert_array_equal(cols, np.broadcast_to(np.arange(left, left + size), (size, size)))
    np.testing.assert_array_equal(rows, np.broadcast_to((np.arange(top, top + size) % 256)[:, None], (size, size)))
    # the hand-computed offsets for these shapes
    excess = max(h, w) - size
    expect = math.ceil(excess / 2) if profile == "official" else excess // 2
    assert (top, left) == ((expect, 0) if h > w else (0, expect))


def test_upscaled_gradient_stays_linear():
    """Bilinear (official) upscaling of a horizontal ramp: interior pixels follow the ramp at the
    source coordinate of their output column (OpenCV's half-pixel mapping) — the crop window is
    where the hand-computed offset says."""
    h, w, size = 50, 80, 224
    ramp = np.broadcast_to((np.arange(w) * 3).astype(np.uint8)[None, :, None], (h, w, 3)).copy()
    out = denormalize(preprocess(png(ramp), "official", size))
    (nh, nw), (top, left) = OFFICIAL[(h, w, size)]
    src_x = (np.arange(left, left + size) + 0.5) * (w / nw) - 0.5
    expected = 3 * src_x
    interior = (src_x > 0) & (src_x < w - 1)
    assert np.abs(out[size // 2, interior, 0] - expected[interior]).max() <= 1.0


@pytest.mark.parametrize("profile", ["official", "paddlenlp"])
@pytest.mark.parametrize("size", [224, 63])
def test_constant_image_normalisation(profile, size):
    value = np.array([200, 100, 30], dtype=np.uint8)
    img = np.broadcast_to(value, (90, 130, 3)).copy()
    out = preprocess(png(img), profile, size)
    assert out.shape == (3, size, size) and out.dtype == np.float32
    expected = (value / 255.0 - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD)
    for c in range(3):
        np.testing.assert_allclose(out[c], expected[c], atol=1e-6)


def test_normalize_matches_reference_arithmetic():
    """Official: float32 /255, then float64 mean/std written back to float32; PaddleNLP: float64
    rescale cast to float32, then float32 mean/std."""
    img = noise_image(7, 5, seed=3)
    chw = img.transpose(2, 0, 1)
    off = chw.astype(np.float32) / 255
    off -= MEAN  # in-place into float32, computed in float64 (as the upstream release does)
    off /= STD
    np.testing.assert_array_equal(normalize(img, "official"), off)
    pn = (chw * (1 / 255)).astype(np.float32)
    pn = (pn - MEAN.astype(np.float32)) / STD.astype(np.float32)
    np.testing.assert_array_equal(normalize(img, "paddlenlp"), pn)


def test_decoders_agree_on_lossless_and_grayscale_input():
    img = noise_image(33, 47, seed=1)
    np.testing.assert_array_equal(decode(png(img), "official"), img)
    np.testing.assert_array_equal(decode(png(img), "paddlenlp"), img)
    ok, buf = cv2.imencode(".png", img[..., 0])  # single channel → 3 equal channels
    for profile in ("official", "paddlenlp"):
        rgb = decode(buf.tobytes(), profile)
        assert rgb.shape == (33, 47, 3)
        np.testing.assert_array_equal(rgb[..., 1], img[..., 0])


@pytest.mark.parametrize("profile", ["official", "paddlenlp"])
@pytest.mark.parametrize("data", [b"", b"not an image", b"\xff\xd8\xff\xe0 truncated jpeg"])
def test_undecodable_bytes_name_the_key(profile, data):
    with pytest.raises(ValueError, match="img-42"):
        preprocess(data, profile, 224, key="img-42")


def test_bad_arguments():
    with pytest.raises(ValueError, match="profile"):
        preprocess(png(noise_image(10, 10)), "clip")
    with pytest.raises(ValueError, match="size"):
        resize_dims(10, 10, 0)
    with pytest.raises(ValueError, match="centre-crop"):
        crop_offsets(100, 300, 224)


def test_resize_crop_output_is_uint8_square():
    for profile in ("official", "paddlenlp"):
        out = resize_crop(noise_image(61, 97), 32, profile)
        assert out.shape == (32, 32, 3) and out.dtype == np.uint8


@pytest.mark.slow
def test_matches_paddlenlp_image_processor():
    """With the ``paddlenlp`` extra: bit-level agreement with ``ErnieViLImageProcessor``."""
    pnlp = pytest.importorskip("paddlenlp.transformers", reason=NEEDS_PADDLENLP)
    proc = pnlp.ErnieViLImageProcessor()
    for h, w in ((200, 301), (301, 200), (224, 227), (50, 80), (300, 300)):
        img = noise_image(h, w, seed=h * w)
        ref = proc(Image.fromarray(img), return_tensors="np")["pixel_values"][0]
        np.testing.assert_allclose(preprocess(png(img), "paddlenlp", 224), ref, atol=1e-6)
