"""Text↔image search over a photo collection (library side of ``launch/search.py``).

Index a folder of photos once, then query it by text or by image:

    from ernievil2.search import build_index, load_encoder, load_index, query_text, write_html

    encoder = load_encoder("outputs/demo/RUN/checkpoints/step_0000600")      # vocab.txt beside it
    build_index("~/Pictures", "photos.index", encoder)                       # resumable
    index = load_index("photos.index")
    hits = query_text(index, encoder, "红色的圆形", k=10)                    # [(path, score, i), ...]
    write_html(hits, "results.html", query="红色的圆形")

**Images.** Every file under the root whose name ends in ``.jpg .jpeg .png .webp .bmp .gif``
(any case) is embedded, recursively, in sorted path order (other files are counted as
*ignored*). Each one goes through :func:`ernievil2.data.preprocess.preprocess` with the index's
profile (``official`` by default: the inference preprocessing, the same as the in-loop
evaluator) at the model's image size, then ``model.encode_image`` under ``paddle.no_grad()`` with
the model in eval mode. A file that cannot be read or decoded is skipped; its path and the reason
are kept in the index metadata (``skipped``) and reported.

**The index** is one folder:

* ``vectors.npy``: float32 ``[N, D]``, L2-normalised image embeddings;
* ``paths.json``: the N image paths, **relative to the indexed root** (POSIX separators), in the
  row order of ``vectors.npy``; queries return ``root / path``;
* ``index.json``: format/version, the absolute ``root``, ``count``, ``dim``, the checkpoint and
  vocab it was built with and their :class:`ModelIdentity` (sha256 of the model's configuration
  and weights, sha256 of the vocab file, image size, profile, embedding width), ``skipped``,
  ``ignored`` and timestamps.

Every save rewrites the folder through :func:`ernievil2.atomic.atomic_dir` (temporary sibling
folder, fsync, rename), so a killed run leaves either the previous complete index or the new one.

**Resuming.** Building into an existing index embeds only the files whose relative path is not in
it yet (a modified file keeps its old vector; files that disappeared keep theirs too). Skipped
files are retried on every run. A long run saves every ``save_every_s`` seconds and when it is
interrupted (Ctrl-C or an error), so at most the batch in flight is lost; re-running continues.
An index covers one root: building it from another folder is refused.

**Identity.** A query (or a resumed build) whose checkpoint, vocab, image size or profile differs
from the index's is refused with :class:`IdentityMismatchError`, which names both identities:
vectors of two models are not comparable.

**Search.** Exact inner product by default (NumPy: chunked matrix product + ``argpartition``),
or ``backend="faiss"`` (``faiss.IndexFlatIP``; the optional ``search`` extra,
``pip install -e ".[search]"``). Both return the top ``k`` by score, descending, ties broken by
index order (lower row first); faiss computes the scores with its own kernels, so where two scores
differ by float rounding only, or tie at the ``k``-th place, its order or cut may differ.
"""
from __future__ import annotations

import hashlib
import html
import json
import os
import time
import urllib.parse
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Sequence

import numpy as np

from ernievil2.atomic import atomic_dir, atomic_write

