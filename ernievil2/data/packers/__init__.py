"""Packers: turn image-text datasets in common layouts into WebDataset shards (``launch/pack.py``).

- :mod:`.formats`: one reader per input layout, yielding :class:`~.formats.PackItem` records;
- :mod:`.images`: image loading, validation, resizing and re-encoding (runs in worker processes);
- :mod:`.objects` / :mod:`.detections`: object tags from a tagger's JSONL (``--objects``) or a
  detector's COCO results file (``--detections``), as ``key -> [(name, score)]`` for the samples;
- :mod:`.pipeline`: :func:`~.pipeline.pack`, the ordered multi-process packing loop and its summary.

This ``__init__`` imports nothing on purpose: worker processes (started with ``spawn``) import
:mod:`.images` only, without paddle, which :mod:`.pipeline` pulls in through the shard writer.
"""
