"""WebDataset shards of multi-view samples: writing, decoding, listing and rank/worker-aware streaming.

Layout (img2dataset-compatible, one sample = three tar members sharing a key):

- ``KEY.jpg`` / ``KEY.png`` / ``KEY.webp``: the encoded image bytes, as given;
- ``KEY.txt``: the first caption, UTF-8;
- ``KEY.json``: ``{"key", "captions": [...], "language", "objects": [...] (absent when the sample
  has no object tags), **meta}``.

A ``sizes.json`` beside the shards maps each shard file name to its number of samples.

Streaming under paddle (see SPEC §8): ``wds.WebDataset``'s node/worker splitters read
``RANK``/``WORLD_SIZE`` and torch's worker info, neither of which paddle sets, so
:class:`ShardStream` does the split itself from the rank and world size of
:func:`ernievil2.distributed.dist_info` (the one reader of the launcher's variables) and
``paddle.io.get_worker_info()`` and only uses webdataset's low-level tar iterators.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import glob
import io
import json
import logging
import os
import signal
import sys
import tarfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Union

import braceexpand
import numpy as np
import paddle
from webdataset import tariterators

from ernievil2.atomic import atomic_write
from ernievil2.distributed import dist_info

from .sample import SKIP_KINDS, BadSample, RawSample

logger = logging.getLogger(__name__)

IMAGE_EXTS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
"""Image member suffixes recognised when reading, in order of preference."""

_RESERVED_JSON_KEYS = frozenset({"key", "captions", "language", "objects"})
_TAR_BLOCK = 512
_MAX_LOGGED_SKIPS = 5

PathLike = Union[str, os.PathLike]


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _validate_key(key: str) -> None:
    if not isinstance(key, str) or not key:
        raise ValueError(f"sample key must be a non-empty string, got {key!r}")
    if "." in key:
        raise ValueError(f"sample key {key!r} contains '.', which WebDataset uses to split key from extension")
    if "/" in key or "\\" in key:
        raise ValueError(f"sample key {key!r} contains a path separator")
    if key.startswith("__") and key.endswith("__"):
        raise ValueError(f"sample key {key!r} looks like WebDataset metadata (__...__) and would be skipped")


def _member_size(n_bytes: int) -> int:
    """Bytes one regular member takes in a tar: a header block plus data padded to 512."""
    return _TAR_BLOCK + -(-n_bytes // _TAR_BLOCK) * _TAR_BLOCK


def sample_to_members(sample: RawSample, image_ext: str = "jpg") -> list[tuple[str, bytes]]:
    """The ``(member name, bytes)`` triple one sample is stored as, in write order."""
    _validate_key(sample.key)
    ext = image_ext.lower().lstrip(".")
    if ext not in IMAGE_EXTS:
        raise ValueError(f"image_ext must be one of {IMAGE_EXTS}, got {image_ext!r} (key {sample.key!r})")
    if not isinstance(sample.image, (bytes, bytearray, memoryview)) or len(sample.image) == 0:
        raise ValueError(f"sample {sample.key!r} has no image bytes")
    captions = [str(c) for c in sample.captions]
    if not captions or not captions[0].strip():
        raise ValueError(f"sample {sample.key!r} has no caption")
    clash = _RESERVED_JSON_KEYS.intersection(sample.meta or {})
    if clash:
        raise ValueError(f"sample {sample.key!r}: meta uses reserved json field(s) {sorted(clash)}")
    record: dict[str, Any] = {"key": sample.key, "captions": captions, "language": sample.lang}
    if sample.objects is not None:
        record["objects"] = [str(o) for o in sample.objects]
    record.update(sample.meta or {})
    payload = json.dumps(record, ensure_ascii=False, sort_keys=False).encode("utf-8")
    return [
        (f"{sample.key}.{ext}", bytes(sample.image)),
        (f"{sample.key}.txt", captions[0].encode("utf-8")),
        (f"{sample.key}.json", payload),
    ]


class ShardWriter:
    """Write :class:`RawSample` objects into numbered WebDataset tar shards.

    Shards are named ``{prefix}-{index:06d}.tar``. Each is written as ``<name>.tar.tmp`` and renamed
    to its final name only once it is closed, so a ``*.tar`` in ``out_dir`` is always complete. On a
    normal close ``sizes.json`` (``{shard file name: n_samples}`` for this writer's shards) is written
    atomically. If the ``with`` block raises, the unfinished ``.tmp`` shard is deleted, the shards
    already finished stay (each is complete) and ``sizes.json`` is *not* written: its presence marks
    a finished write. One writer per directory: ``sizes.json`` only lists this writer's shards.

    Output is byte-deterministic: members have mtime 0, uid/gid 0, mode 0644 and no owner names.
    """

    def __init__(
        self,
        out_dir: PathLike,
        prefix: str = "shard",
        max_samples: int = 1000,
        max_bytes: int | None = None,
    ) -> None:
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1 or None, got {max_bytes}")
        if not prefix or "/" in prefix:
            raise ValueError(f"prefix must be a non-empty file-name prefix, got {prefix!r}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.max_samples = int(max_samples)
        self.max_bytes = max_bytes
        self.sizes: dict[str, int] = {}
        self.shards: list[str] = []
        self.n_written = 0
        self._index = 0
        self._tar: tarfile.TarFile | None = None
        self._tmp_path: Path | None = None
        self._final_path: Path | None = None
        self._count = 0
        self._bytes = 0
        self._closed = False

    # -- context manager --------------------------------------------------------------------
    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # -- internals --------------------------------------------------------------------------
    def _open_next(self) -> None:
        name = f"{self.prefix}-{self._index:06d}.tar"
        self._index += 1
        self._final_path = self.out_dir / name
        self._tmp_path = self.out_dir / (name + ".tmp")
        self._tar = tarfile.open(self._tmp_path, mode="w", format=tarfile.PAX_FORMAT)
        self._count = 0
        self._bytes = 0

    def _finish_current(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        assert self._tmp_path is not None and self._final_path is not None
        with open(self._tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(self._tmp_path, self._final_path)
        self.sizes[self._final_path.name] = self._count
        self.shards.append(str(self._final_path))
        self._tar = None
        self._tmp_path = None
        self._final_path = None

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0
        info.mode = 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        assert self._tar is not None
        self._tar.addfile(info, io.BytesIO(data))

    # -- public -----------------------------------------------------------------------------
    def write(self, sample: RawSample, image_ext: str = "jpg") -> None:
        """Append one sample (image as ``KEY.<image_ext>``, first caption as ``KEY.txt``, ``KEY.json``)."""
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        members = sample_to_members(sample, image_ext)
        size = sum(_member_size(len(d)) for _, d in members)
        if self._tar is not None:
            full = self._count >= self.max_samples
            too_big = self.max_bytes is not None and self._count > 0 and self._bytes + size > self.max_bytes
            if full or too_big:
                self._finish_current()
        if self._tar is None:
            self._open_next()
        for name, data in members:
            self._add(name, data)
        self._count += 1
        self._bytes += size
        self.n_written += 1

    def close(self) -> None:
        """Finish the current shard and write ``sizes.json`` atomically. Idempotent."""
        if self._closed:
            return
        self._finish_current()
        with atomic_write(self.out_dir / "sizes.json") as f:
            f.write(json.dumps(self.sizes, indent=1, sort_keys=True) + "\n")
        self._closed = True

    def abort(self) -> None:
        """Drop the unfinished shard (its ``.tmp`` file); finished shards stay, no ``sizes.json``."""
        if self._closed:
            return
        if self._tar is not None:
            try:
                self._tar.close()
            except Exception:  # noqa: BLE001 - we are discarding this file anyway
                pass
            self._tar = None
        if self._tmp_path is not None and self._tmp_path.exists():
            self._tmp_path.unlink()
        self._tmp_path = None
        self._closed = True


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------

_REMOTE_PREFIXES = ("http://", "https://", "pipe:")


def is_remote(url: str) -> bool:
    """True for shard URLs read over HTTP(S) or from a ``pipe:`` command rather than as a local file."""
    return url.startswith(_REMOTE_PREFIXES)


def _object_names(objects: Any, where: str) -> list[str]:
    if not isinstance(objects, list):
        raise BadSample("bad_json", f"{where}: 'objects' must be a list, got {type(objects).__name__}")
    names: list[str] = []
    for obj in objects:
        if isinstance(obj, str):
            name = obj
        elif isinstance(obj, dict) and isinstance(obj.get("name"), str):
            name = obj["name"]
        else:
            raise BadSample("bad_json", f"{where}: object entry {obj!r} is neither a string nor a {{'name': ...}} dict")
        name = name.strip()
        if name:
            names.append(name)
    return names


def _captions(raw: dict, record: dict, where: str) -> list[str]:
    """The non-empty captions of a sample; :class:`BadSample` ``no_caption`` / ``bad_caption``."""
    given = False
    if isinstance(record.get("captions"), list) and record["captions"]:
        given = True
        captions = [c.strip() for c in record["captions"] if isinstance(c, str) and c.strip()]
        if captions:
            return captions
    if raw.get("txt") is not None:
        given = True
        txt = raw["txt"]
        try:
            text = txt.decode("utf-8") if isinstance(txt, (bytes, bytearray)) else str(txt)
        except UnicodeDecodeError as exn:
            raise BadSample("bad_caption", f"{where}: txt is not UTF-8 ({exn})") from exn
        if text.strip():
            return [text.strip()]
    if isinstance(record.get("caption"), str):
        given = True
        if record["caption"].strip():
            return [record["caption"].strip()]
    if given:
        raise BadSample("bad_caption", f"{where}: empty caption")
    raise BadSample("no_caption", f"{where}: no caption (no txt member, no json captions)")


def decode_sample(raw: dict) -> RawSample:
    """Turn a WebDataset-grouped dict (``__key__``, ``__url__``, image, ``txt``, ``json``) into a RawSample.

    Captions come from ``json["captions"]`` when present and non-empty, else from ``txt`` (else
    img2dataset's ``json["caption"]``). Object tags come from ``json["objects"]`` (strings or
    ``{"name", "count"}`` dicts → names); absent → ``None``. Unrecognised json fields become ``meta``.
    Raises :class:`BadSample` (a ``ValueError``) naming shard and key, of kind ``no_image``,
    ``bad_json`` (does not parse, not an object, malformed objects), ``no_caption`` or
    ``bad_caption`` (empty, or ``txt`` not UTF-8).
    """
    key = str(raw.get("__key__", "?"))
    url = str(raw.get("__url__", "?"))
    where = f"shard {url}, key {key}"
    image = None
    for ext in IMAGE_EXTS:
        if raw.get(ext):
            image = raw[ext]
            break
    if image is None:
        raise BadSample("no_image", f"{where}: no image (looked for {', '.join(IMAGE_EXTS)})")

    record: dict[str, Any] = {}
    if raw.get("json") is not None:
        data = raw["json"]
        try:
            record = json.loads(data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data)
        except ValueError as exn:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise BadSample("bad_json", f"{where}: json does not parse ({exn})") from exn
        if not isinstance(record, dict):
            raise BadSample("bad_json", f"{where}: json is a {type(record).__name__}, not an object")

    captions = _captions(raw, record, where)
    objects = _object_names(record["objects"], where) if record.get("objects") is not None else None
    lang = record.get("language") or record.get("lang") or "en"
    meta = {k: v for k, v in record.items() if k not in _RESERVED_JSON_KEYS}
    return RawSample(key=key, image=bytes(image), captions=captions, objects=objects, lang=str(lang), meta=meta)


def list_shards(spec: PathLike | Sequence[PathLike]) -> list[str]:
    """Resolve a shard specification to a list of shard paths/URLs.

    Accepts a directory (its ``*.tar``, sorted), a brace pattern (``data-{000000..000009}.tar``,
    expanded in order, not checked for existence), a glob (sorted matches), a single path, an
    ``http(s)://`` URL or a ``pipe:COMMAND`` (both brace-expanded, never globbed), or a list/tuple of
    any of these (concatenated in order). Raises ``ValueError`` naming ``spec`` when nothing results.
    """
    if isinstance(spec, (str, os.PathLike)):
        s = os.fspath(spec)
        if is_remote(s) or ("{" in s and "}" in s and not os.path.isdir(s)):
            out = list(braceexpand.braceexpand(s))
        elif os.path.isdir(s):
            out = sorted(glob.glob(os.path.join(glob.escape(s), "*.tar")))
        elif any(ch in s for ch in "*?["):
            out = sorted(glob.glob(s))
        elif s:
            out = [s]
        else:
            out = []
    else:
        out = []
        for item in spec:
            out.extend(list_shards(item))
    if not out:
        raise ValueError(f"no shards found for {spec!r}")
    return out


def _load_sizes_json(folder: str) -> dict[str, int]:
    """``{shard file name: samples}`` of ``folder/sizes.json`` (local or HTTP); ``{}`` when absent."""
    path = f"{folder}/sizes.json"
    try:
        if folder.startswith(("http://", "https://")):
            with urllib.request.urlopen(path, timeout=30) as resp:
                text = resp.read().decode("utf-8")
        elif folder.startswith("pipe:"):
            return {}
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read()
    except (OSError, urllib.error.URLError):
        return {}
    try:
        table = json.loads(text)
    except ValueError as exn:
        logger.warning("ignoring %s: not JSON (%s)", path, exn)
        return {}
    if not isinstance(table, dict) or not all(isinstance(v, int) and v >= 0 for v in table.values()):
        logger.warning("ignoring %s: expected {shard file name: sample count >= 0}", path)
        return {}
    return table


def shard_sizes(shards: Sequence[str]) -> list[int | None]:
    """Sample count of each shard from the ``sizes.json`` beside it (local folders and HTTP), None where unknown."""
    cache: dict[str, dict[str, int]] = {}
    out: list[int | None] = []
    for shard in shards:
        folder, name = shard.rsplit("/", 1) if "/" in shard else (".", shard)
        if folder not in cache:
            cache[folder] = _load_sizes_json(folder)
        out.append(cache[folder].get(name))
    return out


def read_sizes(shards: Sequence[str]) -> int | None:
    """Total sample count of ``shards`` from the ``sizes.json`` files beside them, or None if unknown."""
    sizes = shard_sizes(shards)
    return None if any(n is None for n in sizes) else int(sum(sizes))


def shard_samples(url: str, on_damage: Callable[[str, Exception], None]) -> Iterator[dict]:
    """The raw samples (WebDataset-grouped dicts) of one shard: a local path, ``http(s)://`` URL
    (read with ``curl``) or ``pipe:COMMAND``. A shard that cannot be opened, does not parse as a
    tar or ends early yields the samples before the damage, then ``on_damage(url, first error)``
    is called once."""
    errors: list[Exception] = []

    def keep_going(exn: Exception) -> bool:
        errors.append(exn)
        return True

    yield from tariterators.tarfile_samples([{"url": url}], handler=keep_going)
    if errors:
        on_damage(url, errors[0])


def count_samples(url: str) -> int:
    """Number of raw samples a shard yields when read (a pass over its tar headers and bytes, no decoding)."""
    return sum(1 for _ in shard_samples(url, lambda u, e: None))


class SkipCounter:
    """Counts bad samples by kind (:data:`SKIP_KINDS`) and logs the first few of each kind with shard and key.

    ``counts`` holds the totals; :meth:`take` returns the counts since its previous call (what a
    loader batch reports). ``muted`` stops counting and logging (re-reads of already counted data).
    """

    def __init__(self, max_logged: int = _MAX_LOGGED_SKIPS) -> None:
        self.counts = np.zeros(len(SKIP_KINDS), dtype=np.int64)
        self._taken = np.zeros(len(SKIP_KINDS), dtype=np.int64)
        self.max_logged = max_logged
        self.muted = False

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def by_kind(self) -> dict[str, int]:
        """``{kind: count}`` of the non-zero totals."""
        return {k: int(n) for k, n in zip(SKIP_KINDS, self.counts) if n}

    def add(self, kind: str, url: str, key: str, message: str | Exception) -> None:
        """Count one bad sample (or damaged shard, ``kind="truncated_tar"``)."""
        if self.muted:
            return
        i = SKIP_KINDS.index(kind)
        self.counts[i] += 1
        if self.counts[i] <= self.max_logged:
            logger.warning("skipping %s: sample %s of shard %s: %s", kind, key, url, message)
            if self.counts[i] == self.max_logged:
                logger.warning("further %s skips are only counted", kind)

    def add_error(self, url: str, key: str, exn: ValueError) -> None:
        """Count a ``ValueError`` raised for a sample: its ``kind`` if a :class:`BadSample`, else ``other``."""
        self.add(exn.kind if isinstance(exn, BadSample) else "other", url, key, exn)

    def take(self) -> np.ndarray:
        """Counts (int64, in :data:`SKIP_KINDS` order) since the previous call."""
        new = self.counts - self._taken
        self._taken = self.counts.copy()
        return new


def draw_shards(shards: Sequence[str], rng: np.random.Generator, read: Callable[[str], Iterable[Any]],
                is_good: Callable[[Any], bool] = lambda item: True) -> Iterator[Any]:
    """Endless: the items ``read(url)`` of shards drawn with replacement by ``rng``.

    Raises ``ValueError`` once every shard has been drawn and none gave a good item (``is_good``),
    instead of spinning for ever over unreadable data.
    """
    barren: set[str] = set()  # shards that gave no good item, while no shard has given one
    produced = False
    while True:
        url = shards[int(rng.integers(len(shards)))]
        for item in read(url):
            produced = produced or is_good(item)
            yield item
        if not produced:
            barren.add(url)
            if len(barren) == len(shards):
                raise ValueError(f"resampled stream: none of the {len(shards)} shard(s) yields a readable sample "
                                 f"(first: {shards[0]})")


def loader_worker() -> tuple[int, int]:
    """(worker id, number of workers) of the current paddle DataLoader worker; (0, 1) outside workers."""
    info = paddle.io.get_worker_info()
    if info is None:
        return 0, 1
    return int(info.id), int(info.num_workers)


def buffer_shuffle(items: Iterable[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    """Reservoir-style shuffle: keep ``size`` items, emit a random one as each new item arrives."""
    buf: list[Any] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = int(rng.integers(len(buf)))
        out, buf[j] = buf[j], item
        yield out
    while buf:
        j = int(rng.integers(len(buf)))
        buf[j], buf[-1] = buf[-1], buf[j]
        yield buf.pop()


def too_few_shards(n_shards: int, world: int, num_workers: int, what: str = "") -> str | None:
    """The error message when ``n_shards`` cannot feed ``world`` ranks x ``num_workers`` readers, else None."""
    consumers = world * num_workers
    if n_shards >= consumers:
        return None
    return (f"{what}{n_shards} shard(s) cannot feed {world} rank(s) x {num_workers} loader worker(s) "
            f"= {consumers} readers without reading a shard twice: write at least {consumers} shards, "
            f"use fewer loader workers (data.num_workers) or set data.resampled=true to draw shards "
            f"with replacement (an endless stream)")


def log_in_worker(message: str) -> None:
    """Log an error from inside a loader worker, where paddle may lose the exception text.

    Paddle re-raises a worker's exception in a daemon thread of the main process, which may exit
    (on the generic "Blocking queue is killed" SystemError) before that thread prints it.
    """
    if paddle.io.get_worker_info() is not None:
        logger.error("loader worker %d: %s", loader_worker()[0], message)


class ShardStream(paddle.io.IterableDataset):
    """Stream samples from WebDataset shards, split without overlap across ranks and loader workers.

    Each ``__iter__`` (one per DataLoader worker) reads rank/world from the environment and the
    worker from ``paddle.io.get_worker_info()``, shuffles the shard list with
    ``np.random.default_rng([seed, epoch])`` (the same permutation everywhere) and takes
    ``shards[g::world * num_workers]`` with ``g = rank * num_workers + worker_id``: every shard is
    read by exactly one worker of one rank. Fewer shards than ``world * num_workers`` raises
    ``ValueError`` (never a hang; call :meth:`check_readers` in the main process before making a
    DataLoader with workers, since a worker's exception reaches the main process only as paddle's
    generic "Blocking queue is killed" ``SystemError``; the worker logs the real message).

    ``resampled=True`` (fewer shards than readers): each reader instead draws shards *with
    replacement* from the full list, with a generator seeded by ``(seed, epoch, g)``, and never
    ends. A stream whose every shard yields no sample raises ``ValueError`` instead of spinning.

    Samples are decoded with :func:`decode_sample`, optionally shuffled in a buffer of
    ``shuffle_buffer`` raw samples seeded by ``(seed, epoch, g)``, then passed to
    ``transform(sample, epoch)``; ``transform=None`` yields the RawSample. A sample whose decoding
    or transform raises ``ValueError`` is skipped and counted by kind in ``self.skips`` (a
    :class:`SkipCounter`; ``self.skipped`` is the total; per process: in a DataLoader each worker
    counts its own), the first few of each kind logged with shard and key. A damaged shard counts
    one ``truncated_tar`` and the stream moves on. This is the stream evaluation and vocab building
    read; training reads :class:`ernievil2.data.loader.TrainStream`.

    ``split_by_rank=False`` makes every rank read all shards (still split over loader workers).
    """

    def __init__(
        self,
        shards: str | Sequence[str],
        transform: Callable[[RawSample, int], dict] | None = None,
        shuffle_shards: bool = True,
        shuffle_buffer: int = 0,
        seed: int = 0,
        epoch: int = 0,
        split_by_rank: bool = True,
        resampled: bool = False,
    ) -> None:
        super().__init__()
        if seed < 0 or epoch < 0:
            raise ValueError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        self.shards = list_shards(shards)
        self.transform = transform
        self.shuffle_shards = shuffle_shards
        self.shuffle_buffer = int(shuffle_buffer)
        self.seed = int(seed)
        self.epoch = int(epoch)
        self.split_by_rank = bool(split_by_rank)
        self.resampled = bool(resampled)
        self.skips = SkipCounter()

    @property
    def skipped(self) -> int:
        """Bad samples (and damaged shards) skipped by the last iteration in this process."""
        return self.skips.total

    def __len__(self) -> int:
        # TypeError (not paddle's RuntimeError) so that list(stream) and length hints work.
        raise TypeError("a ShardStream has no length; read_sizes(stream.shards) gives the total sample count")

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch used for the shard permutation, the shuffle buffer and ``transform``."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def check_readers(self, num_workers: int, world: int | None = None) -> None:
        """Raise the ``ValueError`` of too few shards for ``world`` ranks (default: this job's) ×
        ``num_workers`` loader workers (0 = reading in the main process = 1 reader) here, in the
        calling process. A no-op when ``resampled``."""
        if self.resampled:
            return
        if world is None:
            world = dist_info().world_size if self.split_by_rank else 1
        self._check_split(world, max(int(num_workers), 1))

    def _check_split(self, world: int, num_workers: int) -> None:
        message = too_few_shards(len(self.shards), world, num_workers)
        if message:
            raise ValueError(message)

    def shards_for(self, rank: int, world: int, worker_id: int, num_workers: int) -> list[str]:
        """The shards one (rank, worker) reads this epoch, in reading order (without ``resampled``)."""
        self._check_split(world, num_workers)
        order = list(self.shards)
        if self.shuffle_shards:
            perm = np.random.default_rng([self.seed, self.epoch]).permutation(len(order))
            order = [order[i] for i in perm]
        return order[rank * num_workers + worker_id :: world * num_workers]

    def _decoded(self, shards: Iterable[str]) -> Iterator[tuple[str, RawSample]]:
        def damaged(url: str, exn: Exception) -> None:
            self.skips.add("truncated_tar", url, "-", repr(exn))

        for shard in shards:
            for raw in shard_samples(shard, damaged):
                url = str(raw.get("__url__", shard))
                try:
                    yield url, decode_sample(raw)
                except ValueError as exn:
                    self.skips.add_error(url, str(raw.get("__key__", "?")), exn)

    def _resampled(self, gid: int) -> Iterator[tuple[str, RawSample]]:
        """Endless: shards drawn with replacement by reader ``gid``'s own generator."""
        # The trailing 1 keeps this generator apart from the shuffle buffer's ([seed, epoch, gid]).
        rng = np.random.default_rng([self.seed, self.epoch, gid, 1])
        return draw_shards(self.shards, rng, lambda url: self._decoded([url]))

    def __iter__(self) -> Iterator[Any]:
        info = dist_info()
        rank, world = (info.rank, info.world_size) if self.split_by_rank else (0, 1)
        worker_id, num_workers = loader_worker()
        gid = rank * num_workers + worker_id
        self.skips = SkipCounter()
        if self.resampled:
            samples: Iterator[tuple[str, RawSample]] = self._resampled(gid)
        else:
            try:
                mine = self.shards_for(rank, world, worker_id, num_workers)
            except ValueError as exn:
                log_in_worker(f"rank {rank}: {exn}")
                raise
            samples = self._decoded(mine)
        if self.shuffle_buffer > 1:
            samples = buffer_shuffle(samples, self.shuffle_buffer, np.random.default_rng([self.seed, self.epoch, gid]))
        for url, sample in samples:
            if self.transform is None:
                yield sample
                continue
            try:
                out = self.transform(sample, self.epoch)
            except ValueError as exn:
                self.skips.add_error(url, sample.key, exn)
                continue
            yield out
        if self.skipped:
            logger.info("rank %d worker %d skipped %s this epoch", rank, worker_id, self.skips.by_kind())


class ExitWithParent:
    """``worker_init_fn`` for ``paddle.io.DataLoader``: a loader worker is killed when the process
    that made it (a training rank) dies.

    Without it, a worker of a rank killed by SIGKILL lives on forever (Paddle 3.3.1, seen in
    ``tests/test_multinode.py``): paddle's worker notices the dead parent and leaves its loop, then
    blocks at exit flushing its result queue into a pipe that nobody reads any more. Linux only
    (``prctl(PR_SET_PDEATHSIG, SIGKILL)``); elsewhere a no-op. Make the instance in the process
    that iterates the loader, and iterate it from that process's main thread (the kernel signals
    the worker when the thread that forked it ends).
    """

    _PR_SET_PDEATHSIG = 1

    def __init__(self) -> None:
        self.parent = os.getpid()

    def __call__(self, worker_id: int) -> None:
        if not sys.platform.startswith("linux"):
            return
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            if libc.prctl(self._PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
                logger.warning("prctl(PR_SET_PDEATHSIG) failed in loader worker %d: errno %d", worker_id,
                               ctypes.get_errno())
        except (OSError, AttributeError) as exn:
            logger.warning("loader worker %d cannot follow its parent's death: %r", worker_id, exn)
            return
        if os.getppid() != self.parent:  # the parent died before prctl took effect
            os._exit(1)


def iterate_loader(loader: Iterable[Any], join_timeout: float = 1.0) -> Iterator[Any]:
    """Iterate a ``paddle.io.DataLoader`` and shut it down completely even when the caller stops
    early (``break`` at ``max_steps``, an endless ``resampled`` stream, an exception).

    Paddle 3.3.1 shuts its reader threads down only when the loader is exhausted; left early, the
    iterator's ``__del__`` stops the workers but leaves the C++ reader and the Python thread that
    fills it running, and a process that exits soon after can die with "terminate called without an
    active exception" (SIGABRT; seen in ``tests/test_data_ranks.py``; Paddle PR #34501 describes it).
    Here, when the generator is closed, the iterator takes the same path as at its end: reader
    shutdown (which stops the C++ reader threads), workers stopped and joined; then the Python
    filling thread gets ``join_timeout`` seconds to leave (it may sit in a 5 s queue poll; once the
    reader is shut down it touches no C++ state, and it is a daemon). Uses paddle's private
    iterator attributes where present; a loader without them is simply iterated.
    """
    it = iter(loader)
    try:
        yield from it
    finally:
        reader = getattr(it, "_reader", None)
        if reader is not None and hasattr(reader, "shutdown") and not getattr(it, "_shutdown", False):
            reader.shutdown()
        if hasattr(it, "_try_shutdown_all"):
            it._try_shutdown_all()
        thread = getattr(it, "_thread", None)
        if thread is not None and thread.is_alive():
            thread.join(join_timeout)


def collate_arrays(batch: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stack a list of ``{name: array}`` samples into ``{name: array[batch, ...]}``."""
    if not batch:
        raise ValueError("cannot collate an empty batch")
    keys = list(batch[0].keys())
    for i, item in enumerate(batch):
        if set(item.keys()) != set(keys):
            raise ValueError(f"batch item {i} has keys {sorted(item)}, expected {sorted(keys)}")
    return {k: np.stack([np.asarray(item[k]) for item in batch]) for k in keys}
