"""The model + tokenizer that embeds photos and queries for search, through :mod:`ernievil2.encode`.

Each image file goes through :func:`ernievil2.data.preprocess.preprocess` with the index's profile
(``official`` by default: the inference preprocessing, the same as the in-loop evaluator) at the
model's image size, then :func:`ernievil2.encode.embed_pixels`; texts go through
:func:`ernievil2.encode.embed_texts`. Both run on what
:func:`ernievil2.inference.predictor.encoder_for` makes of the model for ``backend`` (on CPU by
default the towers on Paddle Inference with oneDNN, compiled on first use).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ernievil2.search.identity import ModelIdentity, SearchError, model_sha256, sha256_file

__all__ = ["Encoder", "load_encoder"]


@dataclass
class Encoder:
    """A model + tokenizer ready to embed queries and photos, with its :class:`ModelIdentity`.

    ``checkpoint`` / ``vocab_file`` are where they came from (recorded in an index; informative)."""

    model: Any
    tokenizer: Any
    identity: ModelIdentity
    checkpoint: str = ""
    vocab_file: str = ""
    text_max_length: int = 48
    backend: str = "auto"
    precision: str = "fp32"
    _compiled: Any = field(default=None, repr=False)

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any, profile: str = "official", checkpoint: str = "",
                   text_max_length: int = 48, backend: str = "auto", precision: str = "fp32") -> "Encoder":
        """Wrap an in-memory ``model`` (put in eval mode) and ``tokenizer``; hashes the weights."""
        from ernievil2.data.preprocess import PROFILES

        if profile not in PROFILES:
            raise SearchError(f"unknown profile {profile!r}; choose one of {list(PROFILES)}")
        if not 2 <= text_max_length <= model.cfg.text.max_positions:
            raise SearchError(f"text_max_length must be in [2, {model.cfg.text.max_positions}], got {text_max_length}")
        model.eval()
        identity = ModelIdentity(model_sha256(model), sha256_file(tokenizer.vocab_file), int(model.cfg.vision.image_size),
                                 profile, int(model.cfg.vision.width))
        return cls(model, tokenizer, identity, checkpoint, str(Path(tokenizer.vocab_file).resolve()), text_max_length,
                   backend, precision)

    @property
    def runner(self) -> Any:
        """What the encode path embeds with (:func:`~ernievil2.inference.predictor.encoder_for` of the
        model for ``backend``), made on first use."""
        if self._compiled is None:
            from ernievil2.inference.predictor import encoder_for

            self._compiled = encoder_for(self.model, self.backend, self.precision,
                                         fingerprint=self.identity.model_sha256)
        return self._compiled

    @property
    def image_size(self) -> int:
        return self.identity.image_size

    @property
    def profile(self) -> str:
        return self.identity.profile

    def preprocess_file(self, path: str | os.PathLike) -> np.ndarray:
        """float32 ``[3, S, S]`` of an image file (``OSError`` / ``ValueError`` when unusable)."""
        from ernievil2.data.preprocess import preprocess

        return preprocess(Path(path).read_bytes(), profile=self.profile, size=self.image_size, key=str(path))

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """L2-normalised float32 ``[B, D]`` image embeddings of preprocessed ``[B, 3, S, S]`` pixels."""
        from ernievil2.encode import embed_pixels

        return embed_pixels(self.runner, pixels, batch_size=max(len(pixels), 1))

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """L2-normalised float32 ``[N, D]`` text embeddings (WordPiece, ``text_max_length``), as the
        evaluators embed captions (:func:`ernievil2.encode.embed_texts`)."""
        from ernievil2.encode import embed_texts

        texts = list(texts)
        if not texts:
            return np.empty((0, self.identity.dim), dtype=np.float32)
        for t in texts:
            if not isinstance(t, str) or not t.strip():
                raise SearchError("empty query text")
        return embed_texts(self.runner, self.tokenizer, texts, self.text_max_length, batch_size)

    def encode_image_files(self, paths: Sequence[str | os.PathLike]) -> np.ndarray:
        """L2-normalised float32 ``[N, D]`` embeddings of image files (:class:`SearchError` naming an
        unreadable or undecodable one)."""
        pixels = []
        for p in paths:
            if not Path(p).is_file():
                raise SearchError(f"query image not found: {p}")
            try:
                pixels.append(self.preprocess_file(p))
            except (OSError, ValueError) as exc:
                raise SearchError(f"query image {p}: {exc}") from None
        if not pixels:
            return np.empty((0, self.identity.dim), dtype=np.float32)
        return self.encode_pixels(np.stack(pixels))


def load_encoder(checkpoint: str | os.PathLike, vocab: Optional[str | os.PathLike] = None, *,
                 profile: str = "official", text_max_length: int = 48, device: str = "auto",
                 fallback_vocab: Optional[str | os.PathLike] = None, backend: str = "auto",
                 precision: str = "fp32") -> Encoder:
    """The model of ``checkpoint`` (any layout) and its tokenizer, loaded by
    :func:`ernievil2.weights.load.load_model`.

    The vocab is ``vocab``, else the checkpoint's (:func:`ernievil2.weights.find.find_vocab`:
    ``vocab.txt`` beside its weights, then in its run folder), else ``fallback_vocab`` when it exists
    (an index's recorded vocab). ``backend`` / ``precision``: what embeds
    (:func:`~ernievil2.inference.predictor.encoder_for`).
    Errors (missing checkpoint, no vocab, a checkpoint that does not load) are :class:`SearchError`."""
    from ernievil2.device import resolve_device
    from ernievil2.weights.load import load_model

    ckpt = Path(checkpoint).expanduser()
    if not ckpt.exists():
        raise SearchError(f"checkpoint not found: {ckpt}")
    ckpt = ckpt.resolve()
    resolve_device(device)
    try:
        loaded = load_model(ckpt, Path(vocab).expanduser() if vocab else None, fallback_vocab=fallback_vocab)
    except (ValueError, KeyError, OSError) as exc:
        raise SearchError(f"cannot load checkpoint {ckpt}: {exc}") from None
    if loaded.vocab_file is None:
        raise SearchError(f"no WordPiece vocab for checkpoint {ckpt}: no vocab.txt in or beside it; pass --vocab PATH")
    # from_model checks text_max_length (the tokenizer is always called with it)
    return Encoder.from_model(loaded.model, loaded.tokenizer(), profile, str(ckpt), text_max_length, backend,
                              precision)
