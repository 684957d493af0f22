"""Pack an image-text dataset into WebDataset shards (img2dataset layout + object tags).

    python launch/pack.py --format jsonl --input ../shared/data/coco-mini-train/captions.jsonl --output /data/coco-mini
    python launch/pack.py --format coco --input annotations/captions_train2017.json \\
        --instances annotations/instances_train2017.json --images train2017 --output /data/coco --workers 8
    python launch/pack.py --format seed-tsv --input test.zh.tsv --output /data/seed --max-side 512
    python launch/pack.py --format chinese-clip --input MUGE --split train --output /data/muge
    python launch/pack.py --format karpathy --input dataset_flickr30k.json --images flickr30k-images \\
        --split train --output /data/f30k --objects tags.jsonl --objects-min-score 0.5 --objects-max 10

Formats, keys and the output layout: docs/DATA.md. Exit status: 0 done, 1 nothing written,
2 unusable input or options.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# Light imports only at module level: the packer's worker processes are started with ``spawn``,
# which re-imports this file; the paddle-importing pipeline is imported in main().
from ernievil2.data.packers.formats import FORMATS, PackError, SourceSpec
from ernievil2.data.packers.images import ImageOptions


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    p = argparse.ArgumentParser(description="Pack an image-text dataset into WebDataset shards (docs/DATA.md).")
    src = p.add_argument_group("input")
    src.add_argument("--format", required=True, choices=FORMATS, help="input layout")
    src.add_argument("--input", required=True, type=Path,
                     help="seed tsv / imgs.tsv or its folder / COCO captions json / Karpathy json / captions jsonl")
    src.add_argument("--images", type=Path, help="image folder (coco, karpathy; jsonl: base of relative paths)")
    src.add_argument("--texts", type=Path, help="chinese-clip texts.jsonl (default: beside imgs.tsv)")
    src.add_argument("--instances", type=Path, help="coco instances json: object tags with counts")
    src.add_argument("--split", default="", help="karpathy: comma-separated splits to keep; chinese-clip: the split")
    src.add_argument("--language", help="caption language (default: zh for seed-tsv/chinese-clip, en for "
                                        "coco/karpathy; jsonl: selects captions_LANG)")
    src.add_argument("--limit", type=int, help="read only the first N images of the input")
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
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, pack, print the summary; return the exit status."""
    args = build_parser().parse_args(argv)
    from ernievil2.data.packers.pipeline import (  # paddle comes in here (see above)
        PackOptions,
        pack,
    )

    try:
        spec = SourceSpec(format=args.format, input=args.input, images=args.images, texts=args.texts,
                          instances=args.instances, language=args.language,
                          splits=tuple(s for s in args.split.split(",") if s))
        options = PackOptions(
            workers=args.workers, samples_per_shard=args.samples_per_shard,
            max_shard_bytes=None if args.max_shard_mb is None else int(args.max_shard_mb * 2**20),
            prefix=args.prefix, image=ImageOptions(max_side=args.max_side, jpeg_quality=args.jpeg_quality),
            objects_file=args.objects, objects_min_score=args.objects_min_score, objects_max=args.objects_max,
            limit=args.limit, overwrite=args.overwrite, progress=False if args.no_progress else None)
        summary = pack(spec, args.output, options)
    except (PackError, ValueError) as exn:
        print(f"pack.py: error: {exn}", file=sys.stderr)
        return 2
    print(summary.report())
    if summary.written == 0:
        print("pack.py: nothing was written", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
