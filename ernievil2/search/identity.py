"""What makes two sets of photo-search vectors comparable, and the search errors.

**Identity.** A query (or a resumed build) whose checkpoint, vocab, image size or profile differs
from the index's is refused with :class:`IdentityMismatchError`, which names both identities:
vectors of two models are not comparable.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

from ernievil2.weights.fingerprint import model_sha256

__all__ = ["SearchError", "IdentityMismatchError", "ModelIdentity", "sha256_file", "model_sha256"]


class SearchError(ValueError):
    """A user-facing search error (missing file, not an index, bad option)."""


class IdentityMismatchError(SearchError):
    """The index was built with another checkpoint, vocab, image size or profile."""

    def __init__(self, index_identity: "ModelIdentity", query_identity: "ModelIdentity", where: str,
                 index_source: str = "", query_source: str = ""):
        self.index_identity, self.query_identity = index_identity, query_identity
        differ = [k for k in ModelIdentity.COMPARED if getattr(index_identity, k) != getattr(query_identity, k)]
        super().__init__(
            f"{where} was built with [{index_identity.describe()}]{_from(index_source)} but this run uses "
            f"[{query_identity.describe()}]{_from(query_source)} (differ: {', '.join(differ)}); "
            "query with the index's checkpoint and vocab, or build a new index"
        )


def _from(source: str) -> str:
    return f" from {source}" if source else ""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class ModelIdentity:
    """What makes two sets of image vectors comparable."""

    model_sha256: str
    vocab_sha256: str
    image_size: int
    profile: str
    dim: int

    COMPARED = ("model_sha256", "vocab_sha256", "image_size", "profile", "dim")

    def describe(self) -> str:
        """A one-line description (hashes shortened to 12 hex digits)."""
        return (f"model sha256 {self.model_sha256[:12]}, vocab sha256 {self.vocab_sha256[:12]}, "
                f"image size {self.image_size}, profile {self.profile}, dim {self.dim}")

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.COMPARED}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "ModelIdentity":
        return cls(str(d["model_sha256"]), str(d["vocab_sha256"]), int(d["image_size"]), str(d["profile"]), int(d["dim"]))
