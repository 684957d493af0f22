"""Pack an image-text dataset into WebDataset shards (img2dataset layout + object tags).

    python launch/pack.py --format jsonl --input ../shared/data/coco-mini-train/captions.jsonl --output /data/coco-mini
    python launch/pack.py --format coco --input annotations/captions_train2017.json \\
        --instances annotations/instances_train2017.json --images train2017 --output /data/coco --workers 8
    python launch/pack.py --format seed_tsv --input test.zh.tsv --output /data/coco-cn-test --max-side 512
    python launch/pack.py --format chinese_clip --input MUGE --split train --output /data/muge
    python launch/pack.py --format karpathy --input dataset_flickr30k.json --images flickr30k-images \\
        --split train --output /data/f30k --objects tags.jsonl --objects-min-score 0.5 --objects-max 10
    python launch/pack.py --format coco --input annotations/captions_train2017.json --images train2017 \
        --detections bbox.json --det-categories annotations/instances_val2017.json --det-min-score 0.5 \
        --det-max 10 --det-translate coco-zh.tsv --output /data/coco-det

Formats (ernievil2.data.formats: the readers evaluation uses too), keys and the output layout:
docs/DATA.md. Exit status: 0 done, 1 nothing written, 2 unusable input or options.
"""
from __future__ import annotations

import sys

from ernievil2.data.packers.cli import main  # light imports: see ernievil2.data.packers.cli

if __name__ == "__main__":
    sys.exit(main())
