"""Precision, recompute and strategy settings (ernievil2.train.parallel) in one process."""
from __future__ import annotations

import logging

import numpy as np
import paddle
import pytest

from ernievil2.distributed import DistInfo
from ernievil2.models import build_model
from ernievil2.models.config import model_config
from ernievil2.train.parallel import Precision, build_strategy, resolve_precision, setup_parallel


def test_amp_is_turned_off_on_cpu_with_a_notice(caplog):
    with caplog.at_level(logging.INFO, logger="ernievil2"):
        assert resolve_precision("bf16", "O2", device="cpu") == Precision()
    assert "trainer.amp=bf16 ignored on cpu" in caplog.text


@pytest.mark.parametrize("amp,level,dtype", [("bf16", "O2", "bfloat16"), ("fp16", "O1", "float16")])
def test_amp_on_gpu(amp, level, dtype):
    assert resolve_precision(amp, level, device="gpu:0") == Precision(dtype, level)
    assert resolve_precision("none", level, device="gpu:0") == Precision()


@pytest.mark.parametrize("amp,level,key", [("int8", "O1", "trainer.amp"), ("bf16", "O3", "trainer.amp_level")])
def test_bad_precision_settings_name_the_key(amp, level, key):
    with pytest.raises(ValueError, match=key):
        resolve_precision(amp, level, device="gpu:0")


def test_strategy_groups():
    eight = DistInfo(rank=0, world_size=8)
    dp = build_strategy(eight, 0).hybrid_configs
    assert (dp["dp_degree"], dp["sharding_degree"]) == (8, 1)
    sharded = build_strategy(eight, 1).hybrid_configs
    assert (sharded["dp_degree"], sharded["sharding_degree"]) == (1, 8)
    with pytest.raises(ValueError, match="trainer.sharding_stage"):
        build_strategy(eight, 3)


def test_sharding_stage_two_needs_a_gpu():
    model = build_model(model_config("tiny", text={"vocab_size": 64}))
    with pytest.raises(ValueError, match="sharding_stage=2 needs GPUs"):
        setup_parallel(model, None, DistInfo(), sharding_stage=2)


def test_recompute_gives_the_same_gradients_with_dropout():
    """Per-block recompute replays dropout: gradients equal those without recompute (float64)."""
    previous = paddle.get_default_dtype()
    paddle.set_default_dtype("float64")
    try:
        grads = []
        for recompute in (False, True):
            paddle.seed(3)
            model = build_model(model_config("tiny", text={"vocab_size": 64, "dropout": 0.2}))
            setup_parallel(model, None, DistInfo(), recompute=recompute)
            assert model.vision.recompute is recompute and model.text.recompute is recompute
            model.train()
            paddle.seed(5)
            pixels = paddle.to_tensor(np.random.default_rng(0).standard_normal((2, 3, 64, 64)))
            ids = paddle.to_tensor(np.array([[1, 5, 6, 7, 2], [1, 8, 2, 0, 0]]))
            image, text, _ = model(pixels, ids)
            (image * text).sum().backward()
            grads.append({n: p.grad.numpy() for n, p in model.named_parameters() if p.grad is not None})
    finally:
        paddle.set_default_dtype(previous)
    assert set(grads[0]) == set(grads[1]) and len(grads[0]) > 80
    for name, g in grads[0].items():
        np.testing.assert_allclose(grads[1][name], g, rtol=1e-12, atol=1e-14, err_msg=name)
