"""The upstream release's inference path and deployment export (library side of ``launch/infer.py`` / ``launch/export.py``).

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

Bad lines — wrong column count, invalid UTF-8, empty text, invalid base64, undecodable image —
stop the run with :class:`BadLineError` naming the 1-based line number and the reason, or, with
``skip_bad_lines=true``, are left out, counted per reason and listed (line number + image id).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from ernievil2.atomic import atomic_dir, atomic_write
from ernievil2.data import formats as data_formats
from ernievil2.data.b64 import decode_base64
from ernievil2.data.formats import SEED_LINE_CHECKS, LineProblem, SeedLine
from ernievil2.data.preprocess import PROFILES, preprocess
from ernievil2.device import resolve_device
from ernievil2.embeddings_file import format_embedding_lines, sidecar_paths
from ernievil2.models.schema import ModelSchema, check_keys, resolve_model

log = logging.getLogger(__name__)

__all__ = [
    "InferSchema", "register_infer_schema", "InferError", "BadLineError", "REASONS", "SeedLine",
    "SkipReport", "InferResult", "parse_seed_line", "decode_base64", "load_record_image",
    "iter_seed_batches", "format_embedding_lines", "atomic_write", "build_inference_model", "run_inference", "infer_main", "export_inference", "sidecar_paths",
    "resolve_device",
]

#: Reasons a line is bad, in the order they are checked: the upstream TSV line checks of
#: :mod:`ernievil2.data.formats` (the packer's and evaluation's too), then the image's decoding.
REASONS: dict[str, str] = {**SEED_LINE_CHECKS, "image": "undecodable image"}


# --------------------------------------------------------------------------- config
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
    # (ernievil2.checkpoint.find_vocab: vocab.txt beside its weights, then in its run folder), else an error
    vocab_file: Optional[str] = None
    write_npy: bool = True  # also O.text.npy and O.image.npy (launch/eval_retri.py reads them, verified)
    skip_bad_lines: bool = False  # false: stop at the first bad line; true: skip, count, list
    device: str = "auto"  # auto | cpu | gpu | gpu:N
    seed: int = 0  # initialisation of a model without model.init_from
    num_workers: int = 2  # threads decoding images (0: in the main thread)


def register_infer_schema() -> None:
    """Register :class:`InferSchema` as ``infer_schema`` (first entry of ``conf/infer.yaml``)."""
    ConfigStore.instance().store(name="infer_schema", node=InferSchema)


# --------------------------------------------------------------------------- errors
class InferError(ValueError):
    """A user-facing inference error (bad input, missing vocab, bad setting)."""


class BadLineError(InferError):
    """One bad input line: ``lineno`` (1-based), ``reason`` (a key of :data:`REASONS`), ``detail``."""

    def __init__(self, lineno: int, reason: str, detail: str = "", image_id: Optional[str] = None):
        self.lineno, self.reason, self.detail, self.image_id = lineno, reason, detail, image_id
        where = f"line {lineno}" + (f" (image id {image_id!r})" if image_id else "")
        super().__init__(f"{where}: {REASONS[reason]}" + (f": {detail}" if detail else ""))


# --------------------------------------------------------------------------- reading
def parse_seed_line(raw: bytes | str, lineno: int) -> SeedLine:
    """One line through :func:`ernievil2.data.formats.parse_seed_line` (encoding, column count,
    text; stripped text and id), or :class:`BadLineError`. The base64 is decoded later
    (:func:`load_record_image`). Blank lines are not skipped: every input line is one output line."""
    parsed = data_formats.parse_seed_line(raw, lineno)
    if isinstance(parsed, LineProblem):
        raise BadLineError(lineno, parsed.check, parsed.detail, parsed.image_id)
    return parsed


def load_record_image(record: SeedLine, profile: str, size: int) -> np.ndarray:
    """The preprocessed ``[3, size, size]`` image of ``record``, or :class:`BadLineError`."""
    try:
        data = decode_base64(record.image_b64)
    except ValueError as exc:
        raise BadLineError(record.lineno, "base64", str(exc), record.image_id) from None
    try:
        return preprocess(data, profile, size, key=record.image_id)
    except ValueError as exc:
        raise BadLineError(record.lineno, "image", str(exc), record.image_id) from None


@dataclass
class SkipReport:
    """Lines left out with ``skip_bad_lines=true``."""

    skipped: list[BadLineError] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.skipped)

    @property
    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for err in self.skipped:
            out[err.reason] = out.get(err.reason, 0) + 1
        return out

    def summary(self, max_items: int = 20) -> str:
        if not self.skipped:
            return "no line skipped"
        per = ", ".join(f"{REASONS[r]}: {n}" for r, n in sorted(self.counts.items(), key=lambda kv: list(REASONS).index(kv[0])))
        lines = [f"skipped {len(self.skipped)} bad line(s) ({per}):"]
        for err in self.skipped[:max_items]:
            lines.append(f"  line {err.lineno}\timage id {err.image_id or '-'}\t{REASONS[err.reason]}")
        if len(self.skipped) > max_items:
            lines.append(f"  ... and {len(self.skipped) - max_items} more")
        return "\n".join(lines)

    def to_tsv(self) -> str:
        rows = ["line\timage_id\treason\tdetail"]
        for e in self.skipped:
            detail = " ".join(e.detail.split())
            rows.append(f"{e.lineno}\t{e.image_id or ''}\t{e.reason}\t{detail}")
        return "\n".join(rows) + "\n"


@dataclass
class PreparedBatch:
    linenos: list[int]
    texts: list[str]
    image_ids: list[str]
    pixels: np.ndarray  # float32 [B, 3, S, S]


def iter_seed_batches(
    path: str | os.PathLike,
    batch_size: int,
    profile: str,
    image_size: int,
    skip_bad_lines: bool = False,
    report: Optional[SkipReport] = None,
    num_workers: int = 0,
    progress: bool = True,
) -> Iterator[PreparedBatch]:
    """Read an upstream evaluation file in order and yield preprocessed batches of its good lines.

    A bad line raises :class:`BadLineError` (``skip_bad_lines=False``) or is appended to
    ``report`` and left out. Images are decoded by ``num_workers`` threads (OpenCV and PIL
    release the GIL); the order of lines is kept.
    """
    if batch_size < 1:
        raise InferError(f"batch_size must be >= 1, got {batch_size}")
    if profile not in PROFILES:
        raise InferError(f"unknown profile {profile!r}; choose one of {list(PROFILES)}")
    path = Path(path)
    if not path.is_file():
        raise InferError(f"test file not found: {path}")
    report = report if report is not None else SkipReport()
    from tqdm.auto import tqdm

    def reject(err: BadLineError) -> None:
        if not skip_bad_lines:
            raise err
        report.skipped.append(err)

    def prepare(records: list[SeedLine]) -> Optional[PreparedBatch]:
        def one(rec: SeedLine):
            try:
                return load_record_image(rec, profile, image_size)
            except BadLineError as err:
                return err

        results = list(pool.map(one, records)) if pool is not None else [one(r) for r in records]
        keep, pixels = [], []
        for rec, res in zip(records, results):
            if isinstance(res, BadLineError):
                reject(res)
            else:
                keep.append(rec)
                pixels.append(res)
        if not keep:
            return None
        return PreparedBatch(
            [r.lineno for r in keep], [r.text for r in keep], [r.image_id for r in keep], np.stack(pixels)
        )

    with ExitStack() as stack:
        pool = stack.enter_context(ThreadPoolExecutor(num_workers)) if num_workers > 0 else None
        f = stack.enter_context(open(path, "rb"))
        bar = stack.enter_context(
            tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc="infer", disable=not progress)
        )
        pending: list[SeedLine] = []
        for lineno, raw in enumerate(f, start=1):
            bar.update(len(raw))
            try:
                pending.append(parse_seed_line(raw, lineno))
            except BadLineError as err:
                reject(err)
            if len(pending) == batch_size:
                batch = prepare(pending)
                pending = []
                if batch is not None:
                    yield batch
        if pending:
            batch = prepare(pending)
            if batch is not None:
                yield batch


# --------------------------------------------------------------------------- writing
# format_embedding_lines and sidecar_paths: ernievil2.embeddings_file (the file's one writer and reader)


# --------------------------------------------------------------------------- model
def _init_from(model_cfg: Any) -> Optional[str]:
    value = getattr(model_cfg, "init_from", None) if not isinstance(model_cfg, DictConfig) else model_cfg.get("init_from")
    return os.path.expanduser(str(value)) if value else None


def _explicit_vocab(cfg: InferSchema | DictConfig) -> Optional[str]:
    """``vocab_file``, else ``model.vocab_file`` (``None``: neither is set)."""
    value = cfg.vocab_file or cfg.model.vocab_file
    return os.path.expanduser(str(value)) if value else None


def _check_vocab_found(vocab: Optional[Path], required: bool) -> None:
    """:class:`InferError` asking for a vocab when none was found and one is ``required``."""
    if vocab is None and required:
        raise InferError(
            "no WordPiece vocab: set vocab_file=PATH (the released ERNIE 3.0 vocab is "
            "../shared/assets/ernie-3.0-base-zh/vocab.txt), or point model.init_from at a checkpoint with "
            "vocab.txt beside its weights"
        )


def build_inference_model(cfg: InferSchema | DictConfig, require_vocab: bool = True):
    """``(model, tokenizer)`` in eval mode. With ``model.init_from`` the model and its vocab come
    from :func:`ernievil2.checkpoint.load_model` (any layout: ours, official ``.pdparams``,
    PaddleNLP folder; ``vocab_file`` / ``model.vocab_file`` override the checkpoint's vocab; the
    ``model`` group describes a bare ``.safetensors`` only); otherwise ``cfg.model``'s architecture,
    randomly initialised with ``cfg.seed``, and the vocab ``vocab_file`` / ``model.vocab_file``.
    ``tokenizer`` is ``None`` when no vocab is found and ``require_vocab`` is false."""
    import paddle

    from ernievil2.checkpoint import load_model
    from ernievil2.models import build_model
    from ernievil2.tokenizer import WordPieceTokenizer

    explicit = _explicit_vocab(cfg)
    init_from = _init_from(cfg.model)
    if init_from:
        try:
            loaded = load_model(init_from, explicit,
                                fallback_config=lambda vocab_size: resolve_model(cfg.model, vocab_size))
        except (OSError, ValueError) as exc:
            raise InferError(str(exc)) from exc
        log.info("architecture and weights from %s (model.preset and overrides ignored)", init_from)
        model, vocab = loaded.model, loaded.vocab_file
        _check_vocab_found(vocab, require_vocab)
        tokenizer = WordPieceTokenizer(vocab, max_length=cfg.text_max_length) if vocab else None
    else:
        vocab = Path(explicit) if explicit else None
        if vocab is not None and not vocab.is_file():
            raise InferError(f"vocab file not found: {vocab}")
        _check_vocab_found(vocab, require_vocab)
        tokenizer = WordPieceTokenizer(vocab, max_length=cfg.text_max_length) if vocab else None
        log.warning("model.init_from is not set: random initialisation (seed %d)", cfg.seed)
        paddle.seed(int(cfg.seed))
        np.random.seed(int(cfg.seed))
        model = build_model(resolve_model(cfg.model, tokenizer.vocab_size if tokenizer else None))
        if tokenizer is not None and tokenizer.vocab_size > model.cfg.text.vocab_size:
            raise InferError(f"vocab {vocab} has {tokenizer.vocab_size} ids but the model's word embedding has "
                             f"{model.cfg.text.vocab_size} rows")
    if cfg.text_max_length > model.cfg.text.max_positions:
        raise InferError(
            f"text_max_length {cfg.text_max_length} exceeds the model's max_positions {model.cfg.text.max_positions}"
        )
    model.eval()
    return model, tokenizer


def _embed(model, tokenizer, batch: PreparedBatch, text_max_length: int) -> tuple[np.ndarray, np.ndarray]:
    from ernievil2.encode import embed_pixels, embed_texts

    n = len(batch.texts)
    return (embed_texts(model, tokenizer, batch.texts, text_max_length, batch_size=n),
            embed_pixels(model, batch.pixels, batch_size=n))


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
    and its sidecars (module docstring); every file appears only when the whole input is done."""
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


