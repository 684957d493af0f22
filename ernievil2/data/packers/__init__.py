"""Packers: turn image-text datasets in common layouts into WebDataset shards (``launch/pack.py``).

- :mod:`ernievil2.data.formats` (not in this package: evaluation and inference read through it too):
  one reader per input layout, yielding :class:`~ernievil2.data.formats.Item` records and
  :class:`~ernievil2.data.formats.Problem` ones, which the packer counts and skips;
- :mod:`.errors`: :class:`~.errors.PackError`, input or options that cannot be packed at all;
- :mod:`.images`: image loading, validation, resizing and re-encoding (runs in worker processes);
- :mod:`.objects` / :mod:`.detections`: object tags from a tagger's JSONL (``--objects``) or a
  detector's COCO results file (``--detections``), as ``key -> [(name, score)]`` for the samples;
- :mod:`.pipeline`: :func:`~.pipeline.pack`, the ordered multi-process packing loop and its summary.

This ``__init__`` imports nothing on purpose: worker processes (started with ``spawn``) import
:mod:`.images` only, without paddle, which :mod:`.pipeline` pulls in through the shard writer.
"""
