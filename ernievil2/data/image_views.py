"""Image operations of the training views, done in the loader worker: decoding with header
checks (decompression bombs, placeholders, reduced JPEG decoding), RandomResizedCrop boxes, the
resize, and a SimCLR view's photometric draws (applied on the device, :mod:`ernievil2.data.device_views`)."""
from __future__ import annotations

import io
import math
import warnings
from collections.abc import Sequence

import cv2
import numpy as np
from PIL import Image

from ernievil2.data.sample import BadSample


def decode_rgb(data: bytes, key: str = "?") -> np.ndarray:
    """Decode image bytes into an RGB uint8 ``[H, W, 3]`` array with OpenCV.

    Grayscale and alpha images become 3-channel (``IMREAD_COLOR``). Raises ``ValueError`` naming
    ``key`` when the bytes are not a decodable image.
    """
    buf = np.frombuffer(data, dtype=np.uint8) if data else np.empty(0, np.uint8)
    img = None
    if buf.size:
        try:
            img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
        except cv2.error:
            img = None
    if img is None or img.ndim != 3 or img.shape[0] == 0 or img.shape[1] == 0:
        raise BadSample("corrupt_image", f"cannot decode image of sample {key!r} ({len(data) if data else 0} bytes)")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


_REDUCED_READS = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4), (2, cv2.IMREAD_REDUCED_COLOR_2))


def decode_for_views(
    data: bytes,
    key: str = "?",
    max_pixels: int = 40_000_000,
    min_side: int = 10,
    keep_short_side: int = 0,
) -> np.ndarray:
    """Decode training image bytes into RGB uint8 ``[H, W, 3]``, checking the header first.

    The header (PIL, no pixel data) gives the size: more than ``max_pixels`` pixels raises
    :class:`BadSample` ``image_too_large`` and a side under ``min_side`` ``image_too_small``,
    before anything is decoded; bytes PIL cannot identify raise ``corrupt_image``. A JPEG whose
    short side is at least twice ``keep_short_side`` is decoded at the smallest libjpeg scale
    (1/2, 1/4, 1/8) that keeps the short side ``>= keep_short_side`` (0: always full size).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as header:
                width, height = header.size
                fmt = header.format
    except Image.DecompressionBombError as exn:
        raise BadSample("image_too_large", f"sample {key!r}: {exn}") from exn
    except (OSError, SyntaxError, ValueError) as exn:
        raise BadSample("corrupt_image", f"cannot read the image header of sample {key!r}: {exn}") from exn
    if width * height > max_pixels:
        raise BadSample("image_too_large", f"sample {key!r}: {width}x{height} image has more than {max_pixels} pixels")
    if min(width, height) < min_side:
        raise BadSample("image_too_small", f"sample {key!r}: {width}x{height} image has a side under {min_side} px")
    if fmt == "JPEG" and keep_short_side > 0:
        for factor, flag in _REDUCED_READS:
            if min(width, height) >= factor * keep_short_side:
                img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flag)
                if img is None or img.ndim != 3:
                    raise BadSample("corrupt_image", f"cannot decode image of sample {key!r} ({len(data)} bytes)")
                return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return decode_rgb(data, key)


def random_resized_crop_box(
    rng: np.random.Generator,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    attempts: int = 10,
) -> tuple[int, int, int, int]:
    """``(top, left, crop_h, crop_w)`` of a RandomResizedCrop (torchvision's sampling rule).

    Tries ``attempts`` (area fraction in ``scale``, log-uniform aspect ratio in ``ratio``) pairs
    and takes the first that fits; otherwise a centre crop with the ratio clamped into ``ratio``.
    """
    area = height * width
    # all draws first (a fixed number per call), then plain Python arithmetic: 10 elements are
    # cheaper as floats than as numpy arrays
    fractions = rng.uniform(scale[0], scale[1], attempts).tolist()
    log_aspects = rng.uniform(math.log(ratio[0]), math.log(ratio[1]), attempts).tolist()
    off_top, off_left = rng.random(2).tolist()
    for fraction, log_aspect in zip(fractions, log_aspects):
        target, aspect = area * fraction, math.exp(log_aspect)
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= width and 0 < ch <= height:
            top = min(int(off_top * (height - ch + 1)), height - ch)
            left = min(int(off_left * (width - cw + 1)), width - cw)
            return top, left, ch, cw
    in_ratio = width / height
    if in_ratio < ratio[0]:
        cw, ch = width, max(1, int(round(width / ratio[0])))
    elif in_ratio > ratio[1]:
        ch, cw = height, max(1, int(round(height * ratio[1])))
    else:
        ch, cw = height, width
    ch, cw = min(ch, height), min(cw, width)
    return (height - ch) // 2, (width - cw) // 2, ch, cw


#: Length of a SimCLR view's photometric draws; see :func:`photometric_params`.
PHOTOMETRIC_PARAMS = 12


def photometric_params(order: Sequence[int] | None, factors: Sequence[float] | None, grayscale: bool,
                       blur_sigma: float, blur_kernel: int) -> np.ndarray:
    """A SimCLR view's photometric draws as float32 ``[12]``: ``[jitter on, order of the four
    adjustments (4), brightness, contrast, saturation factors, hue shift (fraction of a turn),
    grayscale, blur sigma (0: no blur), blur kernel size]``. ``order`` / ``factors`` None: no
    colour jitter. Applied on the device by :func:`ernievil2.data.device_views.apply_photometric`.
    """
    jitter = order is not None
    if jitter and (sorted(int(o) for o in order) != [0, 1, 2, 3] or factors is None or len(factors) != 4):
        raise ValueError(f"order must be a permutation of 0..3 with 4 factors, got {order}, {factors}")
    return np.array([float(jitter), *(order if jitter else (0, 1, 2, 3)), *(factors if jitter else (1.0, 1.0, 1.0, 0.0)),
                     float(grayscale), float(blur_sigma), float(blur_kernel)], dtype=np.float32)


def resize_to(img: np.ndarray, out_w: int, out_h: int) -> np.ndarray:
    h, w = img.shape[:2]
    # area averaging when shrinking a lot (less aliasing), bilinear otherwise
    interp = cv2.INTER_AREA if (h >= 2 * out_h and w >= 2 * out_w) else cv2.INTER_LINEAR
    return cv2.resize(img, (out_w, out_h), interpolation=interp)
