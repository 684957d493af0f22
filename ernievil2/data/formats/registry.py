"""Format name -> reader (:data:`READERS`) and :func:`open_source`, which opens a :class:`SourceSpec`
with its format's reader."""
from __future__ import annotations

from collections.abc import Callable

from ernievil2.data.formats.base import FORMATS, Source, SourceSpec, check_format
from ernievil2.data.formats.json_files import read_coco, read_jsonl, read_karpathy
from ernievil2.data.formats.shards import read_shards
from ernievil2.data.formats.tsv import read_chinese_clip, read_seed_tsv
from ernievil2.data.formats.wds import read_wds_retrieval

READERS: dict[str, Callable[[SourceSpec], Source]] = {
    "seed_tsv": read_seed_tsv,
    "chinese_clip": read_chinese_clip,
    "coco": read_coco,
    "karpathy": read_karpathy,
    "jsonl": read_jsonl,
    "shards": read_shards,
    "wds_retrieval": read_wds_retrieval,
}
assert tuple(READERS) == FORMATS


def open_source(spec: SourceSpec) -> Source:
    """Open ``spec.input`` with the reader of ``spec.format`` (:class:`FormatError` for an unknown
    format or an unusable input)."""
    return READERS[check_format(spec.format)](spec)
