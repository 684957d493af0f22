"""Dataset formats: one reader per input layout, one item type, one name per format.

Everything that reads image-text data goes through this package: the packer (``launch/pack.py``,
:mod:`ernievil2.data.packers`), the evaluation sets (:mod:`ernievil2.evaluators.retrieval`) and, for the upstream
TSV's per-line parse, inference (:mod:`ernievil2.inference`). It imports nothing heavier than the
standard library (the ``shards`` and ``wds_retrieval`` readers import :mod:`ernievil2.data.shard_reader`, and webdataset
with it, only when it is called; never paddle), so the packer's image worker processes can import it.

Formats (:data:`FORMATS`, spelled with underscores; :data:`READERS` maps each name to its reader):

* ``seed_tsv``: ``text \\t image_id \\t base64``, lines grouped by image id;
* ``chinese_clip``: ``{split}_imgs.tsv`` (``image_id \\t base64``) + ``{split}_texts.jsonl``;
* ``coco``: ``captions_*.json`` (+ ``instances_*.json`` for object tags) + an image folder;
* ``karpathy``: ``dataset_{flickr30k,coco}.json`` + an image folder;
* ``jsonl``: one JSON object per image (the layout of ``../shared/data/*/captions.jsonl``);
* ``shards``: WebDataset shards as the packer writes them (a folder, brace pattern, glob or list);
* ``wds_retrieval``: a clip_benchmark retrieval set (``ROOT/test/nshards.txt`` + ``ROOT/test/N.tar``,
  ``KEY.txt`` holding one caption per line).

A reader takes a :class:`SourceSpec` and returns a :class:`Source` whose ``records`` are, in file
order, :class:`Item` (one image, all its captions) or :class:`Problem` (a record that gives no
item: a short ``reason``, ``where`` it is and why). The caller decides what a problem means: the
packer counts and skips it, evaluation raises. An input unusable as a whole (a missing file, JSON
without its top-level lists) raises :class:`FormatError` naming the file when the source is opened.

Keys, one rule per format, always in :func:`sample_key` form (the shard key the packer writes):
``seed_tsv`` / ``chinese_clip``: the image id; ``coco``: the file-name stem of ``images[].file_name``;
``karpathy``: the file-name stem of ``filename``; ``jsonl``: ``image_id``, else the stem of
``image``; ``shards``, ``wds_retrieval``: the sample's key. The raw id is kept in ``meta["image_id"]`` where there is one.

Captions: the strings of the record's caption field(s), stripped, empty ones dropped, in file order,
repeats kept (evaluation counts every caption; the packer keeps one of each, :meth:`Item.deduplicated`).
Where ``where`` points: ``FILE:LINE`` for line-based files, ``FILE: images[I]`` for a JSON entry,
``SHARD: sample KEY`` for a shard sample.

Modules: :mod:`~ernievil2.data.formats.base` (format names, :class:`Item`, :class:`Problem`,
:class:`SourceSpec`, :class:`Source`, :class:`FormatError`, the problem reasons and the shared rules:
:func:`sample_key`, :func:`check_format`, ...); :mod:`~ernievil2.data.formats.seed_lines` (the upstream
TSV line's parse and checks, :data:`SEED_LINE_CHECKS`, shared with inference);
:mod:`~ernievil2.data.formats.tsv` (``seed_tsv``, ``chinese_clip``); :mod:`~ernievil2.data.formats.json_files`
(``coco``, ``karpathy``, ``jsonl``); :mod:`~ernievil2.data.formats.shards` (``shards``);
:mod:`~ernievil2.data.formats.wds` (``wds_retrieval`` and clip_benchmark's dataset layout);
:mod:`~ernievil2.data.formats.registry` (:data:`READERS`, :func:`open_source`). Every public name is
re-exported here.
"""
from ernievil2.data.formats.base import (
    BAD_BASE64,
    BAD_RECORD,
    DEFAULT_LANGUAGE,
    FORMATS,
    MISSING_IMAGE,
    NO_CAPTIONS,
    UNREADABLE_IMAGE,
    FormatError,
    ImageLoadError,
    ImageSource,
    Item,
    Problem,
    Record,
    Source,
    SourceSpec,
    caption_strings,
    check_format,
    clean_captions,
    load_json,
    sample_key,
)
from ernievil2.data.formats.json_files import category_names, coco_objects, read_coco, read_jsonl, read_karpathy
from ernievil2.data.formats.registry import READERS, open_source
from ernievil2.data.formats.seed_lines import (
    SEED_LINE_CHECKS,
    SEED_LINE_REASONS,
    LineProblem,
    SeedLine,
    check_seed_image,
    parse_seed_line,
)
from ernievil2.data.formats.shards import read_shards
from ernievil2.data.formats.tsv import read_chinese_clip, read_seed_tsv
from ernievil2.data.formats.wds import caption_lines, read_wds_retrieval, wds_shards

__all__ = [
    # base
    "FORMATS", "DEFAULT_LANGUAGE", "BAD_RECORD", "NO_CAPTIONS", "BAD_BASE64", "MISSING_IMAGE", "UNREADABLE_IMAGE",
    "FormatError", "ImageLoadError", "ImageSource", "Item", "Problem", "Record", "SourceSpec", "Source",
    "sample_key", "caption_strings", "clean_captions", "check_format", "load_json",
    # seed_lines
    "SEED_LINE_CHECKS", "SEED_LINE_REASONS", "SeedLine", "LineProblem", "parse_seed_line", "check_seed_image",
    # readers
    "read_seed_tsv", "read_chinese_clip", "category_names", "coco_objects", "read_coco", "read_karpathy",
    "read_jsonl", "read_shards", "read_wds_retrieval", "caption_lines", "wds_shards",
    # registry
    "READERS", "open_source",
]
