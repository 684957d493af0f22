"""CPU math threads for inference entry points (import before Paddle)."""
from __future__ import annotations

import os


def use_all_cpu_threads() -> None:
    """Set ``OMP_NUM_THREADS`` to the usable cores unless it is set. Paddle pins it to 1 at import
    when unset, which suits training next to data-loader workers; inference, search and export
    have no such workers (measured on 2 cores, base model: launch/infer.py 33 s -> 27 s)."""
    if "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        os.environ["OMP_NUM_THREADS"] = str(cores)
