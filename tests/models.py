"""Models the tests build: the tiny preset, seeded, on CPU, in eval mode."""
from __future__ import annotations

import paddle

from ernievil2.models import build_model, model_config


def tiny_model(seed: int = 0):
    """The tiny preset with weights from ``seed``, on CPU, in eval mode."""
    paddle.set_device("cpu")
    paddle.seed(seed)
    model = build_model(model_config("tiny"))
    model.eval()
    return model