__all__ = [
    "IMAGE_EXTENSIONS", "BACKENDS", "VECTORS_FILE", "PATHS_FILE", "META_FILE", "FORMAT", "FORMAT_VERSION",
    "SearchError", "IdentityMismatchError", "ModelIdentity", "Encoder", "load_encoder", "scan_images",
    "SkippedFile", "SearchHit", "SearchIndex", "IndexReport", "load_index", "build_index", "top_k",
    "faiss_top_k", "check_identity", "encoder_for_index", "query_text", "query_image", "write_html", "sha256_file",
    "model_sha256",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
BACKENDS: tuple[str, ...] = ("numpy", "faiss")
VECTORS_FILE = "vectors.npy"
PATHS_FILE = "paths.json"
META_FILE = "index.json"
FORMAT = "ernievil2-search-index"
FORMAT_VERSION = 1
FAISS_HINT = 'pip install -e ".[search]" (faiss-cpu==1.15.1)'


# --------------------------------------------------------------------------- errors
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


# --------------------------------------------------------------------------- identity
def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def model_sha256(model: Any) -> str:
    """Hex sha256 of a dual encoder's configuration (``model.cfg``) and of every tensor of its state
    (name, shape, float32 bytes), in name order: the same for any layout the weights came from."""
    from ernievil2.checkpoint import state_to_numpy

    h = hashlib.sha256()
    h.update(json.dumps(asdict(model.cfg), sort_keys=True, default=str).encode("utf-8"))
    for name, value in sorted(state_to_numpy(model).items()):
        arr = np.ascontiguousarray(value)
        h.update(f"\0{name}\0{arr.dtype.str}\0{arr.shape}\0".encode("utf-8"))
        h.update(arr.tobytes())
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


# --------------------------------------------------------------------------- encoder
@dataclass
class Encoder:
    """A model + tokenizer ready to embed queries and photos, with its :class:`ModelIdentity`.

    ``checkpoint`` / ``vocab_file`` are where they came from (recorded in an index; informative)."""

    model: Any
    tokenizer: Any
    identity: ModelIdentity
    checkpoint: str = ""
    vocab_file: str = ""
    text_max_length: int = 48

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any, profile: str = "official", checkpoint: str = "",
                   text_max_length: int = 48) -> "Encoder":
        """Wrap an in-memory ``model`` (put in eval mode) and ``tokenizer``; hashes the weights."""
        from ernievil2.data.preprocess import PROFILES

        if profile not in PROFILES:
            raise SearchError(f"unknown profile {profile!r}; choose one of {list(PROFILES)}")
        if not 2 <= text_max_length <= model.cfg.text.max_positions:
            raise SearchError(f"text_max_length must be in [2, {model.cfg.text.max_positions}], got {text_max_length}")
        model.eval()
        identity = ModelIdentity(model_sha256(model), sha256_file(tokenizer.vocab_file), int(model.cfg.vision.image_size),
                                 profile, int(model.cfg.vision.width))
        return cls(model, tokenizer, identity, checkpoint, str(Path(tokenizer.vocab_file).resolve()), text_max_length)

    @property
    def image_size(self) -> int:
        return self.identity.image_size

    @property
    def profile(self) -> str:
        return self.identity.profile

    def preprocess_file(self, path: str | os.PathLike) -> np.ndarray:
        """float32 ``[3, S, S]`` of an image file (``OSError`` / ``ValueError`` when unusable)."""
        from ernievil2.data.preprocess import preprocess

        return preprocess(Path(path).read_bytes(), profile=self.profile, size=self.image_size, key=str(path))

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """L2-normalised float32 ``[B, D]`` image embeddings of preprocessed ``[B, 3, S, S]`` pixels."""
        from ernievil2.encode import embed_pixels

        return embed_pixels(self.model, pixels, batch_size=max(len(pixels), 1))

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """L2-normalised float32 ``[N, D]`` text embeddings (WordPiece, ``text_max_length``), as the
        evaluators embed captions (:func:`ernievil2.encode.embed_texts`)."""
        from ernievil2.encode import embed_texts

        texts = list(texts)
        if not texts:
            return np.empty((0, self.identity.dim), dtype=np.float32)
        for t in texts:
            if not isinstance(t, str) or not t.strip():
                raise SearchError("empty query text")
        return embed_texts(self.model, self.tokenizer, texts, self.text_max_length, batch_size)

    def encode_image_files(self, paths: Sequence[str | os.PathLike]) -> np.ndarray:
        """L2-normalised float32 ``[N, D]`` embeddings of image files (:class:`SearchError` naming an
        unreadable or undecodable one)."""
        pixels = []
        for p in paths:
            if not Path(p).is_file():
                raise SearchError(f"query image not found: {p}")
            try:
                pixels.append(self.preprocess_file(p))
            except (OSError, ValueError) as exc:
                raise SearchError(f"query image {p}: {exc}") from None
        if not pixels:
            return np.empty((0, self.identity.dim), dtype=np.float32)
        return self.encode_pixels(np.stack(pixels))


