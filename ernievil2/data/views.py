"""ERNIE-ViL 2.0 multi-view sample transform (the views of the paper) and the deterministic eval transform.

From one :class:`~ernievil2.data.sample.RawSample` :class:`MultiViewTransform` makes

* ``image``: the caption-view image, RandomResizedCrop(scale 0.5–1, ratio 3/4–4/3) + flip p=0.5;
* ``image_view1`` / ``image_view2``: two SimCLR views, RandomResizedCrop(scale 0.08–1) + flip,
  ColorJitter(0.4, 0.4, 0.4, 0.1) p=0.8, grayscale p=0.2, Gaussian blur p=0.5;
* ``caption_ids``: one caption picked at random, tokenized (int64 ``[L]``);
* ``text_view_ids``: another caption of the same image, or a token-level augmentation of the
  caption when the sample has only one (see :func:`augment_text_ids`);
* ``objects_ids`` / ``has_objects``: the object-tags text (see :func:`objects_text`), or all
  padding and 0.0 when the sample carries no tags; ``objects_tags`` / ``objects_text_tags``: int64
  ``[MAX_TAGS]`` keys (:func:`tag_key`, 0-padded) of all the sample's tags and of the tags its
  objects text names (``ViewConfig.objects_pick`` and ``objects_tag_dropout`` may name fewer), so
  that the loss can tell which objects texts of a batch are true of which images.

The work is split the way GPU input pipelines (DALI, kornia) split it. Here, in the loader worker:
decode, every random draw, and the geometry (crop + resize is one ``cv2.resize`` of the crop, then
the flip), giving RGB uint8 ``[S, S, 3]`` pixels, a quarter of float32's bytes to ship. On the
device, batched (:class:`~ernievil2.data.device_views.ViewFinisher`): the SimCLR views'
photometric part (colour jitter, grayscale, blur), whose draws travel with the pixels as
``image_view1_photometric`` / ``image_view2_photometric`` (float32 ``[12]``, see
:mod:`ernievil2.data.device_views`), then the normalisation with the ImageNet mean/std. The eval
transform returns normalised float32 CHW, the input of the released inference code. Images are
decoded with OpenCV. Before decoding, the header (read
by PIL, no pixels) is checked against ``ViewConfig.max_image_pixels`` (decompression bombs) and
``min_image_side`` (1x1 placeholders); a JPEG much larger than the views is decoded at 1/2, 1/4 or
1/8 scale by libjpeg (``reduce_on_decode``). Bad images raise
:class:`~ernievil2.data.sample.BadSample`; :meth:`MultiViewTransform.validate` runs the same checks
without making views (what a resumed stream uses to skip consumed samples cheaply).

Determinism: all randomness for a sample derives from
``np.random.SeedSequence([seed, epoch, stable_hash(key)])`` (the same entropy as
``np.random.default_rng([seed, epoch, stable_hash(key)])``), split into one independent stream per
view, so the same (seed, epoch, key) gives identical outputs in any worker or process, different
epochs give different views, and computing fewer views never changes the ones that are computed.
"""
from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import cv2
import numpy as np

from ernievil2.data.caption_language import kept_captions
from ernievil2.data.image_views import (
    PHOTOMETRIC_PARAMS,
    decode_for_views,
    decode_rgb,
    photometric_params,
    random_resized_crop_box,
    resize_to,
)
from ernievil2.data.preprocess import IMAGENET_MEAN, IMAGENET_STD
from ernievil2.data.sample import BadSample, RawSample
from ernievil2.data.text_views import (
    DEFAULT_OBJECTS_JOINERS,
    DEFAULT_OBJECTS_TEMPLATES,
    MAX_TAGS,
    augment_text_ids,
    objects_text,
    tag_key,
    tag_keys,
    unique_tags,
)
from ernievil2.tokenizer import WordPieceTokenizer

__all__ = [
    "ALL_VIEWS",
    "DEFAULT_OBJECTS_JOINERS",
    "DEFAULT_OBJECTS_TEMPLATES",
    "VIEW_ALIASES",
    "IMAGE_VIEWS",
    "SIMCLR_VIEWS",
    "MultiViewTransform",
    "PHOTOMETRIC_PARAMS",
    "PHOTOMETRIC_SUFFIX",
    "ViewConfig",
    "augment_text_ids",
    "decode_for_views",
    "decode_rgb",
    "objects_text",
    "tag_key",
    "photometric_params",
    "random_resized_crop_box",
    "stable_hash",
]


