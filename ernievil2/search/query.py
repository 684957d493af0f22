"""Querying an index by text or by image, with the encoder the index was built with."""
from __future__ import annotations

import os
from typing import Optional

from ernievil2.search.encoder import Encoder, load_encoder
from ernievil2.search.identity import SearchError
from ernievil2.search.index import SearchHit, SearchIndex, check_identity

__all__ = ["encoder_for_index", "query_text", "query_image"]


def encoder_for_index(index: SearchIndex, checkpoint: Optional[str | os.PathLike] = None,
                      vocab: Optional[str | os.PathLike] = None, *, device: str = "auto",
                      text_max_length: int = 48, backend: str = "auto") -> Encoder:
    """The encoder of ``index``: its recorded checkpoint (or ``checkpoint``) and vocab (or
    ``vocab``, or the one in/beside ``checkpoint``), its profile; :class:`IdentityMismatchError`
    when it does not make vectors comparable with the index's."""
    ckpt = checkpoint or index.checkpoint
    if not ckpt:
        raise SearchError(f"index {index.folder} records no checkpoint; pass one (--ckpt)")
    # no --vocab and no vocab.txt in/beside the checkpoint: the vocab the index was built with
    encoder = load_encoder(ckpt, vocab, profile=index.identity.profile, text_max_length=text_max_length,
                           device=device, fallback_vocab=index.vocab_file or None, backend=backend)
    check_identity(index, encoder)
    return encoder


def query_text(index: SearchIndex, encoder: Encoder, text: str, k: int = 10, backend: str = "auto") -> list[SearchHit]:
    """Top ``k`` images for a text query (``backend``: :meth:`SearchIndex.backend_for`; ``"auto"``:
    the approximate index when the index has one, else exact)."""
    check_identity(index, encoder)
    return index.search(encoder.encode_texts([text]), k, backend)[0]


def query_image(index: SearchIndex, encoder: Encoder, image: str | os.PathLike, k: int = 10,
                backend: str = "auto") -> list[SearchHit]:
    """Top ``k`` images for an image query (preprocessed like the indexed photos)."""
    check_identity(index, encoder)
    return index.search(encoder.encode_image_files([image]), k, backend)[0]
