"""A model's fingerprint: what says two in-memory models compute the same embeddings."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from typing import Any

import numpy as np

__all__ = ["model_sha256"]


def model_sha256(model: Any) -> str:
    """Hex sha256 of a dual encoder's configuration (``model.cfg``) and of every tensor of its state
    (name, shape, float32 bytes), in name order: the same for any layout the weights came from."""
    from ernievil2.weights.save import state_to_numpy

    h = hashlib.sha256()
    h.update(json.dumps(asdict(model.cfg), sort_keys=True, default=str).encode("utf-8"))
    for name, value in sorted(state_to_numpy(model).items()):
        arr = np.ascontiguousarray(value)
        h.update(f"\0{name}\0{arr.dtype.str}\0{arr.shape}\0".encode("utf-8"))
        h.update(arr.tobytes())
    return h.hexdigest()