def load_encoder(checkpoint: str | os.PathLike, vocab: Optional[str | os.PathLike] = None, *,
                 profile: str = "official", text_max_length: int = 48, device: str = "auto",
                 fallback_vocab: Optional[str | os.PathLike] = None) -> Encoder:
    """The model of ``checkpoint`` (any layout) and its tokenizer, loaded by
    :func:`ernievil2.checkpoint.load_model`.

    The vocab is ``vocab``, else the checkpoint's (:func:`ernievil2.checkpoint.find_vocab`:
    ``vocab.txt`` beside its weights, then in its run folder), else ``fallback_vocab`` when it exists
    (an index's recorded vocab). Errors (missing checkpoint, no vocab, a checkpoint that does not
    load) are :class:`SearchError`."""
    from ernievil2.checkpoint import load_model
    from ernievil2.inference import resolve_device

    ckpt = Path(checkpoint).expanduser()
    if not ckpt.exists():
        raise SearchError(f"checkpoint not found: {ckpt}")
    ckpt = ckpt.resolve()
    resolve_device(device)
    try:
        loaded = load_model(ckpt, Path(vocab).expanduser() if vocab else None, fallback_vocab=fallback_vocab)
    except (ValueError, KeyError, OSError) as exc:
        raise SearchError(f"cannot load checkpoint {ckpt}: {exc}") from None
    if loaded.vocab_file is None:
        raise SearchError(f"no WordPiece vocab for checkpoint {ckpt}: no vocab.txt in or beside it; pass --vocab PATH")
    # from_model checks text_max_length (the tokenizer is always called with it)
    return Encoder.from_model(loaded.model, loaded.tokenizer(), profile, str(ckpt), text_max_length)


# --------------------------------------------------------------------------- files
def scan_images(root: str | os.PathLike) -> tuple[list[str], int]:
    """``(image paths relative to root in sorted POSIX form, number of other files)``, recursively
    (symbolic links to folders are not followed)."""
    root = Path(root)
    found: list[str] = []
    ignored = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            if name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(Path(dirpath, name).relative_to(root).as_posix())
            else:
                ignored += 1
    return sorted(found), ignored


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