def infer_main(cfg: DictConfig | InferSchema) -> InferResult:
    """``launch/infer.py``: validate ``cfg``, build the model, run :func:`run_inference`, report."""
    if isinstance(cfg, DictConfig):

        check_keys(cfg)
        cfg = OmegaConf.to_object(cfg)
    if cfg.profile not in PROFILES:
        raise InferError(f"unknown profile {cfg.profile!r}; choose one of {list(PROFILES)}")
    device = resolve_device(cfg.device)
    model, tokenizer = build_inference_model(cfg)
    log.info("device %s, preset %s, image size %d, profile %s", device, cfg.model.preset,
             model.cfg.vision.image_size, cfg.profile)
    result = run_inference(
        model, tokenizer, os.path.expanduser(cfg.test_file), os.path.expanduser(cfg.output_file),
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


# --------------------------------------------------------------------------- export
def _static_text_layer(model):
    import paddle
    import paddle.nn.functional as F

    from ernievil2.models.attention import padding_mask

    class _TextEncoder(paddle.nn.Layer):
        """``ErnieTextEncoder.forward`` (eval mode) + L2 normalisation, without the Python-side
        length check, which cannot be traced with a dynamic sequence length."""

        def __init__(self, text):
            super().__init__()
            self.text = text

        def forward(self, input_ids):
            t = self.text
            positions = paddle.arange(paddle.shape(input_ids)[1], dtype="int64").unsqueeze(0)
            x = t.ln(t.word_emb(input_ids) + t.pos_emb(positions))
            mask = padding_mask(input_ids, t.cfg.pad_id, x.dtype)
            for block in t.blocks:
                x = block(x, mask)
            return F.normalize(paddle.tanh(t.pooler(x[:, 0])), axis=-1)

    return _TextEncoder(model.text)


def _static_image_layer(model):
    import paddle
    import paddle.nn.functional as F

    class _ImageEncoder(paddle.nn.Layer):
        def __init__(self, vision):
            super().__init__()
            self.vision = vision

        def forward(self, pixels):
            return F.normalize(self.vision(pixels), axis=-1)

    return _ImageEncoder(model.vision)


def export_inference(
    model,
    out_dir: str | os.PathLike,
    image_size: int,
    text_max_length: int,
    vocab_file: Optional[str | os.PathLike] = None,
) -> dict[str, Path]:
    """Save both towers as Paddle Inference models (``paddle.jit.save``):

    * ``out_dir/image/inference.*``: input ``pixels`` float32 ``[None, 3, S, S]`` (preprocessed as
      :func:`ernievil2.data.preprocess.preprocess`), output the L2-normalised image embedding;
    * ``out_dir/text/inference.*``: input ``input_ids`` int64 ``[None, None]`` (``[CLS] ... [SEP]``
      right-padded with the pad id, any length up to ``max_positions``), output the L2-normalised
      text embedding;
    * ``out_dir/export.json``: sizes, pad id, embedding width; ``out_dir/vocab.txt`` when given.

    The export is staged in a temporary folder and renamed onto ``out_dir``.
    """
    import paddle
    from paddle.static import InputSpec

    cfg = model.cfg
    if image_size != cfg.vision.image_size:
        raise InferError(f"image_size {image_size} differs from the model's vision.image_size {cfg.vision.image_size}")
    if not 2 <= text_max_length <= cfg.text.max_positions:
        raise InferError(f"text_max_length must be in [2, {cfg.text.max_positions}], got {text_max_length}")
    out = Path(out_dir)
    was_training = model.training
    model.eval()
    try:
        with atomic_dir(out) as tmp:
            paddle.jit.save(
                _static_image_layer(model), str(tmp / "image" / "inference"),
                input_spec=[InputSpec([None, 3, image_size, image_size], "float32", "pixels")],
            )
            paddle.jit.save(
                _static_text_layer(model), str(tmp / "text" / "inference"),
                input_spec=[InputSpec([None, None], "int64", "input_ids")],
            )
            meta = {
                "image": {"input": "pixels", "shape": [None, 3, image_size, image_size], "dtype": "float32"},
                "text": {"input": "input_ids", "shape": [None, None], "dtype": "int64",
                         "max_length": text_max_length, "max_positions": cfg.text.max_positions,
                         "pad_id": cfg.text.pad_id},
                "embedding_dim": cfg.vision.width,
                "normalized": True,
                "image_mean": [0.485, 0.456, 0.406],
                "image_std": [0.229, 0.224, 0.225],
            }
            if vocab_file:
                shutil.copyfile(vocab_file, tmp / "vocab.txt")
                meta["vocab"] = "vocab.txt"
            (tmp / "export.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    finally:
        model.train(was_training)
    files = {"dir": out, "meta": out / "export.json"}
    for tower in ("image", "text"):
        for f in sorted((out / tower).glob("inference.*")):
            files[f"{tower}{f.suffix}"] = f
    if vocab_file:
        files["vocab"] = out / "vocab.txt"
    return files
