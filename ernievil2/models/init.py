"""Weight initialisation schemes of the towers' linear layers (``VisionConfig.init`` /
``TextConfig.init``). They matter only when training from scratch: pretrained weights replace them."""
from __future__ import annotations

import paddle.nn as nn

from .config import check_init_scheme


def init_linears(tower: nn.Layer, scheme: str, std: float = 0.02, truncated: bool = False) -> None:
    """Initialise every ``nn.Linear`` in ``tower``: biases zero, weights by ``scheme`` (``std`` and
    ``truncated`` apply to ``normal``)."""
    check_init_scheme(scheme, "init")
    for layer in tower.sublayers():
        if not isinstance(layer, nn.Linear):
            continue
        if scheme == "fan_in":
            nn.initializer.Normal(std=layer.weight.shape[0] ** -0.5)(layer.weight)
        elif truncated:
            nn.initializer.TruncatedNormal(std=std)(layer.weight)
        else:
            nn.initializer.Normal(std=std)(layer.weight)
        nn.initializer.Constant(0.0)(layer.bias)