# --------------------------------------------------------------------------- top-k
def _chunk_top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``scores`` ``[m, c]`` the columns of its ``k`` best, ties at the cut broken by
    lower column; returns ``(values [m, k], columns [m, k])`` (unsorted within a row)."""
    m, c = scores.shape
    if k >= c:
        cols = np.broadcast_to(np.arange(c), (m, c))
        return scores, cols
    kth = -np.partition(-scores, k - 1, axis=1)[:, k - 1 : k]  # the k-th largest value of each row
    above = scores > kth
    at = scores == kth
    need = k - above.sum(axis=1, keepdims=True)
    keep = above | (at & (np.cumsum(at, axis=1) <= need))
    rows, cols = np.nonzero(keep)  # row-major: exactly k per row, columns ascending
    cols = cols.reshape(m, k)
    return np.take_along_axis(scores, cols, axis=1), cols


def _sort_hits(values: np.ndarray, idx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((idx, -values), axis=-1)[:, :k]
    return np.take_along_axis(values, order, axis=1), np.take_along_axis(idx, order, axis=1)


def top_k(vectors: np.ndarray, queries: np.ndarray, k: int, chunk_elements: int = 1 << 24) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product search: ``(scores [m, k'], rows [m, k'])`` with ``k' = min(k, N)``, each
    row sorted by score descending, ties by lower row. ``vectors`` ``[N, D]`` is scanned in chunks
    of about ``chunk_elements`` scores (``m × chunk`` floats) at a time."""
    vectors, queries = _check_search_args(vectors, queries, k)
    n, m = len(vectors), len(queries)
    k = min(k, n)
    if k == 0 or m == 0:
        return np.empty((m, k), dtype=np.float32), np.empty((m, k), dtype=np.int64)
    chunk = max(k, chunk_elements // max(m, 1), 1)
    best_v = np.empty((m, 0), dtype=np.float32)
    best_i = np.empty((m, 0), dtype=np.int64)
    for a in range(0, n, chunk):
        scores = queries @ vectors[a : a + chunk].T
        v, c = _chunk_top_k(scores, k)
        best_v = np.concatenate([best_v, v.astype(np.float32, copy=False)], axis=1)
        best_i = np.concatenate([best_i, c.astype(np.int64) + a], axis=1)
        best_v, best_i = _sort_hits(best_v, best_i, k)
    return best_v, best_i


def _check_search_args(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    vectors = np.asarray(vectors, dtype=np.float32)
    queries = np.asarray(queries, dtype=np.float32)
    if queries.ndim == 1:
        queries = queries[None]
    if vectors.ndim != 2 or queries.ndim != 2 or queries.shape[1] != vectors.shape[1]:
        raise SearchError(f"queries {queries.shape} do not match the index vectors {vectors.shape}")
    if k < 1:
        raise SearchError(f"k must be >= 1, got {k}")
    return vectors, queries


def _import_faiss():
    try:
        import faiss
    except ImportError:
        raise SearchError(f"the faiss backend needs the faiss-cpu package: {FAISS_HINT}") from None
    return faiss


def faiss_top_k(vectors: np.ndarray, queries: np.ndarray, k: int, index: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`top_k` through ``faiss.IndexFlatIP`` (``index``: one already holding ``vectors``);
    the ``k`` rows faiss returns are re-sorted by (score desc, row asc), so equal scores come in
    index order (which of several rows tying at the ``k``-th score are kept is faiss's choice)."""
    faiss = _import_faiss()
    vectors, queries = _check_search_args(vectors, queries, k)
    k = min(k, len(vectors))
    m = len(queries)
    if k == 0 or m == 0:
        return np.empty((m, k), dtype=np.float32), np.empty((m, k), dtype=np.int64)
    if index is None:
        index = faiss.IndexFlatIP(vectors.shape[1])
        index.add(np.ascontiguousarray(vectors))
    values, rows = index.search(np.ascontiguousarray(queries), k)
    return _sort_hits(values.astype(np.float32), rows.astype(np.int64), k)


# --------------------------------------------------------------------------- the index
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


@dataclass
class IndexReport:
    """What :func:`build_index` did."""

    index: SearchIndex
    found: int  # image files under the root
    before: int  # rows the index held before this run
    added: int  # rows embedded by this run
    skipped: list[SkippedFile]  # unusable image files (this run)
    ignored: int  # other files under the root
    seconds: float

    def summary(self, max_items: int = 10) -> str:
        rate = f" ({self.added / self.seconds:.1f} images/s)" if self.added and self.seconds > 0 else ""
        lines = [
            f"index {self.index.folder}: {len(self.index)} images of {self.index.root}",
            f"  {self.found} image files found, {self.before} already indexed, {self.added} added in "
            f"{self.seconds:.1f} s{rate}, {len(self.skipped)} skipped, {self.ignored} other files ignored",
        ]
        for s in self.skipped[:max_items]:
            lines.append(f"  skipped {s.path}: {s.reason}")
        if len(self.skipped) > max_items:
            lines.append(f"  ... and {len(self.skipped) - max_items} more (index.json: skipped)")
        return "\n".join(lines)


def _open_for_build(folder: Path, root: Path, encoder: Encoder) -> Optional[SearchIndex]:
    """The existing index in ``folder`` (same root and identity), or ``None`` for a new one."""
    _recover(folder)
    if (folder / META_FILE).is_file():
        index = load_index(folder)
        if index.root != root:
            raise SearchError(f"index {folder} covers {index.root}, not {root}: give another --out for another folder")
        check_identity(index, encoder)
        return index
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise SearchError(f"{folder} exists and is not a search index: refusing to replace it")
    return None


def build_index(images: str | os.PathLike, folder: str | os.PathLike, encoder: Encoder, *, batch_size: int = 32,
                num_workers: int = 2, progress: bool = True, save_every_s: float = 60.0) -> IndexReport:
    """Embed the image files under ``images`` not yet in the index ``folder`` (created when absent)
    and save it; see the module docstring. ``num_workers`` threads read and preprocess the next
    batch while the model embeds the current one. The index is saved every ``save_every_s``
    seconds (0: after every batch), at the end, and before an exception propagates."""
    from tqdm.auto import tqdm

    from ernievil2.data.preprocess import preprocess

    if batch_size < 1:
        raise SearchError(f"batch_size must be >= 1, got {batch_size}")
    start = time.perf_counter()
    root = Path(images).expanduser()
    if not root.is_dir():
        raise SearchError(f"image folder not found: {root}")
    root = root.resolve()
    folder = Path(folder).expanduser().absolute()
    index = _open_for_build(folder, root, encoder)
    found, ignored = scan_images(root)
    if index is None:
        if not found:
            raise SearchError(f"no image files ({' '.join(IMAGE_EXTENSIONS)}) under {root}")
        index = SearchIndex(folder, root, [], np.empty((0, encoder.identity.dim), dtype=np.float32), encoder.identity,
                            encoder.checkpoint, encoder.vocab_file)
        dirty = True
    else:
        dirty = False
    before = len(index)
    known = set(index.paths)
    todo = [p for p in found if p not in known]
    skipped: list[SkippedFile] = []
    new_paths: list[str] = []
    new_vectors: list[np.ndarray] = []

    def load(rel: str) -> np.ndarray | SkippedFile:
        try:
            data = (root / rel).read_bytes()
        except OSError as exc:
            return SkippedFile(rel, f"unreadable: {exc.strerror or exc}")
        try:
            return preprocess(data, profile=encoder.profile, size=encoder.image_size, key=rel)
        except ValueError as exc:
            return SkippedFile(rel, f"undecodable: {exc}")
        except Exception as exc:  # any decoder failure on a user's file skips that file only
            return SkippedFile(rel, f"undecodable: {type(exc).__name__}: {exc}")

    def commit() -> None:
        nonlocal new_paths, new_vectors
        if new_paths:
            index.vectors = np.concatenate([index.vectors, *new_vectors]).astype(np.float32, copy=False)
            index.paths = index.paths + new_paths
            new_paths, new_vectors = [], []
        index.skipped = sorted(skipped, key=lambda s: s.path)
        index.ignored = ignored
        index.save()

    batches = [todo[a : a + batch_size] for a in range(0, len(todo), batch_size)]
    pool = ThreadPoolExecutor(num_workers) if num_workers > 0 else None
    submit: Callable[[list[str]], list[Any]] = (
        (lambda rels: [pool.submit(load, r) for r in rels]) if pool is not None else (lambda rels: rels)
    )

    def results(pending: list[Any]) -> list[np.ndarray | SkippedFile]:
        return [p.result() if isinstance(p, Future) else load(p) for p in pending]

    last_save = time.monotonic()
    bar = tqdm(total=len(todo), unit="img", desc="index", disable=not progress)
    try:
        pending = submit(batches[0]) if batches else []
        for b, rels in enumerate(batches):
            loaded = results(pending)
            pending = submit(batches[b + 1]) if b + 1 < len(batches) else []
            good = [(r, x) for r, x in zip(rels, loaded) if not isinstance(x, SkippedFile)]
            skipped.extend(x for x in loaded if isinstance(x, SkippedFile))
            if good:
                vectors = encoder.encode_pixels(np.stack([x for _, x in good]))
                new_vectors.append(vectors)
                new_paths.extend(r for r, _ in good)
            bar.update(len(rels))
            if save_every_s <= 0 or time.monotonic() - last_save >= save_every_s:
                commit()
                last_save = time.monotonic()
    except BaseException:
        if new_paths:  # keep every finished batch; a re-run continues from there
            commit()
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    before_skipped = {(s.path, s.reason) for s in index.skipped}
    if dirty or new_paths or before_skipped != {(s.path, s.reason) for s in skipped} or index.ignored != ignored:
        commit()
    return IndexReport(index, len(found), before, len(index) - before, index.skipped, ignored,
                       time.perf_counter() - start)


# --------------------------------------------------------------------------- queries
def encoder_for_index(index: SearchIndex, checkpoint: Optional[str | os.PathLike] = None,
                      vocab: Optional[str | os.PathLike] = None, *, device: str = "auto",
                      text_max_length: int = 48) -> Encoder:
    """The encoder of ``index``: its recorded checkpoint (or ``checkpoint``) and vocab (or
    ``vocab``, or the one in/beside ``checkpoint``), its profile; :class:`IdentityMismatchError`
    when it does not make vectors comparable with the index's."""
    ckpt = checkpoint or index.checkpoint
    if not ckpt:
        raise SearchError(f"index {index.folder} records no checkpoint; pass one (--ckpt)")
    # no --vocab and no vocab.txt in/beside the checkpoint: the vocab the index was built with
    encoder = load_encoder(ckpt, vocab, profile=index.identity.profile, text_max_length=text_max_length,
                           device=device, fallback_vocab=index.vocab_file or None)
    check_identity(index, encoder)
    return encoder


def query_text(index: SearchIndex, encoder: Encoder, text: str, k: int = 10, backend: str = "numpy") -> list[SearchHit]:
    """Top ``k`` images for a text query."""
    check_identity(index, encoder)
    return index.search(encoder.encode_texts([text]), k, backend)[0]


def query_image(index: SearchIndex, encoder: Encoder, image: str | os.PathLike, k: int = 10,
                backend: str = "numpy") -> list[SearchHit]:
    """Top ``k`` images for an image query (preprocessed like the indexed photos)."""
    check_identity(index, encoder)
    return index.search(encoder.encode_image_files([image]), k, backend)[0]


# --------------------------------------------------------------------------- HTML
def _src(path: str, page_dir: Path, relative: bool) -> str:
    p = Path(path).absolute()
    if relative:
        return urllib.parse.quote(Path(os.path.relpath(p, page_dir)).as_posix())
    return p.as_uri()


def write_html(hits: Sequence[SearchHit], out_path: str | os.PathLike, *, query: Optional[str] = None,
               query_image: Optional[str | os.PathLike] = None, title: str = "ernievil2 search",
               relative: bool = True) -> Path:
    """A static gallery page of ``hits`` (thumbnail, rank, score, path), written atomically.
    Image ``src`` are relative to the page (``relative=False``: ``file://`` URIs); every path and
    the query are HTML-escaped."""
    out = Path(out_path).expanduser().absolute()
    page_dir = out.parent
    e = html.escape
    head = []
    if query:
        head.append(f'<p class="query">query: <q>{e(query)}</q></p>')
    if query_image:
        head.append(f'<p class="query">query image: <img class="thumb" src="{e(_src(str(query_image), page_dir, relative))}" '
                    f'alt="{e(str(query_image))}"> <code>{e(str(query_image))}</code></p>')
    cards = []
    for rank, hit in enumerate(hits, start=1):
        cards.append(
            f'<figure><a href="{e(_src(hit.path, page_dir, relative))}">'
            f'<img class="thumb" loading="lazy" src="{e(_src(hit.path, page_dir, relative))}" alt="{e(hit.path)}"></a>'
            f'<figcaption><b>{rank}.</b> <span class="score">{hit.score:.4f}</span><br>'
            f'<code>{e(hit.path)}</code></figcaption></figure>'
        )
    page = "\n".join([
        "<!DOCTYPE html>", '<html><head><meta charset="utf-8">', f"<title>{e(title)}</title>",
        "<style>body{font-family:sans-serif;margin:1em}figure{display:inline-block;vertical-align:top;width:220px;"
        "margin:6px}img.thumb{max-width:200px;max-height:200px}code{word-break:break-all;font-size:small}</style>",
        "</head><body>", f"<h1>{e(title)}</h1>", *head, f"<p>{len(hits)} results</p>", '<div class="results">',
        *cards, "</div>", "</body></html>", "",
    ])
    with atomic_write(out) as f:
        f.write(page)
    return out
