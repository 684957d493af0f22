"""Train (or, with later modes, evaluate) an ERNIE-ViL 2.0 dual encoder; no arguments = the demo.

    python launch/train.py                                   # embedded demo on CPU
    python launch/train.py loss=clip_only trainer.max_steps=100
    python -m paddle.distributed.launch --nproc_per_node 8 launch/train.py experiment=NAME
"""
from __future__ import annotations

import os
import sys

# Paddle pins OMP_NUM_THREADS=1 at import when unset. On CPU that is also the fastest setting
# next to a data-loader worker (measured: docs/BENCHMARKS.md); export OMP_NUM_THREADS to change it.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from ernievil2.train.config import register_schemas  # noqa: E402

register_schemas()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from ernievil2.train.run import run_training

    run_training(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
