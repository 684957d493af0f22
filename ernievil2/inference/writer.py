"""Writer of the upstream embeddings file: the inference run of ``launch/infer.py``.

Input, the upstream evaluation file: UTF-8, one pair per line,
``text \\t image_id \\t base64(image)`` (standard or URL-safe base64, padding optional).

Output, the upstream embeddings file: one line per kept input line, in input order,
``text_emb \\t image_emb \\t 1``, each embedding L2-normalised, space-separated floats printed as
``%+.8e`` (9 significant digits: the exact float32 reads back; fixed width, which
``launch/eval_retri.py`` parses vectorised). Beside it:

* ``O.ids.txt``: the image id of every output line (always written; ``launch/eval_retri.py
  --protocol multi`` reads it; it is the only correct id list when lines were skipped);
* ``O.text.npy`` / ``O.image.npy`` (float32 ``[N, D]``) unless ``write_npy=false``;
* ``O.skipped.tsv`` (``line \\t image_id \\t reason \\t detail``) when lines were skipped.

Every file is written to a temporary file in its folder and renamed into place (``os.replace``)
only when the whole input was processed, so a failed run never leaves a half-written ``O``.

Bad lines stop the run with :class:`~ernievil2.inference.errors.BadLineError` or, with
``skip_bad_lines=true``, are left out, counted per reason and listed (line number + image id):
see :mod:`ernievil2.inference.reader`. Images and texts embed through :mod:`ernievil2.encode`.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from ernievil2.atomic import atomic_write
from ernievil2.data.preprocess import PROFILES
from ernievil2.device import resolve_device
from ernievil2.embeddings_file import format_embedding_lines, sidecar_paths
from ernievil2.inference.errors import InferError
from ernievil2.inference.model import build_inference_model
from ernievil2.inference.predictor import encoder_for
from ernievil2.inference.reader import PreparedBatch, SkipReport, iter_seed_batches
from ernievil2.models.schema import check_keys

log = logging.getLogger(__name__)

__all__ = ["InferResult", "run_inference", "infer_main"]


def _embed(model, tokenizer, batch: PreparedBatch, text_max_length: int) -> tuple[np.ndarray, np.ndarray]:
    from ernievil2.encode import embed_pixels, embed_texts

    n = len(batch.texts)
    return (embed_texts(model, tokenizer, batch.texts, text_max_length, batch_size=n),
            embed_pixels(model, batch.pixels, batch_size=n))


def _describe(runner: Any) -> str:
    precision = getattr(runner, "precision", None)
    return f"Paddle Inference (oneDNN, {precision})" if precision else "Paddle dygraph"


@dataclass
class InferResult:
    output_file: Path
    n_written: int
    report: SkipReport
    files: dict[str, Path]


def run_inference(
    model,
    tokenizer,
    test_file: str | os.PathLike,
    output_file: str | os.PathLike,
    *,
    batch_size: int = 64,
    profile: str = "official",
    text_max_length: int = 48,
    skip_bad_lines: bool = False,
    write_npy: bool = False,
    num_workers: int = 0,
    progress: bool = True,
) -> InferResult:
    """Embed ``test_file`` (upstream evaluation file) into ``output_file`` (upstream embeddings file)
    and its sidecars (module docstring); every file appears only when the whole input is done.
    ``model``: a dual encoder or what :func:`~ernievil2.inference.predictor.encoder_for` makes of one."""
    if text_max_length < 2:
        raise InferError(f"text_max_length must be >= 2, got {text_max_length}")
    image_size = model.cfg.vision.image_size
    paths = sidecar_paths(output_file)
    report = SkipReport()
    ids: list[str] = []
    texts_npy: list[np.ndarray] = []
    images_npy: list[np.ndarray] = []
    n = 0
    with atomic_write(output_file) as out:
        for batch in iter_seed_batches(
            test_file, batch_size, profile, image_size, skip_bad_lines, report, num_workers, progress
        ):
            text, image = _embed(model, tokenizer, batch, text_max_length)
            out.write(format_embedding_lines(text, image))
            ids.extend(batch.image_ids)
            n += len(text)
            if write_npy:
                texts_npy.append(text)
                images_npy.append(image)
        if n == 0:
            raise InferError(f"{test_file}: no line to embed" + (f" ({report.summary()})" if len(report) else ""))
        # sidecars go into place before O itself (O appearing marks a finished run)
        with atomic_write(paths["ids"]) as f:
            f.write("".join(f"{i}\n" for i in ids))
        files = {"embeddings": Path(output_file), "ids": paths["ids"]}
        if write_npy:
            for key, parts in (("text_npy", texts_npy), ("image_npy", images_npy)):
                with atomic_write(paths[key], "wb") as f:
                    np.save(f, np.concatenate(parts).astype(np.float32))
                files[key] = paths[key]
        if len(report):
            with atomic_write(paths["skipped"]) as f:
                f.write(report.to_tsv())
            files["skipped"] = paths["skipped"]
        elif paths["skipped"].exists():
            paths["skipped"].unlink()  # stale list from an earlier run
    return InferResult(Path(output_file), n, report, files)


def infer_main(cfg: Any) -> InferResult:
    """``launch/infer.py``: validate ``cfg`` (the composed ``conf/infer.yaml``, or any object with
    its attributes), build the model, run :func:`run_inference`, report."""
    if isinstance(cfg, DictConfig):
        check_keys(cfg)
        cfg = OmegaConf.to_object(cfg)
    if cfg.profile not in PROFILES:
        raise InferError(f"unknown profile {cfg.profile!r}; choose one of {list(PROFILES)}")
    device = resolve_device(cfg.device)
    model, tokenizer = build_inference_model(cfg)
    runner = encoder_for(model, cfg.backend, cfg.precision)
    log.info("device %s, preset %s, image size %d, profile %s, %s", device, cfg.model.preset,
             model.cfg.vision.image_size, cfg.profile, _describe(runner))
    result = run_inference(
        runner, tokenizer, os.path.expanduser(cfg.test_file), os.path.expanduser(cfg.output_file),
        batch_size=cfg.batch_size, profile=cfg.profile, text_max_length=cfg.text_max_length,
        skip_bad_lines=cfg.skip_bad_lines, write_npy=cfg.write_npy, num_workers=cfg.num_workers,
    )
    log.info("wrote %d line(s) to %s", result.n_written, result.output_file)
    for key, path in result.files.items():
        if key != "embeddings":
            log.info("  %s: %s", key, path)
    if len(result.report):
        log.warning(result.report.summary())
    return result
