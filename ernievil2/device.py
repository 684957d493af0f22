"""Choosing the Paddle device (inference, photo search)."""
from __future__ import annotations

__all__ = ["resolve_device"]


def resolve_device(device: str) -> str:
    """``auto`` → ``gpu`` when Paddle has CUDA and sees a GPU, else ``cpu``; sets it."""
    import paddle

    if device == "auto":
        has_gpu = paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0
        device = "gpu" if has_gpu else "cpu"
    paddle.set_device(device)
    return device
