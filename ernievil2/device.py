"""Choosing the Paddle device and what embeds on it (inference, photo search, filtering, benchmarks).

Light to import (Paddle is imported when a device is set): command lines take their choices from here.
"""
from __future__ import annotations

__all__ = ["resolve_device", "BACKENDS", "PRECISIONS"]

# What the encode path embeds with (ernievil2.inference.predictor.encoder_for): auto = Paddle
# Inference with oneDNN on CPU, dygraph on a GPU.
BACKENDS = ("auto", "dygraph", "predictor")
# fp32, or oneDNN bfloat16 on CPUs with AVX512-BF16 / AMX (predictor only).
PRECISIONS = ("fp32", "bf16")


def resolve_device(device: str) -> str:
    """``auto`` → ``gpu`` when Paddle has CUDA and sees a GPU, else ``cpu``; sets it."""
    import paddle

    if device == "auto":
        has_gpu = paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0
        device = "gpu" if has_gpu else "cpu"
    paddle.set_device(device)
    return device
