"""The device's share of the training views: the SimCLR views' photometric augmentation, then the
normalisation, batched where the model runs.

The loader worker (:class:`~ernievil2.data.views.MultiViewTransform`) decodes, crops and flips,
and draws every random number; it ships uint8 pixels and, for each SimCLR view, the draws of its
photometric part (:func:`~ernievil2.data.views.photometric_params`). :class:`ViewFinisher` turns a
batch of them into the model's input:

1. colour jitter (torchvision's ColorJitter semantics): four adjustments in the drawn order, each
   clipped to [0, 1]: brightness ``f x``; contrast ``f x + (1 - f) mean(grey)``; saturation
   ``f x + (1 - f) grey``; hue, a rotation of H in HSV by the drawn fraction of a turn;
2. grayscale (grey in all three channels), grey being OpenCV's ``0.299 R + 0.587 G + 0.114 B``;
3. Gaussian blur with the drawn sigma and the configured kernel, borders reflected without the
   edge pixel (OpenCV's default ``BORDER_REFLECT_101``), as ``cv2.GaussianBlur``;
4. ``(x - mean) / std``.

A view whose draws turn a step off gets that step as the identity (factor 1, hue 0, sigma 0): the
batch runs every step it needs once, for all its images.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import paddle
import paddle.nn.functional as F

from ernievil2.data.views import IMAGENET_MEAN, IMAGENET_STD, PHOTOMETRIC_PARAMS, _scale_shift

__all__ = ["ViewFinisher", "apply_photometric", "gaussian_kernels"]

_GREY = (0.299, 0.587, 0.114)  # OpenCV's RGB -> grey weights (ITU-R BT.601)


def _grey(x: paddle.Tensor) -> paddle.Tensor:
    """``[N, 1, H, W]`` grey of RGB ``[N, 3, H, W]``."""
    return _GREY[0] * x[:, 0:1] + _GREY[1] * x[:, 1:2] + _GREY[2] * x[:, 2:3]


def _rotate_hue(x: paddle.Tensor, turns: paddle.Tensor) -> paddle.Tensor:
    """Rotate the hue of RGB ``[N, 3, H, W]`` in [0, 1] by ``turns`` ``[N]`` (RGB -> HSV -> RGB)."""
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    v = paddle.max(x, axis=1)
    delta = v - paddle.min(x, axis=1)
    s = paddle.where(v > 0, delta / paddle.where(v > 0, v, paddle.ones_like(v)), paddle.zeros_like(v))
    d = paddle.where(delta > 0, delta, paddle.ones_like(delta))
    rc, gc, bc = (v - r) / d, (v - g) / d, (v - b) / d
    h = paddle.where(v == r, bc - gc, paddle.where(v == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = paddle.where(delta > 0, h, paddle.zeros_like(h)) / 6.0
    h = paddle.remainder(h + turns.reshape([-1, 1, 1]), paddle.ones_like(h)) * 6.0
    sector = paddle.floor(h)
    frac = h - sector
    sector = paddle.remainder(sector, paddle.full_like(sector, 6.0))
    p, q, t = v * (1 - s), v * (1 - s * frac), v * (1 - s * (1 - frac))
    # (R, G, B) per hue sector 0..5
    table = ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))
    out = []
    for channel in range(3):
        c = table[5][channel]
        for k in range(4, -1, -1):
            c = paddle.where(sector == k, table[k][channel], c)
        out.append(c)
    return paddle.stack(out, axis=1)


def gaussian_kernels(sigmas: np.ndarray, size: int) -> np.ndarray:
    """``[N, size]`` normalised 1-D Gaussian kernels (``cv2.getGaussianKernel``); sigma 0 gives the
    identity kernel (1 in the middle)."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"blur kernel size must be odd and >= 1, got {size}")
    offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2
    sig = np.asarray(sigmas, dtype=np.float64).reshape(-1, 1)
    safe = np.where(sig > 0, sig, 1.0)
    k = np.where(sig > 0, np.exp(-(offsets**2) / (2 * safe**2)), (offsets == 0).astype(np.float64))
    return k / k.sum(axis=1, keepdims=True)


def _blur(x: paddle.Tensor, kernels: np.ndarray) -> paddle.Tensor:
    """Separable per-image blur of ``[N, 3, H, W]`` with ``kernels`` ``[N, k]`` (reflect-101 borders)."""
    n, c, h, w = x.shape
    size = kernels.shape[1]
    pad = size // 2
    weights = paddle.to_tensor(np.repeat(kernels, c, axis=0).astype(np.float32)).astype(x.dtype)  # [N*C, k]
    y = F.pad(x.reshape([1, n * c, h, w]), [pad, pad, pad, pad], mode="reflect")
    y = F.conv2d(y, weights.reshape([n * c, 1, size, 1]), groups=n * c)
    y = F.conv2d(y, weights.reshape([n * c, 1, 1, size]), groups=n * c)
    return y.reshape([n, c, h, w])


