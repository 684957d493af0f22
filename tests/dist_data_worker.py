"""Worker of tests/test_data_ranks.py: read the training stream through paddle's DataLoader on this rank.

    python -m paddle.distributed.launch --nproc_per_node 2 tests/dist_data_worker.py \
        --shards DIR --out OUT_DIR --workers 2 [--epochs 2] [--batch-size 1] [--resampled --max-batches 5] \
        [--no-precheck]

Every rank reads its share of :class:`ernievil2.data.loader.TrainStream` (one source: ``--shards``)
with ``--workers`` loader workers, built as ``ernievil2/train/run.py`` builds it, by
:func:`ernievil2.data.loader.build_train_data` (which checks the shard count in the main process).
``--no-precheck`` hands the same stream to a plain ``paddle.io.DataLoader`` instead, leaving that check
to the loader workers. Writes ``OUT_DIR/rank{R}.json``: ``{"rank", "world", "epochs": [{"idx": [...],
"worker": [...], "batches_per_epoch": N or null}, ...]}``, the sample numbers it received (key
``sNNNNN`` → NNNNN), the loader worker that read each and the batch count the loader announced for
the epoch. Run as a plain process it is a world of one.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import paddle

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ernievil2.data.loader import StreamSource, TrainStream, build_train_data  # noqa: E402
from ernievil2.data.loader_workers import ExitWithParent, iterate_loader  # noqa: E402
from ernievil2.data.sample import RawSample  # noqa: E402
from ernievil2.distributed import dist_info  # noqa: E402

SEED = 3
SHUFFLE_BUFFER = 4


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
    sources = [StreamSource.of("train", args.shards, resampled=args.resampled)]
    if args.no_precheck:
        stream = TrainStream(sources, key_number, args.batch_size, shuffle_buffer=SHUFFLE_BUFFER, seed=SEED)

        def batches(epoch: int) -> Iterator[dict]:
            stream.set_position(epoch)
            return iterate_loader(paddle.io.DataLoader(stream, batch_size=None, num_workers=args.workers,
                                                       worker_init_fn=ExitWithParent()))

        def batches_per_epoch(epoch: int) -> int | None:
            return None
    else:
        data = build_train_data(sources, key_number, batch_size=args.batch_size, num_workers=args.workers,
                                shuffle_buffer=SHUFFLE_BUFFER, seed=SEED, world_size=world)
        batches, batches_per_epoch = data.batches, data.batches_per_epoch
    record: dict = {"rank": rank, "world": world, "epochs": []}
    for epoch in range(args.epochs):
        loader = batches(epoch)
        idx: list[int] = []
        workers: list[int] = []
        n = 0
        for batch in loader:
            if "idx" not in batch:  # a loader worker's last skip counts alone (plain DataLoader)
                continue
            n += 1
            idx += _values(batch["idx"])
            workers += _values(batch["worker"])
            if args.max_batches and n >= args.max_batches:
                break
        loader.close()  # shut the loader down now (iterate_loader), not whenever it is collected
        record["epochs"].append({"idx": idx, "worker": workers, "batches_per_epoch": batches_per_epoch(epoch)})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(record), encoding="utf-8")
    print(f"rank {rank} of {world}: read {[len(e['idx']) for e in record['epochs']]} samples", flush=True)


if __name__ == "__main__":
    main()
