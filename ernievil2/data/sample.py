"""The raw multi-view sample: what a shard holds for one image, before any view is made."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class RawSample:
    """One image with all of its texts, as stored in a WebDataset shard.

    ``objects`` is ``None`` (or empty) when the sample carries no object tags: such a sample is
    masked out of the image-objects loss, never given an invented text.
    """

    key: str
    image: bytes
    captions: list[str]
    objects: Optional[list[str]] = None
    lang: str = "en"
    meta: dict = field(default_factory=dict)

    @property
    def has_objects(self) -> bool:
        return bool(self.objects)
