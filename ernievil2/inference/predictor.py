"""Both towers on Paddle Inference with oneDNN: what the one encode path runs on CPU outside training.

:func:`encoder_for` turns an in-memory model into what :mod:`ernievil2.encode` embeds with: the
model itself (Paddle dygraph) or :class:`CompiledTowers`, Paddle Inference predictors made from the
model's export (:func:`ernievil2.inference.export.export_inference`). The export is cached on disk
by the weights' fingerprint (:func:`ernievil2.weights.fingerprint.model_sha256`), written
atomically, so a rerun with the same weights reuses it (``ERNIEVIL2_PREDICTOR_CACHE``, default
``~/.cache/ernievil2/predictors``; the :data:`KEEP_EXPORTS` most recently used are kept).

On a 2-core CPU the base image tower runs 2–3× faster this way than in dygraph
(docs/BENCHMARKS.md, "CPU inference"); ``precision="bf16"`` (oneDNN bfloat16, on CPUs with
AVX512-BF16 or AMX) is about twice as fast again and changes embeddings by ~1e-3. Training's
evaluations stay on dygraph: their weights change between evaluations.
"""
from __future__ import annotations

import logging
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

try:
    import fcntl
except ImportError:  # not POSIX: exports are not serialised between processes
    fcntl = None

from ernievil2.device import BACKENDS, PRECISIONS
from ernievil2.inference.errors import InferError

log = logging.getLogger(__name__)

__all__ = ["BACKENDS", "PRECISIONS", "KEEP_EXPORTS", "CompiledTowers", "compile_towers", "encoder_for",
           "predictor_cache_dir", "bf16_supported"]

KEEP_EXPORTS = 4
TEXT_LENGTH_STEP = 8  # token ids are padded to a multiple of this: fewer shapes for oneDNN to prepare


def bf16_supported() -> bool:
    """Whether oneDNN runs bfloat16 fast on this CPU (AVX512-BF16 or AMX)."""
    from paddle.base import core

    return bool(core.supports_bfloat16_fast_performance())


def predictor_cache_dir() -> Path:
    """Where exports for predictors are cached (``ERNIEVIL2_PREDICTOR_CACHE`` or the default)."""
    return Path(os.environ.get("ERNIEVIL2_PREDICTOR_CACHE", "~/.cache/ernievil2/predictors")).expanduser()


class _Tower:
    """One Paddle Inference predictor with its single input and output; one call at a time."""

    def __init__(self, folder: Path, precision: str, threads: int):
        import paddle.inference as pinf

        config = pinf.Config(str(folder / "inference.json"), str(folder / "inference.pdiparams"))
        config.disable_gpu()
        config.set_cpu_math_library_num_threads(threads)
        config.enable_onednn()
        if precision == "bf16":
            config.enable_onednn_bfloat16()
        config.disable_glog_info()
        self.predictor = pinf.create_predictor(config)
        self._input = self.predictor.get_input_handle(self.predictor.get_input_names()[0])
        self._output = self.predictor.get_output_handle(self.predictor.get_output_names()[0])
        self._lock = threading.Lock()

    def __call__(self, array: np.ndarray) -> np.ndarray:
        with self._lock:
            self._input.reshape(list(array.shape))
            self._input.copy_from_cpu(np.ascontiguousarray(array))
            self.predictor.run()
            return self._output.copy_to_cpu().astype(np.float32, copy=False)


@dataclass
class CompiledTowers:
    """A model's two towers as Paddle Inference predictors (CPU, oneDNN), L2-normalised outputs.

    Has what the encode path reads of a model: ``cfg``, ``encode_image`` (float32 pixels
    ``[B, 3, S, S]``) and ``encode_text`` (int64 token ids ``[B, L]``), on NumPy arrays."""

    cfg: Any
    fingerprint: str
    numpy_io: ClassVar[bool] = True  # ernievil2.encode passes arrays, not tensors
    precision: str
    folder: Path
    image: _Tower
    text: _Tower

    def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        return self.image(np.asarray(pixels, dtype=np.float32))

    def encode_text(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        width = min(-(-ids.shape[1] // TEXT_LENGTH_STEP) * TEXT_LENGTH_STEP, int(self.cfg.text.max_positions))
        if width > ids.shape[1]:  # pads are masked: the embedding is unchanged
            ids = np.pad(ids, ((0, 0), (0, width - ids.shape[1])), constant_values=int(self.cfg.text.pad_id))
        return self.text(ids)


def _export_folder(model: Any, fingerprint: str, cache: Path) -> Path:
    """The cached export of ``model`` (made now, atomically, when absent); old exports pruned."""
    from ernievil2.inference.export import export_inference

    folder = cache / fingerprint[:24]
    # one process exports, the others (ranks of one launch) wait for it and reuse its files
    with open(cache / f".{folder.name}.lock", "w") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / "export.json").is_file():
            log.info("exporting the towers for Paddle Inference into %s (once per set of weights)", folder)
            export_inference(model, folder, int(model.cfg.vision.image_size), int(model.cfg.text.max_positions))
        os.utime(folder)  # most recently used
    exports = sorted((p for p in cache.iterdir() if (p / "export.json").is_file()),
                     key=lambda p: p.stat().st_mtime, reverse=True)
    for old in exports[KEEP_EXPORTS:]:
        shutil.rmtree(old, ignore_errors=True)
        (cache / f".{old.name}.lock").unlink(missing_ok=True)
    return folder


def compile_towers(model: Any, precision: str = "fp32", threads: int | None = None,
                   fingerprint: str | None = None, cache_dir: str | os.PathLike | None = None) -> CompiledTowers:
    """``model``'s towers as Paddle Inference predictors on CPU with oneDNN (``threads``: math
    threads, default every usable core; ``fingerprint``: the model's ``model_sha256`` when already
    computed)."""
    from ernievil2.threads import available_cpus
    from ernievil2.weights.fingerprint import model_sha256

    if precision not in PRECISIONS:
        raise InferError(f"unknown precision {precision!r}; choose one of {list(PRECISIONS)}")
    if precision == "bf16" and not bf16_supported():
        raise InferError("precision=bf16 needs a CPU with AVX512-BF16 or AMX (Paddle's core.supports_bfloat16() is "
                         "false here); use precision=fp32")
    fingerprint = fingerprint or model_sha256(model)
    cache = Path(cache_dir) if cache_dir is not None else predictor_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    folder = _export_folder(model, fingerprint, cache)
    threads = threads or available_cpus()
    return CompiledTowers(model.cfg, fingerprint, precision, folder,
                          _Tower(folder / "image", precision, threads), _Tower(folder / "text", precision, threads))


def encoder_for(model: Any, backend: str = "auto", precision: str = "fp32", threads: int | None = None,
                fingerprint: str | None = None) -> Any:
    """What :mod:`ernievil2.encode` should embed with: ``model`` itself (``dygraph``) or its
    :class:`CompiledTowers` (``predictor``). ``auto``: the predictor when Paddle runs on CPU,
    dygraph on a GPU. ``precision="bf16"`` needs the predictor."""
    import paddle

    if backend not in BACKENDS:
        raise InferError(f"unknown encode backend {backend!r}; choose one of {list(BACKENDS)}")
    if backend == "auto":
        backend = "predictor" if paddle.device.get_device() == "cpu" else "dygraph"
    if backend == "dygraph":
        if precision != "fp32":
            raise InferError(f"precision={precision} needs the predictor backend (the dygraph path is float32)")
        return model
    return compile_towers(model, precision, threads, fingerprint)
