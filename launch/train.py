"""Train or evaluate an ERNIE-ViL 2.0 dual encoder; no arguments = the demo.

    python launch/train.py                                   # embedded demo on CPU
    python launch/train.py loss=clip_only trainer.max_steps=100
    python launch/train.py resume=latest hydra.run.dir=RUN   # continue a killed run
    python launch/train.py mode=eval ckpt=PATH               # evaluate a checkpoint (any layout)
    python -m paddle.distributed.launch --nproc_per_node 8 launch/train.py experiment=NAME

Under the paddle launcher with several ranks, all ranks share one Hydra run dir: before Hydra
starts, the ranks join the process group and take rank 0's clock for ``${run_time:...}`` in
``hydra.run.dir`` (a timestamp of each rank's own would differ whenever the ranks start in
different seconds). Each rank logs to its own ``train_rank{N}.log`` there (``hydra.job.name``),
and only rank 0 writes the ``.hydra/`` config copy. An explicit ``hydra.run.dir=...`` works too;
it must then be the same for all ranks (no ``${now:...}`` in it).
"""
from __future__ import annotations

import os
import sys
from datetime import datetime

# Paddle pins OMP_NUM_THREADS=1 at import when unset. On CPU that is also the fastest setting
# next to a data-loader worker (measured: docs/BENCHMARKS.md); export OMP_NUM_THREADS to change it.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from ernievil2.train.config import RUN_TIME_ENV, register_schemas  # noqa: E402

register_schemas()


def prepare_ranks(argv: list[str]) -> list[str]:
    """Several ranks: agree on the run time (rank 0's) and give each rank its own log file name.
    Returns ``argv`` with the Hydra overrides added; one process: ``argv`` unchanged."""
    from ernievil2.distributed import broadcast_object, dist_info, init_distributed

    if not dist_info().distributed:
        return argv
    info = init_distributed()
    # Rank 0's value (its own $ERNIEVIL2_RUN_TIME, else its clock) wins on every rank.
    os.environ[RUN_TIME_ENV] = str(broadcast_object(os.environ.get(RUN_TIME_ENV)
                                                    or datetime.now().isoformat(timespec="seconds")))
    argv = list(argv)
    if not any(a.startswith("hydra.job.name=") for a in argv):
        argv.append(f"hydra.job.name=train_rank{info.rank}")
    if not info.is_main and not any(a.startswith("hydra.output_subdir=") for a in argv):
        argv.append("hydra.output_subdir=null")
    return argv


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from ernievil2.train.run import run_evaluation, run_training

    try:
        if cfg.mode not in ("train", "eval"):
            raise ValueError(f"mode must be 'train' or 'eval', got {cfg.mode!r}")
        (run_evaluation if cfg.mode == "eval" else run_training)(cfg, HydraConfig.get().runtime.output_dir)
    except (KeyError, ValueError, OSError) as exc:  # a user error (config key, file, checkpoint, vocab): one line
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"train.py: error: {exc.args[0] if isinstance(exc, KeyError) and exc.args else exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    sys.argv = prepare_ranks(sys.argv)
    main()
