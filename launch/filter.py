"""Filter web image-text pairs by a trained model: score every pair, keep the best, re-pack.

    python launch/filter.py score --ckpt outputs/demo/RUN --shards shards/web --out scores/web
    python launch/filter.py select scores/web --fraction 0.3 --out keep.txt
    python launch/pack.py --format shards --input shards/web --keep-keys keep.txt --output shards/web-top30

``score`` writes one sidecar per shard (resumable; several ranks under
``python -m paddle.distributed.launch``); ``select`` makes a global cut and writes the kept keys,
a summary and a histogram. docs/DATA.md, "Filter by the model". Exit status: 0 done, 2 unusable
input or options.
"""
from __future__ import annotations

import sys

from ernievil2.threads import use_all_cpu_threads

use_all_cpu_threads()  # before Paddle is imported, as launch/infer.py

if __name__ == "__main__":
    from ernievil2.filtering.cli import main

    sys.exit(main())