def apply_photometric(x: paddle.Tensor, params: paddle.Tensor | np.ndarray) -> paddle.Tensor:
    """The photometric part of SimCLR views: RGB ``[N, 3, H, W]`` in [0, 1] and their draws
    ``[N, 12]`` (:func:`~ernievil2.data.views.photometric_params`) -> ``[N, 3, H, W]`` in [0, 1]."""
    host = np.asarray(params.numpy() if isinstance(params, paddle.Tensor) else params, dtype=np.float64)
    if host.ndim != 2 or host.shape != (x.shape[0], PHOTOMETRIC_PARAMS):
        raise ValueError(f"photometric draws must be [{x.shape[0]}, {PHOTOMETRIC_PARAMS}], got {list(host.shape)}")
    dtype = x.dtype
    jitter = host[:, 0] > 0.5
    order = host[:, 1:5].astype(np.int64)
    factors = np.where(jitter[:, None], host[:, 5:9], [1.0, 1.0, 1.0, 0.0])

    def column(values: np.ndarray) -> paddle.Tensor:
        return paddle.to_tensor(values.reshape(-1, 1, 1, 1).astype(np.float32)).astype(dtype)

    if jitter.any():
        for position in range(4):
            op = order[:, position]
            # brightness, contrast and saturation all blend x with a grey level: 0, the mean grey, the grey
            f = np.where(op == 3, 1.0, factors[np.arange(len(op)), np.minimum(op, 2)])
            f = np.where(jitter, f, 1.0)
            if (f != 1.0).any():
                grey = _grey(x)
                target = paddle.where(column(op == 1) > 0, grey.mean(axis=[2, 3], keepdim=True), grey)
                target = target * column(op != 0)
                x = paddle.clip(column(f) * x + column(1.0 - f) * target, 0.0, 1.0)
            turns = np.where(jitter & (op == 3), factors[:, 3], 0.0)
            if (turns != 0).any():
                rotated = paddle.clip(_rotate_hue(x, paddle.to_tensor(turns.astype(np.float32)).astype(dtype)), 0.0, 1.0)
                x = paddle.where(column(turns != 0) > 0, rotated, x)
    grey_views = host[:, 9] > 0.5
    if grey_views.any():
        x = paddle.where(column(grey_views) > 0, _grey(x).expand_as(x), x)
    sigmas = host[:, 10]
    if (sigmas > 0).any():
        x = _blur(x, gaussian_kernels(sigmas, int(host[0, 11])))
    return x


class ViewFinisher:
    """Training image views from the loader -> the model's input, on the current device.

    ``pixels``: RGB uint8 ``[N, S, S, 3]``; ``photometric`` (SimCLR views): their ``[N, 12]``
    draws. Returns ``[N, 3, S, S]`` in paddle's default float dtype: the photometric part applied
    (:func:`apply_photometric`), then ``(x - mean) / std``. Views without draws are normalised with
    the eval transform's arithmetic (``x * scale + shift``, float32 constants).
    """

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.scale, self.shift = _scale_shift(mean, std)

    def __call__(self, pixels: paddle.Tensor, photometric: paddle.Tensor | np.ndarray | None = None,
                 name: str = "image") -> paddle.Tensor:
        if pixels.dtype != paddle.uint8 or pixels.ndim != 4 or pixels.shape[-1] != 3:
            raise TypeError(f"{name}: expected RGB uint8 pixels [N, S, S, 3] (MultiViewTransform's views), "
                            f"got {pixels.dtype} {list(pixels.shape)}")
        device = paddle.get_device()
        if device != "cpu":
            pixels = pixels.to(device)
        dtype = paddle.get_default_dtype()
        x = pixels.transpose([0, 3, 1, 2]).astype(dtype)
        scale = self.scale.reshape(1, 3, 1, 1)
        shift = paddle.to_tensor(self.shift.reshape(1, 3, 1, 1)).astype(dtype)
        if photometric is None:
            return x * paddle.to_tensor(scale).astype(dtype) + shift
        x = apply_photometric(x * (1.0 / 255.0), photometric)
        return x * paddle.to_tensor(scale * 255.0).astype(dtype) + shift
