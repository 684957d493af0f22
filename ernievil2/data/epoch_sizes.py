"""Samples per shard of the exact training sources, known before step 1 (what fixes the epoch length
and each loader worker's batch count, :class:`ernievil2.data.loader.TrainStream`).

Each shard's count comes from the first of:

1. the ``sizes.json`` beside it (``launch/pack.py``, :class:`~ernievil2.data.shard_writer.ShardWriter`);
   it always wins, whatever a ``_stats.json`` says;
2. img2dataset's ``NNNNN_stats.json`` beside ``NNNNN.tar``: its ``successes`` is the number of
   samples in the tar (img2dataset writes a sample to the tar exactly when it succeeded, and the
   stats file only once the tar is closed). A stats file that does not parse, or lacks a
   ``successes`` count >= 0, is an error naming it;
3. the source's ``num_samples`` (``data.num_samples`` / ``data.sources[].num_samples``, like
   open_clip's ``--train-num-samples``): the source's total; what 1. and 2. do not cover of it is
   spread evenly over the remaining shards. Those counts are estimates: a loader worker whose
   shards hold fewer samples tops its batches up from its own stream, extra samples are dropped;
4. one counting pass (reading every remaining shard once), by one process: rank 0 under the
   paddle launcher, while the other ranks wait for its result; with a progress bar. The counts are
   cached in ``cache`` (``RUN_DIR/shard_sizes.json`` in a training run), keyed by shard URL and, for
   local files, size and modification time (a changed shard is counted again); a resumed run in the
   same run dir reads them back.

Under the launcher (process group joined) rank 0 works all of this out and sends the result to the
others, so that the ranks agree and read the stats files once; without a process group (a single
process, or a test faking ranks) each process works it out itself.
"""
from __future__ import annotations

import json
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import paddle.distributed as dist
from tqdm.auto import tqdm

from ernievil2.atomic import atomic_write
from ernievil2.distributed import broadcast_object, dist_info

from .shard_reader import count_samples, is_remote, shard_sizes

logger = logging.getLogger(__name__)

STATS_SUFFIX = "_stats.json"
CACHE_VERSION = 1

Sizes = tuple[dict[str, int], frozenset[str]]  # samples per shard URL, the URLs whose count is an estimate


class SourceLike(Protocol):
    """What is read of a :class:`ernievil2.data.loader.StreamSource`."""

    name: str
    shards: tuple[str, ...]
    resampled: bool
    num_samples: int | None


def stats_file(url: str) -> str | None:
    """img2dataset's stats file of shard ``url`` (``.../00012.tar`` → ``.../00012_stats.json``); None
    for a ``pipe:`` shard or a name without ``.tar``."""
    if url.startswith("pipe:") or not url.endswith(".tar"):
        return None
    return url[: -len(".tar")] + STATS_SUFFIX


def _read_text(path: str) -> str | None:
    """A local or HTTP(S) file's text; None when it cannot be read (absent)."""
    try:
        if path.startswith(("http://", "https://")):
            with urllib.request.urlopen(path, timeout=30) as resp:
                return resp.read().decode("utf-8")
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, urllib.error.URLError):
        return None
    except UnicodeDecodeError as exn:
        raise ValueError(f"{path}: not UTF-8 text ({exn})") from exn


def stats_size(url: str) -> int | None:
    """``successes`` of the ``_stats.json`` beside shard ``url``; None when there is none.
    ``ValueError`` naming the file when it does not parse or has no ``successes`` count >= 0."""
    path = stats_file(url)
    text = None if path is None else _read_text(path)
    if text is None:
        return None
    try:
        stats = json.loads(text)
    except ValueError as exn:
        raise ValueError(f"{path}: not JSON ({exn}); fix or delete it, or list {url} in a sizes.json") from exn
    n = stats.get("successes") if isinstance(stats, dict) else None
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"{path}: expected img2dataset's stats with a 'successes' count >= 0, got "
                         f"{n!r}; fix or delete it, or list {url} in a sizes.json")
    return n


def _stats_sizes(urls: Sequence[str]) -> list[int | None]:
    if len(urls) > 1 and any(is_remote(u) for u in urls):
        with ThreadPoolExecutor(max_workers=16) as pool:  # HTTP round trips
            return list(pool.map(stats_size, urls))
    return [stats_size(u) for u in urls]


def _spread(src: SourceLike, known: dict[str, int], unknown: list[str]) -> dict[str, int]:
    """``src.num_samples`` less the ``known`` counts, spread evenly over ``unknown`` (the first get the rest)."""
    left = int(src.num_samples) - sum(known.values())
    if left < 0:
        raise ValueError(f"source {src.name!r}: num_samples={src.num_samples} is less than the {sum(known.values())} "
                         f"samples that sizes.json / _stats.json give for {len(known)} of its shards")
    share, extra = divmod(left, len(unknown))
    return {u: share + (i < extra) for i, u in enumerate(unknown)}


