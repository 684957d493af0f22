"""Worker of tests/test_img2dataset.py: size a training source on this rank, as ``run.py`` does.

    python -m paddle.distributed.launch --nproc_per_node 2 tests/dist_count_worker.py \
        --shards DIR --cache FILE --out OUT_DIR

Joins the process group, builds the :class:`ernievil2.data.loader.TrainStream` of one exact source
(``--shards``, shard sizes cached in ``--cache``) and writes ``OUT_DIR/rank{R}.json``: ``{"rank",
"world", "counted": [the shards this process read to count them], "sizes": {url: samples}}``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import paddle

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ernievil2.data import epoch_sizes  # noqa: E402
from ernievil2.data.loader import StreamSource, TrainStream  # noqa: E402
from ernievil2.distributed import init_distributed  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shards", required=True)
    p.add_argument("--cache", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    paddle.set_device("cpu")
    info = init_distributed()
    counted: list[str] = []
    count = epoch_sizes.count_samples

    def recording_count(url: str) -> int:
        counted.append(url)
        return count(url)

    epoch_sizes.count_samples = recording_count
    stream = TrainStream([StreamSource.of("train", args.shards)], lambda s, e: {"i": np.zeros(1)}, batch_size=1,
                         sizes_cache=args.cache)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"rank": info.rank, "world": info.world_size, "counted": counted, "sizes": stream.sizes}
    (out / f"rank{info.rank}.json").write_text(json.dumps(record), encoding="utf-8")


if __name__ == "__main__":
    main()
