"""Worker of tests/test_locked.py: optimizer steps of the trainer with the vision tower locked and
unlocked half-way (``optim.unlock_at=0.5``, a 2-step LR ramp, layer decay 0.7), under data
parallel (``dp``: its hooks before the unlock, gradients averaged after backward from then on),
data parallel with recompute (``recompute``: averaged after backward throughout) or sharded
optimizer state (``sharded``: stage 1).

    python -m paddle.distributed.launch --nproc_per_node 2 tests/dist_locked_worker.py OUT_DIR SETTING

Writes ``OUT_DIR/rank{R}.npz``: the vision parameters at the unlock (``locked/<name>``), every
parameter at the end (``param/<name>``) and the parameters this rank holds optimizer state for at
the unlock and at the end (``owners_at_unlock``, ``owners_at_end``). :func:`run` with one process
(world size 1, the whole batch) is the test's reference.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import paddle

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import dist_worker  # noqa: E402

from ernievil2.distributed import DistInfo, DistributedExchange, init_distributed  # noqa: E402
from ernievil2.losses import LossConfig, MultiViewLoss  # noqa: E402
from ernievil2.train.config import OptimSchema, TrainerSchema  # noqa: E402
from ernievil2.train.optim import build_optimizer, lr_groups  # noqa: E402
from ernievil2.train.towers import TowerSchedule  # noqa: E402
from ernievil2.train.trainer import Trainer  # noqa: E402
from ernievil2.train.training_checkpoint import _optimizer_entries  # noqa: E402

STEPS = 4


def _owners(trainer: Trainer) -> np.ndarray:
    return np.asarray(sorted({k.rsplit("@", 1)[0] for k in _optimizer_entries(trainer.optimizer, trainer.model)[0]}))


def run(info: DistInfo, setting: str) -> dict[str, np.ndarray]:
    """The steps on this rank's share of the batches (float64 model); the arrays written."""
    model = dist_worker.make_model()
    out: dict[str, np.ndarray] = {f"init/{n}": p.numpy().copy() for n, p in model.named_parameters()}
    out["param_names"] = np.asarray([n for n, _ in model.named_parameters()])
    # eps=1 (far above sqrt(v)) makes the Adam update scale with the gradient: a sum where a mean
    # is due would show.
    cfg = OptimSchema(lr=1e-2, warmup_steps=0, eps=1.0, grad_clip=0.0, layer_decay=0.7, unlock_at=0.5,
                      unlock_warmup_steps=2)
    optimizer, scheduler = build_optimizer(model, cfg, STEPS)
    towers = TowerSchedule(model, ["vision"], cfg.unlock_at, cfg.unlock_warmup_steps, lr_groups(model, cfg))
    loss = MultiViewLoss(LossConfig(), DistributedExchange(info))
    settings = TrainerSchema(max_steps=STEPS, sharding_stage=1 if setting == "sharded" else 0,
                             recompute=setting == "recompute")
    trainer = Trainer(model, loss, optimizer, scheduler, None, [], None, "unused", settings, dist=info, towers=towers)
    for step in range(STEPS):
        if step == STEPS // 2:
            out.update({f"locked/{n}": p.numpy().copy() for n, p in model.named_parameters()
                        if n.startswith("vision.")})
            out["owners_at_unlock"] = _owners(trainer)
        trainer.prepare_step(step / STEPS)
        batch = dist_worker.make_batch("a" if step % 2 == 0 else "b")
        trainer.train_step(dist_worker.shard(batch, info.rank, info.world_size))
        trainer._apply_update()
        scheduler.step()
        trainer.step += 1
    assert trainer.towers.unlocked_at_step == STEPS // 2
    out["owners_at_end"] = _owners(trainer)
    out.update({f"param/{n}": p.numpy() for n, p in model.named_parameters()})
    return out


def main(out_dir: str, setting: str) -> None:
    paddle.set_device("cpu")
    paddle.set_default_dtype("float64")
    info = init_distributed()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / f"rank{info.rank}.npz", **run(info, setting))
    print(f"rank {info.rank}: {setting} done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
