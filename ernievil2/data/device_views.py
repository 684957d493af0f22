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

Each step runs only on the images whose draws turn it on, all of them at once.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import paddle
import paddle.nn.functional as F

from ernievil2.data.preprocess import IMAGENET_MEAN, IMAGENET_STD
from ernievil2.data.views import (
    IMAGE_VIEWS,
    PHOTOMETRIC_PARAMS,
    PHOTOMETRIC_SUFFIX,
)

__all__ = ["ViewFinisher", "apply_photometric", "gaussian_kernels"]

_GREY = (0.299, 0.587, 0.114)  # OpenCV's RGB -> grey weights (ITU-R BT.601)


def _grey(x: paddle.Tensor) -> paddle.Tensor:
    """``[N, 1, H, W]`` grey of RGB ``[N, 3, H, W]``."""
    return _GREY[0] * x[:, 0:1] + _GREY[1] * x[:, 1:2] + _GREY[2] * x[:, 2:3]


def _rotate_hue(x: paddle.Tensor, turns: paddle.Tensor) -> paddle.Tensor:
    """Rotate the hue of RGB ``[N, 3, H, W]`` in [0, 1] by ``turns`` ``[N]`` (RGB -> HSV -> RGB,
    the hue in sixths of a turn; the way back is the branch-free form of the HSV sectors)."""
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    v = paddle.max(x, axis=1)
    chroma = v - paddle.min(x, axis=1)
    grey = chroma <= 0
    safe = paddle.where(grey, paddle.ones_like(chroma), chroma)
    h = paddle.where(v == r, (g - b) / safe, paddle.where(v == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    h = paddle.where(grey, paddle.zeros_like(h), h) + 6.0 * turns.reshape([-1, 1, 1])
    six = paddle.full_like(h, 6.0)
    # channel = v - chroma * clip(min(k, 4 - k), 0, 1), k = (n + h) mod 6 with n = 5, 3, 1 for R, G, B
    out = []
    for n in (5.0, 3.0, 1.0):
        k = paddle.remainder(h + n, six)
        out.append(v - chroma * paddle.clip(paddle.minimum(k, 4.0 - k), 0.0, 1.0))
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


def _rows(x: paddle.Tensor, rows: np.ndarray) -> paddle.Tensor:
    return x if len(rows) == x.shape[0] else paddle.gather(x, paddle.to_tensor(rows), axis=0)


def _put(x: paddle.Tensor, rows: np.ndarray, values: paddle.Tensor) -> paddle.Tensor:
    return values if len(rows) == x.shape[0] else paddle.scatter(x, paddle.to_tensor(rows), values, overwrite=True)


def _blend(x: paddle.Tensor, op: np.ndarray, f: np.ndarray) -> paddle.Tensor:
    """Brightness (op 0), contrast (1) or saturation (2) with factors ``f``, one per image of ``x``
    ``[m, 3, H, W]``, as a per-image colour matrix and offset, clipped to [0, 1]."""
    m, c, h, w = x.shape
    grey = np.asarray(_GREY)
    mats = f[:, None, None] * np.eye(3)[None] + ((1 - f) * (op == 2))[:, None, None] * np.tile(grey, (3, 1))[None]
    y = paddle.bmm(paddle.to_tensor(mats.astype(np.float32)).astype(x.dtype), x.reshape([m, c, h * w]))
    if (op == 1).any():  # contrast blends with the image's mean grey
        mean_grey = (x.mean(axis=[2, 3]) * paddle.to_tensor(grey.astype(np.float32)).astype(x.dtype)).sum(axis=1)
        weight = paddle.to_tensor(((1 - f) * (op == 1)).astype(np.float32)).astype(x.dtype)
        y = y + (weight * mean_grey).reshape([m, 1, 1])
    return paddle.clip(y, 0.0, 1.0).reshape([m, c, h, w])


def apply_photometric(x: paddle.Tensor, params: paddle.Tensor | np.ndarray) -> paddle.Tensor:
    """The photometric part of SimCLR views: RGB ``[N, 3, H, W]`` in [0, 1] and their draws
    ``[N, 12]`` (:func:`~ernievil2.data.views.photometric_params`) -> ``[N, 3, H, W]`` in [0, 1].

    Each step runs on the images it changes only (the draws are read on the host): in each of the
    four jitter positions the blends (brightness, contrast, saturation) of all images together as
    per-image colour matrices, then the hue rotations; then grayscale; then the blurs."""
    host = np.asarray(params.numpy() if isinstance(params, paddle.Tensor) else params, dtype=np.float64)
    if host.ndim != 2 or host.shape != (x.shape[0], PHOTOMETRIC_PARAMS):
        raise ValueError(f"photometric draws must be [{x.shape[0]}, {PHOTOMETRIC_PARAMS}], got {list(host.shape)}")
    n = x.shape[0]
    jitter = host[:, 0] > 0.5
    for position in range(4):
        op = np.where(jitter, host[:, 1 + position], -1).astype(np.int64)
        factor = host[np.arange(n), 5 + np.clip(op, 0, 3)]
        rows = np.nonzero((op >= 0) & (op <= 2) & (factor != 1.0))[0]
        if len(rows):
            x = _put(x, rows, _blend(_rows(x, rows), op[rows], factor[rows]))
        rows = np.nonzero((op == 3) & (factor != 0.0))[0]
        if len(rows):
            turns = paddle.to_tensor(factor[rows].astype(np.float32)).astype(x.dtype)
            x = _put(x, rows, paddle.clip(_rotate_hue(_rows(x, rows), turns), 0.0, 1.0))
    rows = np.nonzero(host[:, 9] > 0.5)[0]
    if len(rows):
        x = _put(x, rows, _grey(_rows(x, rows)).expand([len(rows), *x.shape[1:]]))
    rows = np.nonzero(host[:, 10] > 0)[0]
    if len(rows):
        x = _put(x, rows, _blur(_rows(x, rows), gaussian_kernels(host[rows, 10], int(host[rows[0], 11]))))
    return x


def _channel_affine(x: paddle.Tensor, scale: np.ndarray, shift: np.ndarray, channels_last: bool = False) -> paddle.Tensor:
    """``x * scale[c] + shift[c]`` per channel as ``[N, 3, H, W]`` (from NHWC when ``channels_last``):
    one scalar multiply-add per channel (much faster on the CPU than a broadcast, same arithmetic)."""
    planes = [x[..., c] if channels_last else x[:, c] for c in range(3)]
    return paddle.stack([paddle.scale(p, float(np.float32(a)), float(np.float32(b))) for p, a, b in zip(planes, scale, shift)],
                        axis=1)


def _scale_shift(mean: Sequence[float], std: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """float32 ``scale``, ``shift`` with ``(u8 / 255 - mean) / std == u8 * scale + shift``."""
    mean_a = np.asarray(mean, dtype=np.float64)
    std_a = np.asarray(std, dtype=np.float64)
    if mean_a.shape != (3,) or std_a.shape != (3,) or (std_a <= 0).any():
        raise ValueError(f"mean/std must be 3 values with std > 0, got {mean}, {std}")
    return (1.0 / (255.0 * std_a)).astype(np.float32), (-mean_a / std_a).astype(np.float32)


class ViewFinisher:
    """Training image views from the loader -> the model's input, on the current device.

    ``pixels``: RGB uint8 ``[N, S, S, 3]`` (tensor or array); ``photometric`` (SimCLR views): their ``[N, 12]``
    draws. Returns ``[N, 3, S, S]`` in paddle's default float dtype (also under AMP autocast): the
    photometric part applied (:func:`apply_photometric`), then ``(x - mean) / std``. Views without
    draws are normalised with the eval transform's arithmetic (``x * scale + shift``, float32
    constants).

    When the model runs on the CPU, the loader workers have idle CPU time and the trainer none:
    there the loader finishes each batch (:meth:`finish_batch`, the same computation in the worker
    process) and the trainer receives float32 ``[N, 3, S, S]`` views, which it takes as they are.
    """

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.scale, self.shift = _scale_shift(mean, std)

    def __call__(self, pixels: paddle.Tensor | np.ndarray, photometric: paddle.Tensor | np.ndarray | None = None,
                 name: str = "image") -> paddle.Tensor:
        if not isinstance(pixels, paddle.Tensor):
            pixels = paddle.to_tensor(pixels)
        finished = pixels.dtype == paddle.float32 and pixels.ndim == 4 and pixels.shape[1] == 3
        if finished and photometric is None:  # finished by the loader (finish_batch)
            return pixels.to(paddle.get_device()).astype(paddle.get_default_dtype())
        if pixels.dtype != paddle.uint8 or pixels.ndim != 4 or pixels.shape[-1] != 3:
            raise TypeError(f"{name}: expected RGB uint8 pixels [N, S, S, 3] (MultiViewTransform's views) or "
                            f"float32 [N, 3, S, S] finished by the loader, got {pixels.dtype} {list(pixels.shape)}")
        device = paddle.get_device()
        if device != "cpu":
            pixels = pixels.to(device)
        # full precision even inside the trainer's autocast (which would run bmm / conv in half)
        with paddle.amp.auto_cast(enable=False):
            x = pixels.astype(paddle.get_default_dtype())  # [N, S, S, 3]
            if photometric is None:
                return _channel_affine(x, self.scale, self.shift, channels_last=True)
            x = _channel_affine(x, np.full(3, 1.0 / 255.0), np.zeros(3), channels_last=True)
            return _channel_affine(apply_photometric(x, photometric), self.scale * 255.0, self.shift)

    @staticmethod
    def finished_layout(layout: dict[str, tuple[tuple[int, ...], np.dtype]]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """The per-sample layout of a batch after :meth:`finish_batch`: image views float32
        ``(3, S, S)``, their photometric draws gone, everything else as it was."""
        out = {}
        for key, (shape, dtype) in layout.items():
            if key.endswith(PHOTOMETRIC_SUFFIX):
                continue
            out[key] = ((3, shape[0], shape[1]), np.dtype(np.float32)) if key in IMAGE_VIEWS else (tuple(shape), np.dtype(dtype))
        return out

    def finish_batch(self, batch: dict[str, np.ndarray], rows: dict[str, int] | None = None) -> dict[str, np.ndarray]:
        """Finish the image views of a collated batch in this process (a loader worker: on the CPU),
        when the model runs on the CPU. Image views become float32 ``[N, 3, S, S]`` numpy arrays and
        their photometric draws leave the batch; other entries pass through. ``rows`` ``{view: n}``:
        only the first n rows of that view are real (auxiliary views); the rest become zeros."""
        rows = rows or {}
        out = {k: v for k, v in batch.items() if not k.endswith(PHOTOMETRIC_SUFFIX)}
        previous = paddle.get_default_dtype()
        paddle.set_default_dtype("float32")  # what finished_layout declares
        try:
            for key in IMAGE_VIEWS:
                if key in batch:
                    n = rows.get(key, len(batch[key]))
                    photometric = batch.get(key + PHOTOMETRIC_SUFFIX)
                    done = self(batch[key][:n], None if photometric is None else photometric[:n], key).numpy()
                    if n < len(batch[key]):
                        done = np.concatenate([done, np.zeros((len(batch[key]) - n, *done.shape[1:]), done.dtype)])
                    out[key] = done
        finally:
            paddle.set_default_dtype(previous)
        return out
