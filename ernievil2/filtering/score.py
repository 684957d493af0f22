"""Scoring shards: the cosine of every caption with its image, one sidecar per shard.

Each rank scores every ``world_size``-th shard (``shards[rank::world]``); within a rank, images are
decoded by a thread pool and embedded, with their captions, in batches through :mod:`ernievil2.encode`
(the embeddings evaluation and search compute). A shard whose sidecar exists is skipped, so a killed
run continues where it stopped; a sidecar made from another model, or from a shard that changed on
disk since, is refused by name. Bad samples are counted by kind, as training counts them.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ernievil2.data import preprocess
from ernievil2.data.sample import BadSample, RawSample
from ernievil2.data.shard_reader import list_shards, read_shard, shard_sizes
from ernievil2.data.skips import SkipCounter
from ernievil2.distributed import DistInfo
from ernievil2.encode import embed_crops, embed_texts

from .sidecar import FilterError, ShardScores, read_sidecar, shard_name, shard_stat, sidecar_path

log = logging.getLogger("ernievil2.filtering")


@dataclass(frozen=True)
class ScoreOptions:
    """How to score: samples per batch, image-decoding threads, whether to keep the float16
    embeddings in the sidecars, the progress bar (None: on an interactive terminal), and which
    captions (``all``, or the ``first`` of each sample only, as DataComp scores: a text pass per
    sample instead of one per caption)."""

    batch_size: int = 64
    workers: int = 2
    keep_embeddings: bool = False
    progress: bool | None = None
    captions: str = "all"

    def __post_init__(self) -> None:
        if self.captions not in ("all", "first"):
            raise FilterError(f"captions must be 'all' or 'first', got {self.captions!r}")


@dataclass
class ScoreReport:
    """What a scoring run of one rank did."""

    shards: int = 0
    scored: int = 0
    already_scored: int = 0
    samples: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> str:
        rate = self.samples / self.seconds if self.seconds > 0 else 0.0
        skipped = ", ".join(f"{k} {n}" for k, n in sorted(self.skipped.items())) or "none"
        return (f"scored {self.samples} pair(s) in {self.scored} shard(s) ({rate:.0f} pairs/s, {self.seconds:.1f} s); "
                f"{self.already_scored} of {self.shards} shard(s) already scored; skipped: {skipped}")


def _identity(encoder: Any, options: ScoreOptions) -> dict[str, Any]:
    """What must match for two sidecars' scores to share one scale."""
    precision = {"precision": encoder.precision} if encoder.precision != "fp32" else {}
    return {**asdict(encoder.identity), "text_max_length": int(encoder.text_max_length), "captions": options.captions,
            **precision}


def check_done(path: Path, url: str, identity: dict[str, Any]) -> bool:
    """True when ``path`` holds this shard's finished scores by this model; False when there is no
    sidecar; :class:`FilterError` when it is another shard's, another model's, or the shard changed."""
    if not path.exists():
        return False
    done = read_sidecar(path)
    if done.shard != url:
        raise FilterError(f"{path} holds the scores of {done.shard}, not of {url}: two shards share the name "
                          f"{shard_name(url)!r}; score them into separate folders")
    if done.meta.get("model") != identity:
        raise FilterError(f"{path} was scored with another model or settings ({done.meta.get('model')}); "
                          f"score into a new folder, or delete the old sidecars")
    if done.meta.get("stat") != shard_stat(url):
        raise FilterError(f"shard {url} changed since it was scored into {path} (size or modification time "
                          f"differ); delete the sidecar to score it again")
    return True


def _crop(sample: RawSample, size: int, profile: str) -> np.ndarray | BadSample:
    try:
        return preprocess.resize_crop(preprocess.decode(sample.image, profile, sample.key), size, profile)
    except (OSError, ValueError) as exn:
        return BadSample("corrupt_image", str(exn))


