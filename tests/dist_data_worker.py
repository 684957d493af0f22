"""Worker of tests/test_data_ranks.py: read a shard stream through paddle's DataLoader on this rank.

    python -m paddle.distributed.launch --nproc_per_node 2 tests/dist_data_worker.py \
        --shards DIR --out OUT_DIR --workers 2 [--epochs 2] [--resampled --max-batches 5] [--no-precheck]

Every rank reads its share of :class:`ernievil2.data.shard_stream.ShardStream` with ``--workers`` loader
workers, exactly as ``ernievil2/train/run.py`` does (the main-process ``check_readers`` first,
unless ``--no-precheck``), and writes ``OUT_DIR/rank{R}.json``: ``{"rank", "world", "epochs":
[{"idx": [...], "worker": [...]}, ...]}``, the sample numbers it received (key ``sNNNNN`` → NNNNN)
and the loader worker that read each. Run as a plain process it is a world of one.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import paddle

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ernievil2.data.sample import RawSample  # noqa: E402
from ernievil2.data.loader_workers import ExitWithParent, collate_arrays, iterate_loader  # noqa: E402
from ernievil2.data.shard_stream import ShardStream  # noqa: E402
from ernievil2.distributed import dist_info  # noqa: E402


def key_number(sample: RawSample, epoch: int) -> dict[str, np.ndarray]:
    """The sample's number and the id of the loader worker reading it (-1: the main process)."""
    info = paddle.io.get_worker_info()
    return {"idx": np.asarray(int(sample.key[1:]), dtype=np.int64),
            "worker": np.asarray(-1 if info is None else int(info.id), dtype=np.int64)}


def _values(x) -> list[int]:
    return np.asarray(x.numpy() if hasattr(x, "numpy") else x).reshape(-1).tolist()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shards", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=3)
    p.add_argument("--resampled", action="store_true")
    p.add_argument("--max-batches", type=int, default=0, help="stop each epoch after this many batches (0: never)")
    p.add_argument("--no-precheck", action="store_true", help="leave the shard-count check to the loader workers")
    args = p.parse_args(argv)

    paddle.set_device("cpu")
    info = dist_info()
    rank, world = info.rank, info.world_size
    stream = ShardStream(args.shards, transform=key_number, shuffle_buffer=4, seed=3, resampled=args.resampled)
    if not args.no_precheck:
        stream.check_readers(args.workers)
    record: dict = {"rank": rank, "world": world, "epochs": []}
    for epoch in range(args.epochs):
        stream.set_epoch(epoch)
        loader = iterate_loader(paddle.io.DataLoader(stream, batch_size=args.batch_size, num_workers=args.workers,
                                                     collate_fn=collate_arrays, worker_init_fn=ExitWithParent()))
        idx: list[int] = []
        workers: list[int] = []
        for n, batch in enumerate(loader, start=1):
            idx += _values(batch["idx"])
            workers += _values(batch["worker"])
            if args.max_batches and n >= args.max_batches:
                break
        loader.close()  # shut the loader down now (iterate_loader), not whenever it is collected
        record["epochs"].append({"idx": idx, "worker": workers})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(record), encoding="utf-8")
    print(f"rank {rank} of {world}: read {[len(e['idx']) for e in record['epochs']]} samples", flush=True)


if __name__ == "__main__":
    main()
