"""The raw multi-view sample: what a shard holds for one image, before any view is made."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RawSample:
    """One image with all of its texts, as stored in a WebDataset shard.

    ``objects`` is ``None`` (or empty) when the sample carries no object tags: such a sample is
    masked out of the image-objects loss, never given an invented text.
    """

    key: str
    image: bytes
    captions: list[str]
    objects: list[str] | None = None
    lang: str = "en"
    meta: dict = field(default_factory=dict)

    @property
    def has_objects(self) -> bool:
        return bool(self.objects)


SKIP_KINDS: tuple[str, ...] = (
    "truncated_tar",
    "bad_json",
    "no_image",
    "no_caption",
    "bad_caption",
    "corrupt_image",
    "image_too_large",
    "image_too_small",
    "other_language",
    "other",
)
"""Kinds of bad training data, in the order of the ``skipped`` count vector of a loader batch.

``truncated_tar``: a shard that ends early or is not a tar (counted once per shard; the samples
before the damage are kept); ``bad_json``: a ``KEY.json`` that does not parse or is not an object;
``no_image``; ``no_caption``: neither ``KEY.txt`` nor json captions; ``bad_caption``: captions
present but empty or not UTF-8; ``corrupt_image``: bytes no decoder reads; ``image_too_large``:
more pixels than the configured limit (decompression bombs); ``image_too_small``: a side under the
configured minimum (1x1 placeholders); ``other_language``: no caption in the languages of
``data.caption_languages``; ``other``: a transform's plain ``ValueError``.
"""


class BadSample(ValueError):
    """A sample that cannot be trained on; ``kind`` is one of :data:`SKIP_KINDS`."""

    def __init__(self, kind: str, message: str) -> None:
        if kind not in SKIP_KINDS:
            raise ValueError(f"unknown bad-sample kind {kind!r}; expected one of {SKIP_KINDS}")
        super().__init__(message)
        self.kind = kind