def _batches(url: str, skips: SkipCounter, expected: int | None, size: int) -> Iterator[list[RawSample]]:
    batch: list[RawSample] = []
    for key, sample in read_shard(url, skips.add_damage, expected):
        if isinstance(sample, BadSample):
            skips.add_error(url, key, sample)
            continue
        batch.append(sample)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def score_shard(url: str, encoder: Any, options: ScoreOptions, pool: ThreadPoolExecutor, bar: tqdm,
                expected: int | None = None) -> tuple[ShardScores, SkipCounter]:
    """The scores of one shard's good samples (bad ones counted in the returned counter)."""
    skips = SkipCounter()
    stat = shard_stat(url)
    keys: list[str] = []
    scores: list[np.ndarray] = []
    image_rows: list[np.ndarray] = []
    text_rows: list[np.ndarray] = []
    model, size, profile = encoder.runner, encoder.image_size, encoder.profile
    for batch in _batches(url, skips, expected, options.batch_size):
        crops = list(pool.map(lambda s: _crop(s, size, profile), batch))
        good = []
        for sample, crop in zip(batch, crops):
            if isinstance(crop, BadSample):
                skips.add_error(url, sample.key, crop)
            else:
                good.append((sample, crop))
        bar.update(len(batch))
        if not good:
            continue
        images = embed_crops(model, np.stack([c for _, c in good]), options.batch_size, profile)
        captions = [s.captions if options.captions == "all" else s.captions[:1] for s, _ in good]
        texts = [t for caps in captions for t in caps]
        text_emb = embed_texts(model, encoder.tokenizer, texts, encoder.text_max_length, options.batch_size)
        row = 0
        for i, ((sample, _), caps) in enumerate(zip(good, captions)):
            n = len(caps)
            scores.append(text_emb[row: row + n] @ images[i])
            keys.append(sample.key)
            if options.keep_embeddings:
                text_rows.append(text_emb[row])
            row += n
        if options.keep_embeddings:
            image_rows.append(images)
    width = int(model.cfg.text.width)
    meta = {"stat": stat, "model": _identity(encoder, options), "skipped": skips.by_kind()}
    emb = (np.concatenate(image_rows) if image_rows else np.empty((0, width), np.float32),
           np.stack(text_rows) if text_rows else np.empty((0, width), np.float32))
    result = ShardScores.from_lists(url, keys, scores, meta, *(emb if options.keep_embeddings else (None, None)))
    return result, skips


def _check_names(urls: Sequence[str]) -> None:
    seen: dict[str, str] = {}
    for url in urls:
        name = shard_name(url)
        if name in seen:
            raise FilterError(f"shards {seen[name]} and {url} share the name {name!r}: their sidecars would "
                              f"collide; score them into separate folders")
        seen[name] = url


def score_shards(shards: str | os.PathLike | Sequence[str], out_dir: str | os.PathLike, encoder: Any,
                 options: ScoreOptions = ScoreOptions(), info: DistInfo = DistInfo()) -> ScoreReport:
    """Score this rank's share of ``shards`` (any shard specification training reads) into
    sidecars in ``out_dir``; shards scored before are skipped after :func:`check_done`."""
    start = time.perf_counter()
    try:
        urls = list_shards(shards)
    except ValueError as exn:
        raise FilterError(str(exn)) from None
    _check_names(urls)
    missing = [u for u in urls if shard_stat_missing(u)]
    if missing:
        raise FilterError(f"shard not found: {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mine = urls[info.rank::info.world_size]
    identity = _identity(encoder, options)
    for url in mine:  # what a killed writer of this rank's sidecars left (atomic_write's temporary files)
        for stale in out.glob(f".{sidecar_path(out, url).name}.*.tmp"):
            stale.unlink(missing_ok=True)
    report = ScoreReport(shards=len(mine))
    todo = [u for u in mine if not check_done(sidecar_path(out, u), u, identity)]
    report.already_scored = len(mine) - len(todo)
    sizes = shard_sizes(todo)
    total = None if any(n is None for n in sizes) else int(sum(sizes))
    quiet = None if options.progress is None else not options.progress  # None: a bar on a terminal only
    bar = tqdm(total=total, unit="pair", desc="score", dynamic_ncols=True, disable=quiet if info.is_main else True)
    totals: dict[str, int] = {}
    with ThreadPoolExecutor(max(options.workers, 1)) as pool:
        try:
            for url, expected in zip(todo, sizes):
                result, skips = score_shard(url, encoder, options, pool, bar, expected)
                result.write(sidecar_path(out, url))
                report.scored += 1
                report.samples += len(result)
                for kind, n in skips.by_kind().items():
                    totals[kind] = totals.get(kind, 0) + n
        finally:
            bar.close()
    report.skipped = totals
    report.seconds = time.perf_counter() - start
    return report


def shard_stat_missing(url: str) -> bool:
    """True for a local shard path that does not exist (remote shards are checked when read)."""
    from ernievil2.data.shard_reader import is_remote

    return not is_remote(url) and not os.path.isfile(url)
