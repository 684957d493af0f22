"""Image preprocessing for evaluation, inference, search and export: the one module that
resizes, centre-crops and normalises an image outside training, under one of two profiles,
``official`` (the default everywhere) and ``paddlenlp``.

Both turn encoded image bytes into a float32 ``[3, S, S]`` array normalised with the ImageNet
mean/std; they differ in decoder, resampling filter, resize rule and crop rounding, so embeddings
(and recalls) computed with one profile are only comparable with the same profile.

``official`` — the upstream ERNIE-ViL 2.0 release (``ernievil2/utils/preprocess_image.py``, test mode):

* decode with OpenCV (``IMREAD_COLOR``), BGR → RGB;
* if the short side already equals ``S`` the image is kept as is (no resampling); otherwise the
  short side becomes ``S`` and the long side ``int(S / short * long) + 1``, bilinear
  (``cv2.INTER_LINEAR``). A square image counts its *height* as the short side (it becomes
  ``S`` high and ``S + 1`` wide), exactly like the upstream release's ``w < h`` test;
* centre crop at ``top = ceil((h - S) / 2)``, ``left = ceil((w - S) / 2)``;
* ``x / 255`` in float32, then ``(x - mean) / std`` with float64 mean/std written back to float32.

``paddlenlp`` — PaddleNLP 2.8.1 ``ErnieViLImageProcessor`` (the processor behind
``ErnieViLProcessor``):

* decode with PIL, ``convert("RGB")``;
* short side → ``S``, long side ``int(S * long / short)`` (``get_resize_output_image_size`` with
  ``default_to_square=False``; a square image stays square), PIL bicubic;
* centre crop at ``top = (h - S) // 2``, ``left = (w - S) // 2`` (PaddleNLP's numpy
  ``center_crop``; floor, *not* torchvision's ``int(round(...))``);
* ``x * (1/255)`` (float64 → float32), then ``(x - mean) / std`` in float32.

Shapes follow NumPy: ``h`` is the number of rows, ``w`` the number of columns.
"""
from __future__ import annotations

import io
import math
import warnings

import cv2
import numpy as np

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "PROFILES", "preprocess", "decode", "resize_dims", "crop_offsets",
           "resize_crop", "normalize", "normalize_batch", "check_profile"]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
PROFILES: tuple[str, ...] = ("official", "paddlenlp")

_MEAN64 = np.asarray(IMAGENET_MEAN, dtype=np.float64).reshape(3, 1, 1)
_STD64 = np.asarray(IMAGENET_STD, dtype=np.float64).reshape(3, 1, 1)
_MEAN32 = _MEAN64.astype(np.float32)
_STD32 = _STD64.astype(np.float32)


def check_profile(profile: str) -> str:
    """``profile`` when it is one of :data:`PROFILES`, else ``ValueError`` naming the choices."""
    if profile not in PROFILES:
        raise ValueError(f"unknown preprocessing profile {profile!r}; choose one of {list(PROFILES)}")
    return profile


def _check_size(size: int) -> int:
    size = int(size)
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    return size


def resize_dims(h: int, w: int, size: int = 224, profile: str = "official") -> tuple[int, int]:
    """``(new_h, new_w)`` the profile resizes an ``h × w`` image to before the centre crop."""
    check_profile(profile)
    s = _check_size(size)
    if h < 1 or w < 1:
        raise ValueError(f"image dims must be positive, got {h}x{w}")
    if profile == "official":
        if (w <= h and w == s) or (h <= w and h == s):
            return h, w
        if w < h:
            return int(float(s) / w * h) + 1, s
        return s, int(float(s) / h * w) + 1
    # paddlenlp: get_resize_output_image_size(size=s, default_to_square=False)
    if w <= h:
        return int(s * h / w), s
    return s, int(s * w / h)


def crop_offsets(h: int, w: int, size: int = 224, profile: str = "official") -> tuple[int, int]:
    """``(top, left)`` of the ``size × size`` centre crop of an ``h × w`` (already resized) image."""
    check_profile(profile)
    s = _check_size(size)
    if h < s or w < s:
        raise ValueError(f"cannot centre-crop {s}x{s} out of a {h}x{w} image")
    if profile == "official":
        return math.ceil((h - s) / 2.0), math.ceil((w - s) / 2.0)
    return (h - s) // 2, (w - s) // 2


def decode(image_bytes: bytes, profile: str = "official", key: str = "?") -> np.ndarray:
    """Decode to an RGB uint8 ``[H, W, 3]`` array with the profile's decoder.

    Raises ``ValueError`` naming ``key`` when the bytes are not a decodable image.
    """
    check_profile(profile)
    n = len(image_bytes) if image_bytes else 0
    if profile == "official":
        img = None
        if n:
            try:
                img = cv2.imdecode(np.frombuffer(image_bytes, dtype=np.uint8), cv2.IMREAD_COLOR)
            except cv2.error:
                img = None
        if img is None or img.ndim != 3 or img.shape[0] == 0 or img.shape[1] == 0:
            raise ValueError(f"cannot decode image {key!r} ({n} bytes) with OpenCV")
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(image_bytes or b"")) as im:
                arr = np.array(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot decode image {key!r} ({n} bytes) with PIL: {exc}") from None
    if arr.ndim != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"cannot decode image {key!r} ({n} bytes) with PIL: empty image")
    return arr


def resize_crop(img: np.ndarray, size: int = 224, profile: str = "official") -> np.ndarray:
    """Resize + centre crop an RGB uint8 ``[H, W, 3]`` image into uint8 ``[S, S, 3]``."""
    s = _check_size(size)
    h, w = img.shape[:2]
    nh, nw = resize_dims(h, w, s, profile)
    if profile == "official":
        if (nh, nw) != (h, w):
            img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)
    else:
        from PIL import Image

        img = np.asarray(Image.fromarray(np.ascontiguousarray(img)).resize((nw, nh), resample=Image.BICUBIC))
    top, left = crop_offsets(nh, nw, s, profile)
    return img[top : top + s, left : left + s]


def normalize(img: np.ndarray, profile: str = "official") -> np.ndarray:
    """uint8 HWC → float32 CHW: scale to [0, 1], subtract the ImageNet mean, divide by the std,
    with the arithmetic (dtypes, order) of the profile's reference implementation."""
    check_profile(profile)
    chw = np.ascontiguousarray(img.transpose(2, 0, 1))
    if profile == "official":
        x = chw.astype(np.float32) / np.float32(255)
        x = (x - _MEAN64).astype(np.float32)
        return np.ascontiguousarray((x / _STD64).astype(np.float32))
    x = (chw * (1 / 255)).astype(np.float32)
    return np.ascontiguousarray((x - _MEAN32) / _STD32)


def normalize_batch(crops: np.ndarray, profile: str = "official") -> np.ndarray:
    """uint8 ``[N, S, S, 3]`` crops (from :func:`resize_crop`) → float32 ``[N, 3, S, S]``, each
    exactly as :func:`normalize`."""
    if len(crops) == 0:
        check_profile(profile)
        return np.empty((0, 3, *crops.shape[1:3]), dtype=np.float32)
    return np.stack([normalize(c, profile) for c in crops])


def preprocess(image_bytes: bytes, profile: str = "official", size: int = 224, key: str = "?") -> np.ndarray:
    """Encoded image bytes → float32 ``[3, size, size]`` under ``profile`` (``official`` or
    ``paddlenlp``). Raises ``ValueError`` naming ``key`` when the bytes cannot be decoded."""
    check_profile(profile)
    return normalize(resize_crop(decode(image_bytes, profile, key), size, profile), profile)
