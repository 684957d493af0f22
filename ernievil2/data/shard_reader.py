"""Shard files: resolving a shard specification to paths/URLs (:func:`list_shards`), the sample counts
of the ``sizes.json`` files beside them (:func:`shard_sizes`, :func:`read_sizes`) and the raw samples of
one shard (:func:`shard_samples`, :func:`count_samples`), decoded by the one loop every reader
uses (:func:`read_shard`), with bad samples counted by kind
(:class:`~ernievil2.data.skips.SkipCounter`, re-exported here).

Shards are local paths, ``http(s)://`` URLs or ``pipe:COMMAND``s, read with webdataset's low-level tar
iterators. Imports no paddle; decoding a raw sample is :func:`ernievil2.data.shard_codec.decode_sample`.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from typing import Union

import braceexpand
from webdataset import tariterators

from .sample import BadSample, RawSample
from .shard_codec import decode_sample
from .skips import SkipCounter

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

_REMOTE_PREFIXES = ("http://", "https://", "pipe:")


def is_remote(url: str) -> bool:
    """True for shard URLs read over HTTP(S) or from a ``pipe:`` command rather than as a local file."""
    return url.startswith(_REMOTE_PREFIXES)


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


def read_shard(
    url: str, on_damage: Callable[[str, Exception], None], expected: int | None = None,
    decode: Callable[[dict], object] = decode_sample,
) -> Iterator[tuple[str, RawSample | BadSample]]:
    """The one loop that decodes a shard: ``(key, sample)`` for each of its samples in order, where
    ``sample`` is ``decode(raw)`` (default :func:`~ernievil2.data.shard_codec.decode_sample`) or, for
    a sample ``decode`` refuses with a ``ValueError``, the :class:`BadSample` (kind ``other`` unless
    it was one). A damaged shard calls ``on_damage(url, error)`` once after its readable samples, and
    so does a shard that reads fewer than the ``expected`` samples its ``sizes.json`` (or img2dataset
    ``_stats.json``) lists (a tar cut at a header boundary reads as a shorter, intact tar: only its
    size tells)."""
    damaged = False

    def on_error(u: str, exn: Exception) -> None:
        nonlocal damaged
        damaged = True
        on_damage(u, exn)

    n = 0
    for raw in shard_samples(url, on_error):
        n += 1
        key = str(raw.get("__key__", "?"))
        try:
            yield key, decode(raw)
        except ValueError as exn:
            yield key, exn if isinstance(exn, BadSample) else BadSample("other", str(exn))
    if expected is not None and n < expected and not damaged:
        on_damage(url, ValueError(f"read {n} of the {expected} samples its sizes.json / _stats.json lists"))


def iter_samples(shards: PathLike | Sequence[PathLike], skips: SkipCounter | None = None) -> Iterator[RawSample]:
    """Every good sample of ``shards`` (any :func:`list_shards` spec), shard by shard in list order,
    in one process; bad samples and damaged shards are counted in ``skips`` (a new
    :class:`SkipCounter` when None), the first few of each kind logged."""
    skips = skips if skips is not None else SkipCounter()
    for url in list_shards(shards):
        for key, sample in read_shard(url, skips.add_damage):
            if isinstance(sample, BadSample):
                skips.add_error(url, key, sample)
            else:
                yield sample


def count_samples(url: str) -> int:
    """Number of raw samples a shard yields when read (a pass over its tar headers and bytes, no decoding)."""
    return sum(1 for _ in shard_samples(url, lambda u, e: None))
