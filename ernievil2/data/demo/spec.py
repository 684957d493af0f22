"""What determines the demo data's bytes: :class:`DemoDataSpec`, whose hash names the cache folder."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from .text import TagNoise


@dataclass
class DemoDataSpec:
    """Everything that determines the demo data's bytes (its hash names the cache folder)."""

    n_train: int = 20000
    n_val: int = 500
    image_size: int = 64
    seed: int = 0
    samples_per_shard: int = 2000
    # What the training split's object tags and captions look like (:mod:`ernievil2.data.demo`): tags
    # exact | category | detector, the detector's recall and false-tag rate, the share of its tags
    # with a colour attribute and how often that colour is wrong; the share of training samples
    # captioned with another scene's captions.
    tags: str = "exact"
    tag_recall: float = 0.6
    false_tags: float = 0.3
    tag_attributes: float = 0.0
    attribute_error: float = 0.2
    mismatch: float = 0.0
    version: int = 1

    def __post_init__(self) -> None:
        self.tag_noise()
        if not 0.0 <= self.mismatch <= 1.0:
            raise ValueError(f"data.demo.mismatch must be in [0, 1], got {self.mismatch}")

    def tag_noise(self) -> TagNoise:
        """The training split's :class:`TagNoise`."""
        return TagNoise(self.tags, self.tag_recall, self.false_tags, self.tag_attributes, self.attribute_error)

    def n_mismatched(self) -> int:
        """How many training samples carry another scene's captions."""
        return int(round(self.mismatch * self.n_train))

    def digest(self) -> str:
        """Short stable hash of the fields that shape the data: a knob left at its clean value
        (exact tags, no mismatch) is left out, so the clean demo keeps its hash."""
        fields = asdict(self)
        if self.tags != "detector":
            for name in ("tag_recall", "false_tags", "tag_attributes", "attribute_error"):
                fields.pop(name)
        if self.tags == "exact":
            fields.pop("tags")
        if self.mismatch == 0.0:
            fields.pop("mismatch")
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
