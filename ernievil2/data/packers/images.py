"""Image side of packing: load bytes (:class:`~ernievil2.data.formats.ImageSource`: file, base64 or
bytes), validate by decoding, resize, re-encode JPEG.

Runs inside the packer's worker processes, so it imports nothing heavier than Pillow (and the
standard-library-only :mod:`ernievil2.data.formats`).
"""
from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageOps

from ernievil2.data.formats import ImageLoadError, ImageSource

# Skip reasons produced here (the pipeline counts them by name), besides those of ImageSource.load
# (missing_image, unreadable_image, bad_base64: ernievil2.data.formats).
CORRUPT_IMAGE = "corrupt_image"
TOO_LARGE_IMAGE = "too_large_image"


@dataclass(frozen=True)
class ImageOptions:
    """How images are stored: ``max_side`` (None: keep size) and the JPEG quality of re-encodes."""

    max_side: int | None = None
    jpeg_quality: int = 95

    def __post_init__(self) -> None:
        if self.max_side is not None and self.max_side < 1:
            raise ValueError(f"max_side must be >= 1 or None, got {self.max_side}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")


@dataclass(frozen=True)
class EncodedImage:
    """JPEG bytes ready for a shard, with their pixel size and what was done to them."""

    data: bytes
    width: int
    height: int
    original_width: int
    original_height: int
    resized: bool
    reencoded: bool


@dataclass(frozen=True)
class ImageFailure:
    """Why an image was not packed: a skip reason and a short detail."""

    reason: str
    detail: str


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB copy; transparent pixels are composited onto white (not left as whatever colour they hide)."""
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")


def encode_image(data: bytes, options: ImageOptions) -> EncodedImage:
    """Decode ``data`` fully (a validity check), then keep the bytes when they are a JPEG that needs no
    resizing; otherwise apply the EXIF orientation, shrink so the longer side is at most
    ``options.max_side`` (aspect kept, Lanczos) and re-encode as JPEG.

    Raises ``ValueError`` (corrupt or truncated data) or ``Image.DecompressionBombError``.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            width, height = img.size
            is_jpeg = img.format == "JPEG"
            too_big = options.max_side is not None and max(width, height) > options.max_side
            if is_jpeg and not too_big:
                return EncodedImage(data, width, height, width, height, resized=False, reencoded=False)
            out = _to_rgb(ImageOps.exif_transpose(img))
    except Image.DecompressionBombError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError) as exn:
        raise ValueError(f"cannot decode image: {exn}") from exn
    if too_big:
        assert options.max_side is not None
        scale = options.max_side / max(out.size)
        size = (max(1, round(out.width * scale)), max(1, round(out.height * scale)))
        out = out.resize(size, Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    out.save(buf, format="JPEG", quality=options.jpeg_quality)
    return EncodedImage(buf.getvalue(), out.width, out.height, width, height, resized=too_big, reencoded=True)


def prepare_image(source: ImageSource, options: ImageOptions) -> EncodedImage | ImageFailure:
    """Load, validate and encode one image; failures come back as :class:`ImageFailure`, never raised."""
    try:
        data = source.load()
    except ImageLoadError as exn:
        return ImageFailure(exn.reason, exn.detail)
    try:
        return encode_image(data, options)
    except Image.DecompressionBombError as exn:
        return ImageFailure(TOO_LARGE_IMAGE, str(exn))
    except ValueError as exn:
        return ImageFailure(CORRUPT_IMAGE, str(exn))


def prepare_images(sources: Sequence[ImageSource], options: ImageOptions) -> list[EncodedImage | ImageFailure]:
    """:func:`prepare_image` over a batch, in order (the unit of work sent to a worker process)."""
    return [prepare_image(s, options) for s in sources]
