"""Evaluators: small units with one interface, ``evaluator(model, step) -> list[record]``.

A record is a flat dict with ``step, dataset, protocol`` and the recall columns of
:mod:`ernievil2.retrieval`. The trainer (and eval-only mode) loops over the evaluators the config
names; adding a benchmark is a config entry plus, at most, one reader.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np
import paddle

from ernievil2.data.shards import ShardStream
from ernievil2.data.views import EvalTransform
from ernievil2.models import ErnieViL2
from ernievil2.retrieval import multi_caption_recall, official_recall
from ernievil2.tokenizer import WordPieceTokenizer

PROTOCOLS = ("multi", "official")


class Evaluator(Protocol):
    name: str

    def __call__(self, model: ErnieViL2, step: int) -> list[dict]:
        ...


@dataclass
class RetrievalSet:
    """Preprocessed evaluation set: images, tokenized texts and the image index of each text."""

    images: np.ndarray  # float32 [N_img, 3, S, S]
    text_ids: np.ndarray  # int64 [N_txt, L]
    text_image: np.ndarray  # int64 [N_txt]


def load_retrieval_set(
    shards: str | Sequence[str], image_size: int, tokenizer: WordPieceTokenizer, max_length: int
) -> RetrievalSet:
    """Read every sample of ``shards`` (all captions of each image) and preprocess it for evaluation."""
    transform = EvalTransform(image_size)
    images, texts, owner = [], [], []
    for sample in ShardStream(shards, shuffle_shards=False, split_by_rank=False):
        images.append(transform(sample.image, sample.key))
        texts.extend(sample.captions)
        owner.extend([len(images) - 1] * len(sample.captions))
    if not images:
        raise ValueError(f"evaluation set {shards!r} holds no readable sample")
    return RetrievalSet(np.stack(images), tokenizer(texts, max_length), np.asarray(owner, dtype=np.int64))


def trim_padding(ids: np.ndarray, pad_id: int) -> np.ndarray:
    """Drop trailing columns that are padding in every row (outputs are unchanged: pads are masked)."""
    used = np.nonzero((ids != pad_id).any(axis=0))[0]
    return ids[:, : (used[-1] + 1 if len(used) else 1)]


@paddle.no_grad()
def embed(model: ErnieViL2, data: RetrievalSet, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised image and text embeddings of ``data`` (model in eval mode, restored after)."""
    was_training = model.training
    model.eval()
    try:
        img = [model.encode_image(paddle.to_tensor(data.images[i : i + batch_size])).numpy()
               for i in range(0, len(data.images), batch_size)]
        pad = model.cfg.text.pad_id
        txt = [model.encode_text(paddle.to_tensor(trim_padding(data.text_ids[i : i + batch_size], pad))).numpy()
               for i in range(0, len(data.text_ids), batch_size)]
    finally:
        model.train(was_training)
    return np.concatenate(img).astype(np.float32), np.concatenate(txt).astype(np.float32)


class RetrievalEvaluator:
    """Zero-shot image↔text retrieval on one set, under one protocol (SPEC §7)."""

    def __init__(self, name: str, data: RetrievalSet, protocol: str = "multi", batch_size: int = 256):
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {protocol!r} for evaluation set {name!r}; choose from {PROTOCOLS}")
        if protocol == "official" and len(data.images) != len(data.text_ids):
            raise ValueError(f"evaluation set {name!r}: the official 1:1 protocol needs one text per image")
        self.name = name
        self.data = data
        self.protocol = protocol
        self.batch_size = batch_size

    def __call__(self, model: ErnieViL2, step: int) -> list[dict]:
        img, txt = embed(model, self.data, self.batch_size)
        if self.protocol == "multi":
            metrics = multi_caption_recall(img, txt, self.data.text_image)
        else:
            metrics = official_recall(txt, img)
        return [{"step": step, "dataset": self.name, "protocol": self.protocol, **metrics}]