#: Every output key of :class:`MultiViewTransform`, in output order.
ALL_VIEWS: tuple[str, ...] = (
    "image",
    "image_view1",
    "image_view2",
    "caption_ids",
    "text_view_ids",
    "objects_ids",
    "has_objects",
    "objects_tags",
    "objects_text_tags",
)
#: The outputs that always come together: the objects text, whether there is one, the tag keys.
OBJECTS_OUTPUTS: frozenset[str] = frozenset({"objects_ids", "has_objects", "objects_tags", "objects_text_tags"})
#: Tags per sample whose keys travel with it (a sample with more keeps its first ``MAX_TAGS``).
#: Loss-side view names (``ernievil2.losses.TERM_VIEWS``) accepted as aliases in ``views``.
VIEW_ALIASES: dict[str, str] = {"caption": "caption_ids", "text_view": "text_view_ids", "objects": "objects_ids"}
# independent random streams, fixed order (changing it changes every sample's views)
#: The image views, in output order, and the two of them that are SimCLR views (with photometric draws).
IMAGE_VIEWS: tuple[str, ...] = ("image", "image_view1", "image_view2")
SIMCLR_VIEWS: tuple[str, ...] = ("image_view1", "image_view2")
_STREAMS = (*IMAGE_VIEWS, "text", "objects")  # appended streams leave the earlier ones unchanged
#: Suffix of the key holding a SimCLR view's photometric draws (``image_view1`` + suffix).
PHOTOMETRIC_SUFFIX = "_photometric"


# --------------------------------------------------------------------------- helpers
def stable_hash(key: str) -> int:
    """Process-independent 32-bit hash of a sample key (CRC-32 of its UTF-8 bytes)."""
    return zlib.crc32(key.encode("utf-8")) & 0xFFFFFFFF


# --------------------------------------------------------------------------- config
@dataclass
class ViewConfig:
    """Settings of :class:`MultiViewTransform` (defaults: the views of the module docstring, after SLIP).

    ``max_image_pixels`` / ``min_image_side`` reject decompression bombs and tiny placeholders
    (counted skips); ``reduce_on_decode`` (0 disables) lets a JPEG be decoded at 1/2-1/8 scale
    while its short side stays ``>= reduce_on_decode * image_size`` (see :func:`decode_for_views`).
    ``blur_kernel`` ``None`` scales the 5×5 kernel of a 224 image to ``image_size`` (odd, ≥ 3);
    ``blur_sigma`` is the range σ is drawn from. Text-view probabilities apply only when the
    sample has a single caption (see :func:`augment_text_ids`). ``objects_templates`` hold
    ``{objects}``; ``objects_joiners`` join the tags; both are keyed by language. ``mean`` / ``std``
    are the normalisation the trainer applies to the uint8 views (``ViewFinisher``).
    """

    image_size: int = 224
    # Side of the SimCLR views (image_view1/2) as a fraction of image_size (rounded): low-resolution
    # auxiliary views (multi-crop, SwAV/DINO); the model resamples its position embeddings to their
    # patch grid. 0.5 gives 32 px at the demo's 64, 112 px at 224. Must give a multiple of the
    # model's patch size.
    aux_image_scale: float = 1.0
    caption_crop_scale: tuple[float, float] = (0.5, 1.0)
    simclr_crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = 0.5
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    color_jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    blur_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel: int | None = None
    text_mask_prob: float = 0.15
    text_delete_prob: float = 0.1
    text_swap_prob: float = 0.1
    objects_templates: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_OBJECTS_TEMPLATES))
    objects_joiners: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_OBJECTS_JOINERS))
    # "all": the objects text names every tag of the sample; "one": one of its tags, drawn per
    # sample and epoch (a label view: each text is one label, as in image-label contrast).
    objects_pick: str = "all"
    # Each tag left out of the objects text with this probability (per sample and epoch; at least one stays).
    objects_tag_dropout: float = 0.0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    max_image_pixels: int = 40_000_000
    min_image_side: int = 10
    reduce_on_decode: float = 2.0


def simclr_size(cfg: ViewConfig) -> int:
    """Side of the SimCLR views: ``round(aux_image_scale · image_size)``."""
    return max(1, int(round(cfg.aux_image_scale * cfg.image_size)))


