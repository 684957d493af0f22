"""Typed schema of ``conf/infer.yaml`` (``launch/infer.py``, ``launch/export.py``): the ``model``
group plus the upstream release's inference settings. Registered with Hydra's ConfigStore as
``infer_schema``, the first entry of ``conf/infer.yaml``'s defaults, so unknown keys fail.

Application side only: the library (:mod:`ernievil2.inference`) reads these settings by attribute
and never imports this module. It imports no training code either (only the ``model`` group's
schema, :mod:`ernievil2.models.schema`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from ernievil2.models.schema import ModelSchema

__all__ = ["InferSchema", "register_infer_schema"]


@dataclass
class InferSchema:
    """``conf/infer.yaml``: the ``model`` group plus the upstream release's inference settings."""

    model: ModelSchema = field(default_factory=ModelSchema)
    test_file: str = MISSING  # upstream evaluation file: text \t image_id \t base64
    output_file: str = MISSING  # upstream embeddings file to write
    batch_size: int = 64
    profile: str = "official"  # image preprocessing: official | paddlenlp (ernievil2.data.preprocess)
    text_max_length: int = 48  # [CLS] + 46 word pieces + [SEP], as the official release
    # WordPiece vocab; null: model.vocab_file, then (with model.init_from) the checkpoint's
    # (ernievil2.weights.find.find_vocab: vocab.txt beside its weights, then in its run folder), else an error
    vocab_file: Optional[str] = None
    write_npy: bool = True  # also O.text.npy and O.image.npy (launch/eval_retri.py reads them, verified)
    skip_bad_lines: bool = False  # false: stop at the first bad line; true: skip, count, list
    device: str = "auto"  # auto | cpu | gpu | gpu:N
    seed: int = 0  # initialisation of a model without model.init_from
    num_workers: int = 2  # threads decoding images (0: in the main thread)
    backend: str = "auto"  # auto (CPU: Paddle Inference with oneDNN; GPU: dygraph) | predictor | dygraph
    precision: str = "fp32"  # fp32 | bf16 (oneDNN bfloat16 on CPUs that have it; embeddings change by ~1e-3)


def register_infer_schema() -> None:
    """Register :class:`InferSchema` as ``infer_schema`` (first entry of ``conf/infer.yaml``)."""
    ConfigStore.instance().store(name="infer_schema", node=InferSchema)
