"""The command line of ``launch/pack.py``: pack an image-text dataset into WebDataset shards
(img2dataset layout + object tags). Formats, keys and the output layout: docs/DATA.md.
Exit status of :func:`main`: 0 done, 1 nothing written, 2 unusable input or options."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Light imports only at module level: the packer's worker processes are started with ``spawn``,
# which re-imports the main script; the paddle-importing pipeline is imported in main().
from ernievil2.data.formats import FORMATS, SourceSpec
from ernievil2.data.packers.detections import DetectionOptions
from ernievil2.data.packers.errors import PackError
from ernievil2.data.packers.images import ImageOptions


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    p = argparse.ArgumentParser(description="Pack an image-text dataset into WebDataset shards (docs/DATA.md).")
    src = p.add_argument_group("input")
    src.add_argument("--format", required=True, choices=FORMATS, help="input layout: %(choices)s")
    src.add_argument("--input", required=True, type=Path,
                     help="upstream tsv / imgs.tsv or its folder / COCO captions json / Karpathy json / "
                          "captions jsonl / shards (folder, brace pattern or glob: a re-pack)")
    src.add_argument("--images", type=Path, help="image folder (coco, karpathy; jsonl: base of relative paths); "
                                                 "default: the input's folder")
    src.add_argument("--texts", type=Path, help="chinese_clip texts.jsonl (default: beside imgs.tsv)")
    src.add_argument("--instances", type=Path, help="coco instances json: object tags with counts")
    src.add_argument("--split", default="", help="karpathy: comma-separated splits to keep; chinese_clip: the split")
    src.add_argument("--language", help="caption language (default: zh for seed_tsv/chinese_clip, en for "
                                        "coco/karpathy, the samples' own for shards; jsonl: selects captions_LANG)")
    src.add_argument("--limit", type=int, help="read only the first N images of the input")
    src.add_argument("--keep-keys", type=Path, help="pack only the samples whose key this file lists, one per "
                                                    "line (launch/filter.py select writes it)")
    out = p.add_argument_group("output")
    out.add_argument("--output", required=True, type=Path, help="folder for the shards")
    out.add_argument("--overwrite", action="store_true", help="replace a previous pack in --output")
    out.add_argument("--prefix", default="shard", help="shard names: PREFIX-000000.tar ... (default %(default)s)")
    out.add_argument("--samples-per-shard", type=int, default=1000, help="target shard size in samples (default %(default)s)")
    out.add_argument("--max-shard-mb", type=float, help="also close a shard before it exceeds this size")
    out.add_argument("--max-side", type=int, help="shrink images whose longer side exceeds this (aspect kept)")
    out.add_argument("--jpeg-quality", type=int, default=95, help="quality of re-encoded JPEGs (default %(default)s)")
    out.add_argument("--workers", type=int, default=1, help="image worker processes (default %(default)s)")
    out.add_argument("--no-progress", action="store_true", help="no progress bar (it is off anyway without a TTY)")
    tags = p.add_argument_group("detector / tagger object tags")
    tags.add_argument("--objects", type=Path, help="JSONL: key -> list of {name, score}; merged into the samples")
    tags.add_argument("--objects-min-score", type=float, default=0.0, help="keep tags scoring at least this (default %(default)s)")
    tags.add_argument("--objects-max", type=int, help="keep at most this many tags per image (best first)")
    det = p.add_argument_group("object detector results (COCO results format)")
    det.add_argument("--detections", type=Path,
                     help="JSON list of {image_id, category_id, bbox, score} (PaddleDetection, mmdetection, "
                          "detectron2); image_id: the COCO image id, else the sample key or image file name")
    det.add_argument("--det-categories", type=Path,
                     help="category names: a COCO instances json or a JSON list of {id, name} "
                          "(default: the categories of coco --instances)")
    det.add_argument("--det-min-score", type=float, default=0.5,
                     help="keep detections scoring at least this (default %(default)s)")
    det.add_argument("--det-max", type=int, help="keep at most this many detected names per image (best first)")
    det.add_argument("--det-translate", type=Path,
                     help="category-name translation: JSON object or 'name<TAB>translation' TSV; "
                          "names it lacks are kept and counted")
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, pack, print the summary; return the exit status."""
    args = build_parser().parse_args(argv)
    from ernievil2.data.packers.pipeline import (  # paddle comes in here (see above)
        PackOptions,
        pack,
        read_key_list,
    )

    try:
        orphans = [flag for flag, value in (("--det-categories", args.det_categories), ("--det-max", args.det_max),
                                            ("--det-translate", args.det_translate)) if value is not None]
        if args.detections is None and orphans:
            raise PackError(f"{', '.join(orphans)} only apply with --detections")
        spec = SourceSpec(format=args.format, input=args.input, images=args.images, texts=args.texts,
                          instances=args.instances, language=args.language,
                          splits=tuple(s for s in args.split.split(",") if s))
        options = PackOptions(
            workers=args.workers, samples_per_shard=args.samples_per_shard,
            max_shard_bytes=None if args.max_shard_mb is None else int(args.max_shard_mb * 2**20),
            prefix=args.prefix, image=ImageOptions(max_side=args.max_side, jpeg_quality=args.jpeg_quality),
            objects_file=args.objects, objects_min_score=args.objects_min_score, objects_max=args.objects_max,
            detections=None if args.detections is None else DetectionOptions(
                file=args.detections, categories_file=args.det_categories, min_score=args.det_min_score,
                max_count=args.det_max, translate_file=args.det_translate),
            limit=args.limit, overwrite=args.overwrite, progress=False if args.no_progress else None,
            keep_keys=read_key_list(args.keep_keys) if args.keep_keys is not None else None)
        summary = pack(spec, args.output, options)
    except (PackError, ValueError) as exn:
        print(f"pack.py: error: {exn}", file=sys.stderr)
        return 2
    print(summary.report())
    if summary.written == 0:
        print("pack.py: nothing was written", file=sys.stderr)
        return 1
    return 0
