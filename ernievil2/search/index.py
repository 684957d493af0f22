"""The search index folder: its files, reading and writing it, and searching it.

The index is one folder:

* ``vectors.npy``: float32 ``[N, D]``, L2-normalised image embeddings;
* ``paths.json``: the N image paths, **relative to the indexed root** (POSIX separators), in the
  row order of ``vectors.npy``; queries return ``root / path``;
* ``index.json``: format/version, the absolute ``root``, ``count``, ``dim``, the checkpoint and
  vocab it was built with and their :class:`~ernievil2.search.identity.ModelIdentity` (sha256 of
  the model's configuration and weights, sha256 of the vocab file, image size, profile, embedding
  width), ``skipped``, ``ignored``, timestamps and ``ann`` (:class:`~ernievil2.search.ann.AnnInfo`,
  or null);
* ``ann.faiss`` (when ``ann`` is not null, version 2): the approximate IVF index over all the rows
  (:mod:`ernievil2.search.ann`), which queries use by default (``backend="auto"``).

Every save rewrites the folder through :func:`ernievil2.atomic.atomic_dir` (temporary sibling
folder, fsync, rename), so a killed run leaves either the previous complete index or the new one.
A save after the rows changed drops the approximate index unless a new one was built
(:meth:`SearchIndex.build_ann`). Version-1 folders (no ``ann``) load and are searched exactly.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Optional

import numpy as np

from ernievil2.atomic import atomic_dir
from ernievil2.search import ann as _ann
from ernievil2.search import topk
from ernievil2.search.ann import ANN_FILE, AnnInfo
from ernievil2.search.identity import IdentityMismatchError, ModelIdentity, SearchError
from ernievil2.search.topk import BACKENDS, faiss_top_k, top_k

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
FORMAT_VERSION = 2  # 2: the approximate index (``ann`` in index.json, ann.faiss)


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
    ann: Optional[AnnInfo] = None
    _faiss: Any = field(default=None, init=False, repr=False, compare=False)
    _ann_index: Any = field(default=None, init=False, repr=False, compare=False)  # loaded or built
    _ann_saved: bool = field(default=True, init=False, repr=False, compare=False)  # ann.faiss in folder is it

    def __len__(self) -> int:
        return len(self.paths)

    def meta(self) -> dict[str, Any]:
        """The content of ``index.json``."""
        return {
            "format": FORMAT, "version": FORMAT_VERSION, "root": str(self.root), "count": len(self.paths),
            "dim": int(self.vectors.shape[1]), "identity": self.identity.to_json(), "checkpoint": self.checkpoint,
            "vocab_file": self.vocab_file, "paths": "relative to root", "skipped": [asdict(s) for s in self.skipped],
            "ignored": self.ignored, "created": self.created, "updated": self.updated,
            "ann": self.ann.to_json() if self.ann is not None else None,
        }

    def save(self) -> None:
        """Write the files into a temporary sibling folder and rename it onto ``folder`` (an
        approximate index built for other rows than these is dropped)."""
        if self.vectors.shape != (len(self.paths), self.identity.dim):
            raise SearchError(f"index vectors {self.vectors.shape} do not match {len(self.paths)} paths × dim {self.identity.dim}")
        if self.ann is not None and self.ann.count != len(self.paths):
            self.drop_ann()
        self.updated = _now()
        with atomic_dir(self.folder) as tmp:
            with open(tmp / VECTORS_FILE, "wb") as f:
                np.save(f, np.ascontiguousarray(self.vectors, dtype=np.float32))
            (tmp / PATHS_FILE).write_text(json.dumps(self.paths, ensure_ascii=False), encoding="utf-8")
            if self.ann is not None:
                self._write_ann(tmp / ANN_FILE)
            (tmp / META_FILE).write_text(json.dumps(self.meta(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        self._faiss = None
        self._ann_saved = True

    def _write_ann(self, dest: Path) -> None:
        """Put the approximate index at ``dest``: written when built in memory, else a hard link to
        (or a copy of) the folder's current ``ann.faiss``."""
        if not self._ann_saved:
            _ann.write_ivf(self._ann_index, str(dest))
            return
        src = self.folder / ANN_FILE
        try:
            os.link(src, dest)
        except OSError:
            shutil.copyfile(src, dest)

    def build_ann(self, **options: Any) -> AnnInfo:
        """Build the approximate index over the current rows (:func:`ernievil2.search.ann.build_ivf`
        with ``options``); the next :meth:`save` writes it."""
        self._ann_index, self.ann = _ann.build_ivf(self.vectors, **options)
        self._ann_saved = False
        return self.ann

    def drop_ann(self) -> None:
        """Forget the approximate index (the next :meth:`save` leaves it out)."""
        self.ann, self._ann_index, self._ann_saved = None, None, True

    def absolute(self, row: int) -> str:
        """The path of row ``row``: the root joined with its stored relative path."""
        return str(self.root / self.paths[row])

    def backend_for(self, backend: str = "auto") -> tuple[str, str]:
        """``(the backend`` :meth:`search` ``uses for backend, a note)``: ``"auto"`` is ``"ivf"`` when
        the index has an approximate index and faiss imports, else ``"numpy"`` (with a note when the
        approximate index is there but faiss is not); ``"ivf"`` without either is a :class:`SearchError`."""
        if backend not in BACKENDS:
            raise SearchError(f"unknown backend {backend!r}; choose one of {list(BACKENDS)}")
        if backend not in ("auto", "ivf"):
            return backend, ""
        if self.ann is None:
            if backend == "ivf":
                raise SearchError(f"index {self.folder} has no approximate index "
                                  "(build one: launch/search.py index ... --ann ivf)")
            return "numpy", ""
        try:
            topk._import_faiss()
        except SearchError:
            if backend == "ivf":
                raise
            return "numpy", f"exact search: the approximate index needs faiss; {topk.FAISS_HINT}"
        return "ivf", ""

    def search(self, queries: np.ndarray, k: int = 10, backend: str = "auto") -> list[list[SearchHit]]:
        """Top ``k`` hits for each query vector (``[D]`` or ``[m, D]``, L2-normalised); ``backend``:
        :meth:`backend_for` (``"numpy"``: exact; ``"faiss"``: exact, faiss's flat index)."""
        backend, _ = self.backend_for(backend)
        if backend == "ivf":
            if self._ann_index is None:
                self._ann_index = _ann.read_ivf(str(self.folder / ANN_FILE), self.ann, self.identity.dim)
            values, rows = _ann.ivf_top_k(self._ann_index, queries, k, self.ann.nprobe)
        elif backend == "faiss":
            if self._faiss is None and len(self.paths):
                faiss = topk._import_faiss()
                self._faiss = faiss.IndexFlatIP(self.identity.dim)
                self._faiss.add(np.ascontiguousarray(self.vectors, dtype=np.float32))
            values, rows = faiss_top_k(self.vectors, queries, k, self._faiss)
        else:
            values, rows = top_k(self.vectors, queries, k)
        return [[SearchHit(self.absolute(int(r)), float(v), int(r)) for v, r in zip(vr, rr) if r >= 0]
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
        created=meta.get("created", ""), updated=meta.get("updated", ""), ann=_read_ann_info(folder, meta, len(paths)),
    )


def _read_ann_info(folder: Path, meta: dict[str, Any], count: int) -> Optional[AnnInfo]:
    """The approximate index ``index.json`` records, when its file is there and it covers the
    ``count`` rows (else ``None``: exact search; the next ``index`` run rebuilds it)."""
    data = meta.get("ann")
    if not data:
        return None
    try:
        info = AnnInfo.from_json(data)
    except TypeError as exc:
        raise SearchError(f"{folder}: unreadable 'ann' in {META_FILE}: {exc}") from None
    return info if info.count == count and (folder / ANN_FILE).is_file() else None


def check_identity(index: SearchIndex, encoder: Encoder) -> None:
    """:class:`IdentityMismatchError` unless ``encoder`` makes vectors comparable with ``index``'s."""
    if index.identity != encoder.identity:
        raise IdentityMismatchError(index.identity, encoder.identity, f"index {index.folder}",
                                    index.checkpoint, encoder.checkpoint)