# --------------------------------------------------------------------------- transforms
class MultiViewTransform:
    """Make the ERNIE-ViL 2.0 views of a :class:`RawSample` (see the module docstring).

    ``views`` picks the outputs (names from :data:`ALL_VIEWS`, or the loss-side aliases of
    :data:`VIEW_ALIASES`; the :data:`OBJECTS_OUTPUTS` always come together); the others are
    neither computed nor returned. ``caption_languages`` (``data.caption_languages``; empty: all)
    keeps a sample's captions in those languages only
    (:func:`~ernievil2.data.caption_language.kept_captions`); a sample left with none is a
    :class:`BadSample` of kind ``other_language``.
    """

    def __init__(
        self,
        cfg: ViewConfig,
        tokenizer: WordPieceTokenizer,
        max_length: int = 48,
        seed: int = 0,
        views: Sequence[str] | None = None,
        aux_views: Sequence[str] = (),
        aux_rows: int | None = None,
        caption_languages: Sequence[str] = (),
    ):
        if int(seed) < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if cfg.image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {cfg.image_size}")
        if cfg.objects_pick not in ("all", "one"):
            raise ValueError(f"data.views.objects_pick must be 'all' or 'one', got {cfg.objects_pick!r}")
        if not 0.0 <= cfg.objects_tag_dropout < 1.0:
            raise ValueError(f"data.views.objects_tag_dropout must be in [0, 1), got {cfg.objects_tag_dropout}")
        for name, tmpl in cfg.objects_templates.items():
            if "{objects}" not in tmpl:
                raise ValueError(f"objects template for {name!r} lacks '{{objects}}': {tmpl!r}")
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.seed = int(seed)
        self.caption_languages: tuple[str, ...] = tuple(caption_languages)
        wanted = {VIEW_ALIASES.get(v, v) for v in (ALL_VIEWS if views is None else views)}
        unknown = wanted - set(ALL_VIEWS)
        if unknown:
            raise ValueError(f"unknown views {sorted(unknown)}; choose from {list(ALL_VIEWS)}")
        if wanted & OBJECTS_OUTPUTS:
            wanted |= OBJECTS_OUTPUTS
        self.views: tuple[str, ...] = tuple(v for v in ALL_VIEWS if v in wanted)
        aux = {VIEW_ALIASES.get(v, v) for v in aux_views}
        if aux & OBJECTS_OUTPUTS:
            aux |= OBJECTS_OUTPUTS
        if aux - set(ALL_VIEWS) or aux & {"image", "caption_ids"}:
            raise ValueError(f"aux_views must be among image_view1/2, text_view, objects; got {sorted(aux_views)}")
        #: views made only for rows ``< aux_rows`` of a batch (placeholders elsewhere); see ``__call__``
        self.aux_views: tuple[str, ...] = tuple(v for v in self.views if v in aux)
        self.aux_rows = None if not self.aux_views else aux_rows
        if not 0.0 < cfg.aux_image_scale <= 1.0:
            raise ValueError(f"data.views.aux_image_scale must be in (0, 1], got {cfg.aux_image_scale}")
        #: side of the SimCLR views
        self.simclr_size = simclr_size(cfg)
        #: the keys of a sample's output, in order: the views, each SimCLR view followed by its draws
        self.output_keys: tuple[str, ...] = tuple(
            k for v in self.views for k in ((v, v + PHOTOMETRIC_SUFFIX) if v in SIMCLR_VIEWS else (v,)))
        if cfg.blur_kernel is None:
            k = max(3, int(round(5 * self.simclr_size / 224)))
        else:
            k = int(cfg.blur_kernel)
        self.blur_kernel = k if k % 2 == 1 else k + 1
        self._placeholders = self._make_placeholders()

    # ------------------------------------------------------------------ images
    def _crop_flip(self, img: np.ndarray, rng: np.random.Generator, scale: tuple[float, float],
                   size: int | None = None) -> np.ndarray:
        s = size or self.cfg.image_size
        top, left, ch, cw = random_resized_crop_box(rng, img.shape[0], img.shape[1], scale, self.cfg.crop_ratio)
        out = resize_to(img[top : top + ch, left : left + cw], s, s)
        if rng.random() < self.cfg.flip_prob:
            cv2.flip(out, 1, dst=out)  # in place: no second 150 KB array
        return out

    def _caption_view(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return self._crop_flip(img, rng, self.cfg.caption_crop_scale)

    def _simclr_view(self, img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """The SimCLR view's crop (uint8) and the draws of its photometric part (``photometric_params``)."""
        cfg = self.cfg
        out = self._crop_flip(img, rng, cfg.simclr_crop_scale, self.simclr_size)
        u = rng.random(3)
        jitter = u[0] < cfg.color_jitter_prob and any(v > 0 for v in cfg.color_jitter)
        order, factors = None, None
        if jitter:
            b, c, s, h = cfg.color_jitter
            order = rng.permutation(4)
            factors = (rng.uniform(max(0.0, 1 - b), 1 + b), rng.uniform(max(0.0, 1 - c), 1 + c),
                       rng.uniform(max(0.0, 1 - s), 1 + s), rng.uniform(-h, h))
        sigma = float(rng.uniform(cfg.blur_sigma[0], cfg.blur_sigma[1])) if u[2] < cfg.blur_prob else 0.0
        return out, photometric_params(order, factors, u[1] < cfg.grayscale_prob, sigma, self.blur_kernel)

    # ------------------------------------------------------------------ texts
    def _pad(self, ids: Sequence[int]) -> np.ndarray:
        return self.tokenizer.pad([ids], self.max_length)[0]

    def _texts(self, sample: RawSample, rng: np.random.Generator, out: dict[str, np.ndarray],
               views: Sequence[str]) -> None:
        captions = sample.captions
        if not captions:
            raise BadSample("no_caption", f"sample {sample.key!r} has no captions")
        n = len(captions)
        ci = int(rng.integers(n)) if n > 1 else 0
        cap_ids = self.tokenizer.encode(captions[ci], self.max_length)
        if "caption_ids" in views:
            out["caption_ids"] = self._pad(cap_ids)
        if "text_view_ids" in views:
            if n > 1:
                j = int(rng.integers(n - 1))
                j += j >= ci
                tv = self.tokenizer.encode(captions[j], self.max_length)
            else:
                cfg = self.cfg
                tv = augment_text_ids(
                    cap_ids, rng, self.tokenizer.mask_id,
                    cfg.text_mask_prob, cfg.text_delete_prob, cfg.text_swap_prob,
                )
            out["text_view_ids"] = self._pad(tv)

    def _objects(self, sample: RawSample, out: dict[str, np.ndarray], rng: np.random.Generator) -> None:
        tags = unique_tags(sample.objects)
        named = tags
        if tags and self.cfg.objects_pick == "one":
            named = [tags[int(rng.integers(len(tags)))]]
        elif len(tags) > 1 and self.cfg.objects_tag_dropout > 0:
            kept = rng.random(len(tags)) >= self.cfg.objects_tag_dropout
            kept[int(rng.integers(len(tags)))] = True
            named = [t for t, k in zip(tags, kept) if k]
        text = objects_text(named, sample.lang, self.cfg.objects_templates, self.cfg.objects_joiners)
        if text is None:
            out["objects_ids"] = np.full(self.max_length, self.tokenizer.pad_id, dtype=np.int64)
            out["has_objects"] = np.array(0.0, dtype=np.float32)
            named = tags = []
        else:
            out["objects_ids"] = self._pad(self.tokenizer.encode(text, self.max_length))
            out["has_objects"] = np.array(1.0, dtype=np.float32)
        out["objects_tags"] = tag_keys(tags)
        out["objects_text_tags"] = tag_keys(named)

    # ------------------------------------------------------------------ main
    def fixed_outputs(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Shape and dtype of every output (they never change): what the training loader ships
        through shared slots (:mod:`ernievil2.data.slots`)."""
        s, a, n = self.cfg.image_size, self.simclr_size, self.max_length
        layout = {"image": ((s, s, 3), np.uint8), "image_view1": ((a, a, 3), np.uint8),
                  "image_view2": ((a, a, 3), np.uint8), "caption_ids": ((n,), np.int64),
                  "text_view_ids": ((n,), np.int64), "objects_ids": ((n,), np.int64), "has_objects": ((), np.float32),
                  "objects_tags": ((MAX_TAGS,), np.int64), "objects_text_tags": ((MAX_TAGS,), np.int64)}
        for view in SIMCLR_VIEWS:
            layout[view + PHOTOMETRIC_SUFFIX] = ((PHOTOMETRIC_PARAMS,), np.float32)
        return {k: (layout[k][0], np.dtype(layout[k][1])) for k in self.output_keys}

    def rngs(self, key: str, epoch: int = 0) -> dict[str, np.random.Generator]:
        """The per-view random generators of sample ``key`` at ``epoch``."""
        if int(epoch) < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        root = np.random.SeedSequence([self.seed, int(epoch), stable_hash(key)])
        return {name: np.random.default_rng(child) for name, child in zip(_STREAMS, root.spawn(len(_STREAMS)))}

    def _decode(self, sample: RawSample) -> np.ndarray | None:
        """The decoded image when an image view is wanted (None otherwise); :class:`BadSample` if unusable."""
        if not set(IMAGE_VIEWS) & set(self.views):
            return None
        cfg = self.cfg
        return decode_for_views(sample.image, sample.key, cfg.max_image_pixels, cfg.min_image_side,
                                math.ceil(cfg.reduce_on_decode * cfg.image_size))

    def in_languages(self, sample: RawSample) -> RawSample:
        """``sample`` with only its captions in :attr:`caption_languages` (``meta["languages"]``
        kept aligned); :class:`BadSample` ``other_language`` when none is."""
        if not self.caption_languages:
            return sample
        keep = kept_captions(sample.captions, sample.lang, sample.meta, self.caption_languages)
        if not keep:
            raise BadSample("other_language", f"sample {sample.key!r}: no caption in {list(self.caption_languages)}")
        if len(keep) == len(sample.captions):
            return sample
        meta = dict(sample.meta)
        if isinstance(meta.get("languages"), list) and len(meta["languages"]) == len(sample.captions):
            meta["languages"] = [meta["languages"][i] for i in keep]
        return replace(sample, captions=[sample.captions[i] for i in keep], meta=meta)

    def validate(self, sample: RawSample) -> None:
        """Raise the :class:`BadSample` that ``self(sample, epoch)`` would raise, without making views."""
        sample = self.in_languages(sample)
        self._decode(sample)
        if not sample.captions and ({"caption_ids", "text_view_ids"} & set(self.views)):
            raise BadSample("no_caption", f"sample {sample.key!r} has no captions")

    def _make_placeholders(self) -> dict[str, np.ndarray]:
        """What a row without the auxiliary views carries in their place: zero pixels and draws,
        all-padding ids, ``has_objects`` and the tag keys 0 (fixed shapes for batching; never encoded). Made once,
        read-only: batching copies them."""
        out: dict[str, np.ndarray] = {}
        for key, (shape, dtype) in self.fixed_outputs().items():
            view = key[: -len(PHOTOMETRIC_SUFFIX)] if key.endswith(PHOTOMETRIC_SUFFIX) else key
            if view in self.aux_views:
                fill = self.tokenizer.pad_id if key.endswith("_ids") else 0
                out[key] = np.full(shape, fill, dtype=dtype)
                out[key].flags.writeable = False
        return out

    def __call__(self, sample: RawSample, epoch: int = 0, row: int | None = None) -> dict[str, np.ndarray]:
        """The selected views of ``sample`` as arrays keyed by :attr:`output_keys`: images RGB uint8
        ``[S, S, 3]`` (a SimCLR view with its ``*_photometric`` float32 ``[12]`` draws), ids int64
        ``[max_length]``, ``has_objects`` a float32 scalar, the tag keys int64 ``[MAX_TAGS]``. ``row``: the sample's row in its batch
        (the loader's); a row ``>= aux_rows`` gets fixed placeholders for the auxiliary views,
        which are not made. The other views do not depend on ``row``."""
        sample = self.in_languages(sample)
        rngs = self.rngs(sample.key, epoch)
        out: dict[str, np.ndarray] = {}
        views = self.views
        if row is not None and self.aux_rows is not None and row >= self.aux_rows:
            out.update(self._placeholders)
            views = tuple(v for v in views if v not in self.aux_views)
        img = self._decode(sample)
        if img is not None:
            if "image" in views:
                out["image"] = self._caption_view(img, rngs["image"])
            for view in SIMCLR_VIEWS:
                if view in views:
                    out[view], out[view + PHOTOMETRIC_SUFFIX] = self._simclr_view(img, rngs[view])
        if "caption_ids" in views or "text_view_ids" in views:
            self._texts(sample, rngs["text"], out, views)
        if "objects_ids" in views:
            self._objects(sample, out, rngs["objects"])
        return {k: out[k] for k in self.output_keys}
