"""The one way to turn images and texts into embeddings: L2-normalised float32 rows, batched.

Evaluation (retrieval and zero-shot), inference (``launch/infer.py``), the photo search and the
benchmarks embed through these functions, so the same image or text gives the same vector
everywhere. Images enter as preprocessed pixels (float32 ``[B, 3, S, S]``, what
:func:`ernievil2.data.preprocess.preprocess` makes of one image), as resized crops (uint8
``[n, S, S, 3]``, normalised batch by batch: a quarter of float32's memory for held evaluation
sets; or an iterable of such batches, decoded as they are embedded, for streamed ones) or as
encoded files; texts as strings (tokenized here) or token ids.

``model`` is a dual encoder (Paddle dygraph: run in eval mode without gradient, its mode restored
after) or its :class:`~ernievil2.inference.predictor.CompiledTowers` (Paddle Inference with oneDNN,
what :func:`ernievil2.inference.predictor.encoder_for` gives on CPU) or
:class:`~ernievil2.inference.onnx_export.OnnxTowers`: anything with ``cfg``, ``encode_image`` and
``encode_text`` (on Paddle tensors, or on NumPy arrays where ``numpy_io`` is true).
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import paddle
from tqdm.auto import tqdm

from ernievil2.data import preprocess


@contextlib.contextmanager
def eval_mode(model: paddle.nn.Layer) -> Iterator[None]:
    """``model`` in eval mode without gradient inside the block; its previous mode after."""
    was_training = model.training
    model.eval()
    try:
        with paddle.no_grad():
            yield
    finally:
        model.train(was_training)


def trim_padding(ids: np.ndarray, pad_id: int) -> np.ndarray:
    """Drop trailing columns that are padding in every row (outputs are unchanged: pads are masked)."""
    used = np.nonzero((ids != pad_id).any(axis=0))[0]
    return ids[:, : (used[-1] + 1 if len(used) else 1)]


def _empty(model: Any) -> np.ndarray:
    return np.empty((0, model.cfg.text.width), dtype=np.float32)


@contextlib.contextmanager
def _runner(model: Any, tower: str) -> Iterator[Any]:
    """``tower``'s function from NumPy input to NumPy embeddings, for a dygraph model (in eval mode,
    without gradient, inside the block) or compiled towers (``numpy_io``: they take and give arrays)."""
    if getattr(model, "numpy_io", False):
        yield getattr(model, f"encode_{tower}")
        return
    encode = getattr(model, f"encode_{tower}")
    with eval_mode(model):
        yield lambda array: encode(paddle.to_tensor(array)).numpy()


def embed_pixels(model: Any, pixels: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Embeddings ``[B, D]`` of preprocessed pixels (float32 ``[B, 3, S, S]``)."""
    pixels = np.ascontiguousarray(pixels, dtype=np.float32)
    with _runner(model, "image") as run:
        out = [run(pixels[i: i + batch_size]) for i in range(0, len(pixels), batch_size)]
    return np.concatenate(out).astype(np.float32, copy=False) if out else _empty(model)


def _batches(n: int, batch_size: int, progress: str | None) -> Iterable[int]:
    """Batch starts; with ``progress`` a bar of that name on an interactive terminal (tqdm's disable=None)."""
    starts = range(0, n, batch_size)
    return starts if progress is None else tqdm(starts, desc=progress, unit="batch", leave=False, disable=None)


def embed_crop_batches(model: Any, batches: Iterable[np.ndarray], batch_size: int = 256,
                       profile: str = "official") -> np.ndarray:
    """Embeddings of resized centre crops that come batch by batch (each uint8 ``[b, S, S, 3]``,
    normalised under ``profile``), in order: a batch can be dropped once embedded, so crops decoded
    as they are consumed (a streamed evaluation set) never need to be held together. Batches of at
    most ``batch_size`` crops give the vectors :func:`embed_crops` gives for the same batches."""
    out = [embed_pixels(model, preprocess.normalize_batch(batch, profile), batch_size) for batch in batches]
    return np.concatenate(out) if out else _empty(model)


def embed_crops(model: Any, crops: np.ndarray, batch_size: int = 256, profile: str = "official",
                progress: str | None = None) -> np.ndarray:
    """Embeddings of resized centre crops (uint8 ``[n, S, S, 3]``), normalised under ``profile``
    one batch at a time (:func:`embed_crop_batches`; ``progress``: see :func:`embed_token_ids`)."""
    batches = (crops[i: i + batch_size] for i in _batches(len(crops), batch_size, progress))
    return embed_crop_batches(model, batches, batch_size, profile)


def embed_image_files(model: Any, paths: Sequence[str | os.PathLike], profile: str = "official",
                      batch_size: int = 256) -> np.ndarray:
    """Embeddings of encoded image files, preprocessed at the model's image size under ``profile``
    (``OSError`` / ``ValueError`` naming an unreadable or undecodable file)."""
    size = int(model.cfg.vision.image_size)
    pixels = [preprocess.preprocess(Path(p).read_bytes(), profile=profile, size=size, key=str(p)) for p in paths]
    return embed_pixels(model, np.stack(pixels), batch_size) if pixels else _empty(model)


def embed_token_ids(model: Any, text_ids: np.ndarray, batch_size: int = 256, progress: str | None = None) -> np.ndarray:
    """Embeddings of token ids ``[n, L]``; the columns that are padding in a whole batch are trimmed.
    ``progress``: the name of a progress bar over the batches, shown on an interactive terminal."""
    pad = model.cfg.text.pad_id
    with _runner(model, "text") as run:
        out = [run(trim_padding(text_ids[i: i + batch_size], pad)) for i in _batches(len(text_ids), batch_size, progress)]
    return np.concatenate(out).astype(np.float32, copy=False) if out else _empty(model)


def embed_texts(model: Any, tokenizer: Any, texts: Sequence[str], max_length: int,
                batch_size: int = 256) -> np.ndarray:
    """Embeddings of strings, tokenized with ``tokenizer`` to at most ``max_length`` tokens."""
    texts = list(texts)
    if not texts:
        return _empty(model)
    return embed_token_ids(model, tokenizer(texts, max_length), batch_size)
