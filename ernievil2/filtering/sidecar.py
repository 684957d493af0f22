"""The score sidecar of one shard: ``SCORES/<shard name>.scores.npz``, written atomically.

Arrays: ``keys`` (the samples' keys, in shard order), ``caption_scores`` (float32, every caption's
cosine with its image, flat) with ``caption_offsets`` (int64, ``len(keys) + 1``: the captions of
sample ``i`` are ``caption_scores[offsets[i]:offsets[i + 1]]``), optionally ``image_emb`` and
``text_emb`` (float16, L2-normalised; the text row is the first caption's), and ``meta``: JSON with
the shard's URL and, for a local file, its size and modification time (a shard changed after scoring
is refused), the scoring model's identity, and the samples skipped by kind.
"""
from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ernievil2.atomic import atomic_write

SIDECAR_SUFFIX = ".scores.npz"
SIDECAR_VERSION = 1
SCORE_KINDS = ("first", "max", "mean")


class FilterError(ValueError):
    """Unusable input to scoring or selection; the message names the file, shard or option."""


def shard_name(url: str) -> str:
    """The name a shard's sidecar is known by: its file name without ``.tar`` (URLs and ``pipe:``
    commands: the last path-like word)."""
    base = url.rstrip("/").rsplit("/", 1)[-1].split()[-1] if url.strip() else url
    return base[:-4] if base.endswith(".tar") else base


def sidecar_path(out_dir: str | os.PathLike, url: str) -> Path:
    """Where the sidecar of shard ``url`` lives in ``out_dir``."""
    return Path(out_dir) / f"{shard_name(url)}{SIDECAR_SUFFIX}"


def shard_stat(url: str) -> dict[str, int] | None:
    """``{"bytes", "mtime_ns"}`` of a local shard; None for ``http(s)://`` and ``pipe:`` shards."""
    from ernievil2.data.shard_reader import is_remote

    if is_remote(url):
        return None
    st = os.stat(url)
    return {"bytes": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}


@dataclass
class ShardScores:
    """The scores of one shard's samples (see the module docstring for the file layout)."""

    shard: str
    keys: list[str]
    caption_scores: np.ndarray
    caption_offsets: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    image_emb: np.ndarray | None = None
    text_emb: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def score(self, kind: str = "first") -> np.ndarray:
        """One float32 score per sample: its ``first`` caption's, or the ``max`` / ``mean`` over its captions."""
        if kind not in SCORE_KINDS:
            raise FilterError(f"unknown score {kind!r}; choose one of {list(SCORE_KINDS)}")
        starts, stops = self.caption_offsets[:-1], self.caption_offsets[1:]
        if kind == "first":
            return self.caption_scores[starts].astype(np.float32, copy=False) if len(self) else np.empty(0, np.float32)
        reduce = np.maximum if kind == "max" else np.add
        out = reduce.reduceat(self.caption_scores, starts) if len(self) else np.empty(0, np.float32)
        return (out if kind == "max" else out / (stops - starts)).astype(np.float32)

    @classmethod
    def from_lists(cls, shard: str, keys: list[str], scores: list[np.ndarray], meta: dict[str, Any],
                   image_emb: np.ndarray | None = None, text_emb: np.ndarray | None = None) -> "ShardScores":
        """Build from per-sample caption score arrays (each with at least one caption)."""
        counts = np.array([len(s) for s in scores], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        flat = np.concatenate(scores).astype(np.float32) if scores else np.empty(0, np.float32)
        return cls(shard, list(keys), flat, offsets, meta, image_emb, text_emb)

    def write(self, path: str | os.PathLike) -> None:
        """Write atomically to ``path`` (a kill leaves no partial sidecar)."""
        arrays: dict[str, np.ndarray] = {
            "keys": np.array(self.keys, dtype=str) if self.keys else np.empty(0, dtype="<U1"),
            "caption_scores": self.caption_scores.astype(np.float32),
            "caption_offsets": self.caption_offsets.astype(np.int64),
            "meta": np.array(json.dumps({"version": SIDECAR_VERSION, "shard": self.shard, **self.meta})),
        }
        for name, emb in (("image_emb", self.image_emb), ("text_emb", self.text_emb)):
            if emb is not None:
                arrays[name] = emb.astype(np.float16)
        with atomic_write(path, "wb") as f:
            np.savez(f, **arrays)


def read_sidecar(path: str | os.PathLike) -> ShardScores:
    """The sidecar at ``path``; :class:`FilterError` naming it when it is not a complete one."""
    path = Path(path)
    hint = "delete it to score its shard again"
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {name: z[name] for name in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exn:
        raise FilterError(f"{path}: not a readable score sidecar ({exn}); {hint}") from None
    missing = [n for n in ("keys", "caption_scores", "caption_offsets", "meta") if n not in arrays]
    if missing:
        raise FilterError(f"{path}: corrupt score sidecar: no {', '.join(missing)}; {hint}")
    try:
        meta = json.loads(str(arrays["meta"]))
    except ValueError as exn:
        raise FilterError(f"{path}: corrupt score sidecar: meta is not JSON ({exn}); {hint}") from None
    keys = [str(k) for k in arrays["keys"].tolist()]
    scores, offsets = arrays["caption_scores"], arrays["caption_offsets"]
    ok = (isinstance(meta, dict) and meta.get("version") == SIDECAR_VERSION and "shard" in meta
          and offsets.ndim == 1 and len(offsets) == len(keys) + 1 and offsets[0] == 0
          and bool(np.all(np.diff(offsets) >= 1)) and offsets[-1] == len(scores))
    for name in ("image_emb", "text_emb"):
        ok = ok and (name not in arrays or len(arrays[name]) == len(keys))
    if not ok:
        raise FilterError(f"{path}: corrupt score sidecar: its arrays or meta do not agree "
                          f"(version {SIDECAR_VERSION} expected); {hint}")
    shard = meta.pop("shard")
    meta.pop("version")
    return ShardScores(shard, keys, scores.astype(np.float32), offsets.astype(np.int64), meta,
                       arrays.get("image_emb"), arrays.get("text_emb"))