def _source_sizes(src: SourceLike) -> tuple[dict[str, int], list[str], list[str], str]:
    """``src``'s counts known without reading its shards, the shards among them whose count is an
    estimate (``num_samples``), the shards left to count, and a line saying where the counts came from."""
    listed = dict(zip(src.shards, shard_sizes(src.shards)))
    known = {u: int(n) for u, n in listed.items() if n is not None}
    unlisted = [u for u in src.shards if u not in known]
    from_stats = {u: n for u, n in zip(unlisted, _stats_sizes(unlisted)) if n is not None}
    known.update(from_stats)
    unknown = [u for u in src.shards if u not in known]
    estimated: list[str] = []
    if unknown and src.num_samples is not None:
        known.update(_spread(src, known, unknown))
        estimated, unknown = unknown, []
    elif src.num_samples is not None and sum(known.values()) != src.num_samples:
        logger.warning("source %r: num_samples=%d ignored: sizes.json / _stats.json give the count of every shard "
                       "(%d in all)", src.name, src.num_samples, sum(known.values()))
    where = (f"source {src.name!r}: samples of its {len(src.shards)} shard(s) from sizes.json "
             f"{len(src.shards) - len(unlisted)}, _stats.json {len(from_stats)}, num_samples {len(estimated)}, "
             f"to count {len(unknown)}")
    return known, estimated, unknown, where


def _plan(sources: Sequence[SourceLike], cache: str | os.PathLike | None) -> Sizes:
    sizes: dict[str, int] = {}
    estimated: set[str] = set()
    to_count: list[str] = []
    for src in sources:
        if src.resampled:
            continue
        known, guessed, unknown, where = _source_sizes(src)
        sizes.update(known)
        estimated.update(guessed)
        to_count += [u for u in unknown if u not in to_count]
        logger.info("%s", where)
    if to_count:
        sizes.update(count_shards(to_count, cache))
    ordered = {u: sizes[u] for src in sources if not src.resampled for u in src.shards}  # in shard order
    return ordered, frozenset(estimated)


def _stamp(url: str) -> dict[str, int] | None:
    """What identifies this version of a shard in the cache: size and mtime of a local file, nothing
    for a remote one (its URL alone); None for a local file that is not there."""
    if is_remote(url):
        return {}
    try:
        st = os.stat(url)
    except OSError:
        return None
    return {"bytes": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}


def _cache_key(url: str) -> str:
    return url if is_remote(url) else os.path.abspath(url)


def _load_cache(path: str | os.PathLike | None) -> dict[str, dict]:
    if path is None or not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        if doc.get("version") == CACHE_VERSION and isinstance(doc.get("shards"), dict):
            return doc["shards"]
    except (OSError, ValueError, AttributeError) as exn:
        logger.warning("ignoring the shard size cache %s: %s", path, exn)
        return {}
    logger.warning("ignoring the shard size cache %s: not version %d", path, CACHE_VERSION)
    return {}


def count_shards(urls: Sequence[str], cache: str | os.PathLike | None = None) -> dict[str, int]:
    """Samples of each of ``urls``, read from ``cache`` where it holds this version of the shard, else
    counted (one pass over the tar, a progress bar) and added to ``cache``."""
    entries = _load_cache(cache)
    out: dict[str, int] = {}
    todo: list[tuple[str, dict[str, int] | None]] = []
    for url in urls:
        stamp = _stamp(url)
        entry = entries.get(_cache_key(url))
        if stamp is not None and isinstance(entry, dict) and isinstance(entry.get("samples"), int) \
                and {k: v for k, v in entry.items() if k != "samples"} == stamp:
            out[url] = entry["samples"]
        else:
            todo.append((url, stamp))
    if len(out):
        logger.info("samples of %d shard(s) from the cache %s", len(out), cache)
    if not todo:
        return out
    logger.warning("%d shard(s) (first: %s) have no count in a sizes.json or an img2dataset _stats.json: counting "
                   "their samples by reading them once%s (set num_samples to skip this)", len(todo), todo[0][0],
                   "" if cache is None else f", cached in {cache}")
    with tqdm(total=len(todo), unit="shard", desc="counting samples", disable=None) as bar:
        for url, stamp in todo:
            out[url] = count_samples(url)
            if stamp is not None:
                entries[_cache_key(url)] = {"samples": out[url], **stamp}
            bar.update(1)
    if cache is not None:
        with atomic_write(cache) as f:
            f.write(json.dumps({"version": CACHE_VERSION, "shards": entries}, indent=1, sort_keys=True) + "\n")
    return out


def known_sizes(sources: Sequence[SourceLike], cache: str | os.PathLike | None = None) -> Sizes:
    """Samples per shard of the exact ``sources`` (see the module docstring), and the shards whose
    count is an estimate from ``num_samples``. Under the launcher rank 0 works them out and the other
    ranks receive them (they wait, also while rank 0 counts)."""
    info = dist_info()
    if not (info.distributed and dist.is_initialized()):
        return _plan(sources, cache)
    result: Sizes | str | None = None
    error: Exception | None = None
    if info.is_main:
        try:
            result = _plan(sources, cache)
        except Exception as exn:  # the other ranks wait for rank 0's answer: send them the error
            error, result = exn, f"{type(exn).__name__}: {exn}"
    result = broadcast_object(result)
    if error is not None:
        raise error
    if isinstance(result, str):
        raise RuntimeError(f"rank 0 could not find the samples per training shard: {result}")
    return result
