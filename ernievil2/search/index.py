"""The search index folder: its files, reading and writing it, and searching it.

The index is one folder:

* ``vectors.npy``: float32 ``[N, D]``, L2-normalised image embeddings;
* ``paths.json``: the N image paths, **relative to the indexed root** (POSIX separators), in the
  row order of ``vectors.npy``; queries return ``root / path``;
* ``index.json``: format/version, the absolute ``root``, ``count``, ``dim``, the checkpoint and
  vocab it was built with and their :class:`~ernievil2.search.identity.ModelIdentity` (sha256 of
  the model's configuration and weights, sha256 of the vocab file, image size, profile, embedding
  width), ``skipped``, ``ignored`` and timestamps.

Every save rewrites the folder through :func:`ernievil2.atomic.atomic_dir` (temporary sibling
folder, fsync, rename), so a killed run leaves either the previous complete index or the new one.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from ernievil2.atomic import atomic_dir
from ernievil2.search.identity import IdentityMismatchError, ModelIdentity, SearchError
from ernievil2.search.topk import BACKENDS, _import_faiss, faiss_top_k, top_k

if TYPE_CHECKING:
    from ernievil2.search.encoder import Encoder

__all__ = [
    "VECTORS_FILE", "PATHS_FILE", "META_FILE", "FORMAT", "FORMAT_VERSION", "SkippedFile", "SearchHit",
    "SearchIndex", "load_index", "check_identity",
]

VECTORS_FILE = "vectors.npy"
PATHS_FILE = "paths.json"
META_FILE = "index.json"
FORMAT = "ernievil2-search-index"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class SkippedFile:
    """An image file left out of the index: its path relative to the root and why."""

    path: str
    reason: str


class SearchHit(NamedTuple):
    """One result: the image's path (the index root joined with its stored relative path), the
    cosine score and the row of the index."""

    path: str
    score: float
    index: int


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class SearchIndex:
    """An index folder in memory (see the module docstring for the files)."""

    folder: Path
    root: Path
    paths: list[str]
    vectors: np.ndarray
    identity: ModelIdentity
    checkpoint: str = ""
    vocab_file: str = ""
    skipped: list[SkippedFile] = field(default_factory=list)
    ignored: int = 0
    created: str = field(default_factory=_now)
    updated: str = ""
    _faiss: Any = field(default=None, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.paths)

    def meta(self) -> dict[str, Any]:
        """The content of ``index.json``."""
        return {
            "format": FORMAT, "version": FORMAT_VERSION, "root": str(self.root), "count": len(self.paths),
            "dim": int(self.vectors.shape[1]), "identity": self.identity.to_json(), "checkpoint": self.checkpoint,
            "vocab_file": self.vocab_file, "paths": "relative to root", "skipped": [asdict(s) for s in self.skipped],
            "ignored": self.ignored, "created": self.created, "updated": self.updated,
        }

    def save(self) -> None:
        """Write the three files into a temporary sibling folder and rename it onto ``folder``."""
        if self.vectors.shape != (len(self.paths), self.identity.dim):
            raise SearchError(f"index vectors {self.vectors.shape} do not match {len(self.paths)} paths × dim {self.identity.dim}")
        self.updated = _now()
        with atomic_dir(self.folder) as tmp:
            with open(tmp / VECTORS_FILE, "wb") as f:
                np.save(f, np.ascontiguousarray(self.vectors, dtype=np.float32))
            (tmp / PATHS_FILE).write_text(json.dumps(self.paths, ensure_ascii=False), encoding="utf-8")
            (tmp / META_FILE).write_text(json.dumps(self.meta(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        self._faiss = None

    def absolute(self, row: int) -> str:
        """The path of row ``row``: the root joined with its stored relative path."""
        return str(self.root / self.paths[row])

    def search(self, queries: np.ndarray, k: int = 10, backend: str = "numpy") -> list[list[SearchHit]]:
        """Top ``k`` hits for each query vector (``[D]`` or ``[m, D]``, L2-normalised)."""
        if backend not in BACKENDS:
            raise SearchError(f"unknown backend {backend!r}; choose one of {list(BACKENDS)}")
        if backend == "faiss":
            if self._faiss is None and len(self.paths):
                faiss = _import_faiss()
                self._faiss = faiss.IndexFlatIP(self.identity.dim)
                self._faiss.add(np.ascontiguousarray(self.vectors, dtype=np.float32))
            values, rows = faiss_top_k(self.vectors, queries, k, self._faiss)
        else:
            values, rows = top_k(self.vectors, queries, k)
        return [[SearchHit(self.absolute(int(r)), float(v), int(r)) for v, r in zip(vr, rr)]
                for vr, rr in zip(values, rows)]


def _recover(folder: Path) -> None:
    """Put back ``.NAME.old`` when a kill fell between the two renames of :func:`atomic_dir`."""
    old = folder.with_name(f".{folder.name}.old")
    if not folder.exists() and (old / META_FILE).is_file():
        os.replace(old, folder)


def load_index(folder: str | os.PathLike) -> SearchIndex:
    """Read an index folder; :class:`SearchError` when it is missing, not an index, or inconsistent."""
    folder = Path(folder).expanduser()
    _recover(folder)
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        what = "no such folder" if not folder.exists() else f"no {META_FILE} in it"
        raise SearchError(f"{folder} is not a search index ({what})")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT:
            raise SearchError(f"{meta_path}: not a {FORMAT} file")
        if int(meta.get("version", 0)) > FORMAT_VERSION:
            raise SearchError(f"{meta_path}: index format version {meta['version']} is newer than this code ({FORMAT_VERSION})")
        paths = json.loads((folder / PATHS_FILE).read_text(encoding="utf-8"))
        vectors = np.load(folder / VECTORS_FILE, allow_pickle=False)
        identity = ModelIdentity.from_json(meta["identity"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        if isinstance(exc, SearchError):
            raise
        raise SearchError(f"{folder}: unreadable search index: {exc}") from None
    if vectors.dtype != np.float32 or vectors.shape != (len(paths), identity.dim) or meta.get("count") != len(paths):
        raise SearchError(f"{folder}: inconsistent index: {len(paths)} paths, count {meta.get('count')}, "
                          f"vectors {vectors.dtype} {vectors.shape}, dim {identity.dim}")
    return SearchIndex(
        folder=folder, root=Path(meta["root"]), paths=list(paths), vectors=vectors, identity=identity,
        checkpoint=meta.get("checkpoint", ""), vocab_file=meta.get("vocab_file", ""),
        skipped=[SkippedFile(**s) for s in meta.get("skipped", [])], ignored=int(meta.get("ignored", 0)),
        created=meta.get("created", ""), updated=meta.get("updated", ""),
    )


def check_identity(index: SearchIndex, encoder: Encoder) -> None:
    """:class:`IdentityMismatchError` unless ``encoder`` makes vectors comparable with ``index``'s."""
    if index.identity != encoder.identity:
        raise IdentityMismatchError(index.identity, encoder.identity, f"index {index.folder}",
                                    index.checkpoint, encoder.checkpoint)
