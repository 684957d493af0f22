"""Filtering image-text pairs by a trained model (DataComp's CLIP-score filter, LAION's cosine cut).

Three steps, each a command of ``launch/filter.py`` (docs/DATA.md, "Filter by the model"):

* :func:`~ernievil2.filtering.score.score_shards`: embed every image and its captions of a set of
  WebDataset shards through :mod:`ernievil2.encode` and write one sidecar per shard
  (:mod:`~ernievil2.filtering.sidecar`): keys, the cosine of each caption with its image;
  resumable, shard by shard, split across ranks;
* :func:`~ernievil2.filtering.select.select_keys`: a global cut over all sidecars (a fraction to
  keep, or a score threshold), optionally per source, with a summary and a histogram;
* the packer keeps the selected keys (``launch/pack.py --format shards --keep-keys KEEP.txt``).
"""
from __future__ import annotations

from .sidecar import FilterError, ShardScores, read_sidecar, sidecar_path

__all__ = ["FilterError", "ShardScores", "read_sidecar", "sidecar_path"]
