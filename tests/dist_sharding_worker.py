"""Worker of tests/test_distributed.py's sharding test: a few optimizer steps of the trainer with
``trainer.sharding_stage`` 0 (data parallel) or 1 (optimizer state sharded over the ranks), with
``trainer.recompute`` when a third argument ``recompute`` is given.

    python -m paddle.distributed.launch --nproc_per_node 2 tests/dist_sharding_worker.py OUT_DIR STAGE [recompute]

Writes ``OUT_DIR/rank{R}.npz``: the parameters after the steps (``param/<name>``) and the number of
parameters whose Adam moments this rank holds (``moments``).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import paddle

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import dist_worker  # noqa: E402

from ernievil2.distributed import DistributedExchange, init_distributed  # noqa: E402
from ernievil2.losses import LossConfig, MultiViewLoss  # noqa: E402
from ernievil2.train.config import OptimSchema, TrainerSchema  # noqa: E402
from ernievil2.train.optim import build_optimizer  # noqa: E402
from ernievil2.train.trainer import Trainer  # noqa: E402

STEPS = 3
# eps=1 (far above sqrt(v)) makes the Adam update scale with the gradient: a sum where a mean is
# due would show, which it would not with the usual eps (Adam is nearly scale-invariant).


def main(out_dir: str, stage: int, recompute: bool = False) -> None:
    paddle.set_device("cpu")
    paddle.set_default_dtype("float64")
    info = init_distributed()
    model = dist_worker.make_model()
    optimizer, scheduler = build_optimizer(model, OptimSchema(lr=1e-2, warmup_steps=0, eps=1.0, grad_clip=0.0), STEPS)
    loss = MultiViewLoss(LossConfig(), DistributedExchange(info))
    trainer = Trainer(model, loss, optimizer, scheduler, None, [], None, "unused",
                      TrainerSchema(max_steps=STEPS, sharding_stage=stage, recompute=recompute), dist=info)
    for step in range(STEPS):
        batch = dist_worker.make_batch("a" if step % 2 == 0 else "b")
        trainer.train_step(dist_worker.shard(batch, info.rank, info.world_size))
        trainer._apply_update()
        scheduler.step()
    moments = {k for k in trainer.optimizer.state_dict() if "moment1" in k}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / f"rank{info.rank}.npz", moments=np.asarray(len(moments)),
             **{f"param/{n}": p.numpy() for n, p in model.named_parameters()})
    print(f"rank {info.rank}: stage {stage}, {len(moments)} parameters' moments held", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3:] == ["recompute"])
