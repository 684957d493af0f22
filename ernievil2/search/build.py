"""Building a search index from a folder of photos (resumable).

**Images.** Every file under the root whose name ends in ``.jpg .jpeg .png .webp .bmp .gif``
(any case) is embedded, recursively, in sorted path order (other files are counted as
*ignored*). Each one goes through :func:`ernievil2.data.preprocess.preprocess` with the index's
profile (``official`` by default: the inference preprocessing, the same as the in-loop
evaluator) at the model's image size, then ``model.encode_image`` under ``paddle.no_grad()`` with
the model in eval mode (:meth:`Encoder.encode_pixels <ernievil2.search.encoder.Encoder.encode_pixels>`).
A file that cannot be read or decoded is skipped; its path and the reason are kept in the index
metadata (``skipped``) and reported. The index folder: :mod:`ernievil2.search.index`.

**Resuming.** Building into an existing index embeds only the files whose relative path is not in
it yet (a modified file keeps its old vector; files that disappeared keep theirs too). Skipped
files are retried on every run. A long run saves every ``save_every_s`` seconds and when it is
interrupted (Ctrl-C or an error), so at most the batch in flight is lost; re-running continues.
An index covers one root: building it from another folder is refused.

**The approximate index.** At the end of a run that leaves the rows changed (or an index without
the approximate index it should have), :func:`build_index` builds the IVF index over all the rows
when ``ann`` asks for it (``"auto"``: from ``min_ann_size`` vectors, when faiss is installed;
``"ivf"``: always; ``"off"``: never), measures its recall@10 against exact search and saves it with
the rest (:mod:`ernievil2.search.ann`). The periodic saves in between leave it out (it covers other
rows), so an interrupted run leaves an index searched exactly until the next run completes.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from ernievil2.search import topk
from ernievil2.search.ann import ANN_MODES, DEFAULT_MIN_ANN_SIZE, ann_decision
from ernievil2.search.encoder import Encoder
from ernievil2.search.identity import SearchError
from ernievil2.search.index import META_FILE, SearchIndex, SkippedFile, _recover, check_identity, load_index

__all__ = ["IMAGE_EXTENSIONS", "scan_images", "IndexReport", "build_index"]

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


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
    ann: str = ""  # how queries search it: the approximate index and its recall, or why exact

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
        if self.ann:
            lines.append(f"  {self.ann}")
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


def _start(images: str | os.PathLike, folder: str | os.PathLike,
           encoder: Encoder) -> tuple[Path, SearchIndex, bool, list[str], int]:
    """``(root, index, dirty, found, ignored)``: the resolved image folder, the index to grow (the
    existing one, or a new unsaved one: ``dirty``), the image files under the root and the number
    of other files."""
    root = Path(images).expanduser()
    if not root.is_dir():
        raise SearchError(f"image folder not found: {root}")
    root = root.resolve()
    folder = Path(folder).expanduser().absolute()
    index = _open_for_build(folder, root, encoder)
    found, ignored = scan_images(root)
    if index is not None:
        return root, index, False, found, ignored
    if not found:
        raise SearchError(f"no image files ({' '.join(IMAGE_EXTENSIONS)}) under {root}")
    index = SearchIndex(folder, root, [], np.empty((0, encoder.identity.dim), dtype=np.float32), encoder.identity,
                        encoder.checkpoint, encoder.vocab_file)
    return root, index, True, found, ignored


def _loader(root: Path, encoder: Encoder) -> Callable[[str], np.ndarray | SkippedFile]:
    """A function reading and preprocessing one image file (path relative to ``root``), or saying
    why it is skipped."""
    from ernievil2.data.preprocess import preprocess

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

    return load


class _Rows:
    """What a build adds to ``index``: the rows embedded and not yet committed, the files skipped."""

    def __init__(self, index: SearchIndex, ignored: int):
        self.index, self.ignored = index, ignored
        self.skipped: list[SkippedFile] = []
        self.paths: list[str] = []
        self.vectors: list[np.ndarray] = []

    def add(self, rels: list[str], loaded: list[np.ndarray | SkippedFile], encoder: Encoder) -> None:
        """Embed the usable files of one batch; note the skipped ones."""
        good = [(r, x) for r, x in zip(rels, loaded) if not isinstance(x, SkippedFile)]
        self.skipped.extend(x for x in loaded if isinstance(x, SkippedFile))
        if good:
            vectors = encoder.encode_pixels(np.stack([x for _, x in good]))
            self.vectors.append(vectors)
            self.paths.extend(r for r, _ in good)

    def take(self) -> bool:
        """Append the pending rows to the index (unsaved); whether there were any."""
        index = self.index
        if not self.paths:
            return False
        index.vectors = np.concatenate([index.vectors, *self.vectors]).astype(np.float32, copy=False)
        index.paths = index.paths + self.paths
        self.paths, self.vectors = [], []
        return True

    def commit(self) -> None:
        """Append the pending rows to the index, record the skipped files, and save it."""
        index = self.index
        self.take()
        index.skipped = sorted(self.skipped, key=lambda s: s.path)
        index.ignored = self.ignored
        index.save()


def _embed(todo: list[str], load: Callable[[str], np.ndarray | SkippedFile], rows: _Rows, encoder: Encoder, *,
           batch_size: int, num_workers: int, progress: bool, save_every_s: float) -> None:
    """Embed ``todo`` in batches into ``rows``, ``num_workers`` threads loading the next batch while
    the model embeds the current one; commit every ``save_every_s`` seconds and before an exception
    propagates."""
    from tqdm.auto import tqdm

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
            rows.add(rels, loaded, encoder)
            bar.update(len(rels))
            if save_every_s <= 0 or time.monotonic() - last_save >= save_every_s:
                rows.commit()
                last_save = time.monotonic()
    except BaseException:
        if rows.paths:  # keep every finished batch; a re-run continues from there
            rows.commit()
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _refresh_ann(index: SearchIndex, mode: str, min_size: int, options: dict[str, Any]) -> tuple[bool, str]:
    """Build or drop the approximate index as ``mode`` and ``min_size`` ask for the current rows;
    ``(changed, a line for the report)``. ``"auto"`` drops one that misses the target recall."""
    wanted, note = ann_decision(mode, len(index), min_size)
    current = index.ann is not None and index.ann.count == len(index)
    if not wanted and mode == "auto" and len(index) >= min_size and current:
        return False, note  # no faiss here: the index keeps it for where there is
    if not wanted:
        changed = index.ann is not None
        index.drop_ann()
        return changed, note
    if current:
        return False, index.ann.summary()
    info = index.build_ann(**options)
    if mode == "auto" and info.recall_at_10 < info.target_recall:
        index.drop_ann()
        return True, (f"exact search: the approximate index reached recall@10 {info.recall_at_10:.3f} only "
                      f"(< {info.target_recall:.2f} at nprobe {info.nprobe}); --ann ivf keeps it anyway")
    return True, info.summary()


def build_index(images: str | os.PathLike, folder: str | os.PathLike, encoder: Encoder, *, batch_size: int = 32,
                num_workers: int = 2, progress: bool = True, save_every_s: float = 60.0, ann: str = "auto",
                min_ann_size: int = DEFAULT_MIN_ANN_SIZE, ann_options: Optional[dict[str, Any]] = None) -> IndexReport:
    """Embed the image files under ``images`` not yet in the index ``folder`` (created when absent)
    and save it; see the module docstring. ``num_workers`` threads read and preprocess the next
    batch while the model embeds the current one. The index is saved every ``save_every_s``
    seconds (0: after every batch), at the end, and before an exception propagates. ``ann``,
    ``min_ann_size``: the approximate index (module docstring; ``ann_options`` go to
    :func:`ernievil2.search.ann.build_ivf`)."""
    if batch_size < 1:
        raise SearchError(f"batch_size must be >= 1, got {batch_size}")
    if ann not in ANN_MODES:
        raise SearchError(f"unknown --ann mode {ann!r}; choose one of {list(ANN_MODES)}")
    if ann == "ivf":
        topk._import_faiss()  # before any work
    start = time.perf_counter()
    root, index, dirty, found, ignored = _start(images, folder, encoder)
    before = len(index)
    known = set(index.paths)
    todo = [p for p in found if p not in known]
    rows = _Rows(index, ignored)
    _embed(todo, _loader(root, encoder), rows, encoder, batch_size=batch_size, num_workers=num_workers,
           progress=progress, save_every_s=save_every_s)
    before_skipped = {(s.path, s.reason) for s in index.skipped}
    unsaved = rows.take()
    try:
        ann_changed, ann_note = _refresh_ann(index, ann, min_ann_size, ann_options or {})
    except BaseException:
        if unsaved:  # keep the embedded rows; the approximate index is built by the next run
            rows.commit()
        raise
    if (dirty or unsaved or ann_changed or before_skipped != {(s.path, s.reason) for s in rows.skipped}
            or index.ignored != ignored):
        rows.commit()
    return IndexReport(index, len(found), before, len(index) - before, index.skipped, ignored,
                       time.perf_counter() - start, ann_note)
