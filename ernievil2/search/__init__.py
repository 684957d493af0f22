"""Text↔image search over a photo collection (library side of ``launch/search.py``).

Index a folder of photos once, then query it by text or by image:

    from ernievil2.search import build_index, load_encoder, load_index, query_text, write_html

    encoder = load_encoder("outputs/demo/RUN/checkpoints/step_0000600")      # vocab.txt beside it
    build_index("~/Pictures", "photos.index", encoder)                       # resumable
    index = load_index("photos.index")
    hits = query_text(index, encoder, "红色的圆形", k=10)                    # [(path, score, i), ...]
    write_html(hits, "results.html", query="红色的圆形")

The modules, one role each (their docstrings give the details):

* :mod:`~ernievil2.search.identity`: :class:`ModelIdentity` (sha256 of the model's configuration
  and weights and of the vocab, image size, profile, width) and the errors; an index refuses a
  query or a resumed build by another model with :class:`IdentityMismatchError`;
* :mod:`~ernievil2.search.encoder`: :class:`Encoder` / :func:`load_encoder`, which embed photos
  and queries through :mod:`ernievil2.encode`;
* :mod:`~ernievil2.search.topk`: exact NumPy top-k, or faiss's flat index (the optional ``search``
  extra);
* :mod:`~ernievil2.search.ann`: the approximate IVF index of large collections (faiss), its
  recall@10 against exact search measured when it is built, and ``nprobe`` chosen from it;
* :mod:`~ernievil2.search.index`: the index folder (``vectors.npy``, ``paths.json``,
  ``index.json``, ``ann.faiss``, saved atomically), :func:`load_index`, :func:`check_identity`;
* :mod:`~ernievil2.search.build`: :func:`build_index` (which files, skipped files, resuming, the
  approximate index);
* :mod:`~ernievil2.search.query`: :func:`encoder_for_index`, :func:`query_text`,
  :func:`query_image`;
* :mod:`~ernievil2.search.gallery`: :func:`write_html`, the results page.
"""
from __future__ import annotations

from ernievil2.search.ann import (
    ANN_FILE,
    ANN_MODES,
    DEFAULT_MIN_ANN_SIZE,
    TARGET_RECALL,
    AnnInfo,
    build_ivf,
    choose_nlist,
    ivf_top_k,
)
from ernievil2.search.build import IMAGE_EXTENSIONS, IndexReport, build_index, scan_images
from ernievil2.search.encoder import Encoder, load_encoder
from ernievil2.search.gallery import write_html
from ernievil2.search.identity import IdentityMismatchError, ModelIdentity, SearchError, model_sha256, sha256_file
from ernievil2.search.index import (
    FORMAT,
    FORMAT_VERSION,
    META_FILE,
    PATHS_FILE,
    VECTORS_FILE,
    SearchHit,
    SearchIndex,
    SkippedFile,
    check_identity,
    load_index,
)
from ernievil2.search.query import encoder_for_index, query_image, query_text
from ernievil2.search.topk import BACKENDS, faiss_top_k, top_k

__all__ = [
    "IMAGE_EXTENSIONS", "BACKENDS", "VECTORS_FILE", "PATHS_FILE", "META_FILE", "FORMAT", "FORMAT_VERSION",
    "SearchError", "IdentityMismatchError", "ModelIdentity", "Encoder", "load_encoder", "scan_images",
    "SkippedFile", "SearchHit", "SearchIndex", "IndexReport", "load_index", "build_index", "top_k",
    "faiss_top_k", "check_identity", "encoder_for_index", "query_text", "query_image", "write_html", "sha256_file",
    "model_sha256", "ANN_FILE", "ANN_MODES", "DEFAULT_MIN_ANN_SIZE", "TARGET_RECALL", "AnnInfo", "build_ivf",
    "choose_nlist", "ivf_top_k",
]
