"""The upstream release's inference path and deployment export (library side of ``launch/infer.py``
and ``launch/export.py``), one role per module:

* :mod:`~ernievil2.inference.reader`: the upstream evaluation file (``text \\t image_id \\t
  base64``) as preprocessed batches, bad lines raised or skipped and reported;
* :mod:`~ernievil2.inference.model`: the model and tokenizer from the settings of ``conf/infer.yaml``;
* :mod:`~ernievil2.inference.writer`: the upstream embeddings file (``text_emb \\t image_emb \\t 1``)
  and its sidecars, written atomically (:func:`run_inference`, :func:`infer_main`);
* :mod:`~ernievil2.inference.export`: both towers as Paddle Inference models;
* :mod:`~ernievil2.inference.predictor`: those models run by Paddle Inference with oneDNN, what the
  one encode path embeds with on CPU (:func:`encoder_for`);
* :mod:`~ernievil2.inference.errors`: :class:`InferError`, :class:`BadLineError`, :data:`REASONS`.

The Hydra schema of ``conf/infer.yaml`` lives with the application, in
:mod:`ernievil2.train.infer_config`: this package imports no Hydra and no training code.
"""
from __future__ import annotations

from ernievil2.atomic import atomic_write
from ernievil2.device import resolve_device
from ernievil2.embeddings_file import format_embedding_lines, sidecar_paths
from ernievil2.inference.errors import REASONS, BadLineError, InferError
from ernievil2.inference.export import export_inference
from ernievil2.inference.model import build_inference_model
from ernievil2.inference.predictor import CompiledTowers, compile_towers, encoder_for
from ernievil2.inference.reader import (
    PreparedBatch,
    SeedLine,
    SkipReport,
    decode_base64,
    iter_seed_batches,
    load_record_image,
    parse_seed_line,
)
from ernievil2.inference.writer import InferResult, infer_main, run_inference

__all__ = [
    "InferError", "BadLineError", "REASONS", "SeedLine", "SkipReport", "PreparedBatch", "InferResult",
    "parse_seed_line", "decode_base64", "load_record_image", "iter_seed_batches", "format_embedding_lines",
    "atomic_write", "build_inference_model", "run_inference", "infer_main", "export_inference",
    "sidecar_paths", "resolve_device", "CompiledTowers", "compile_towers", "encoder_for",
]
