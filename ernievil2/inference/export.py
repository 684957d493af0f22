"""Deployment export: both towers as Paddle Inference models (``paddle.jit.save``), the library
side of ``launch/export.py``."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator, Optional

from ernievil2.atomic import atomic_dir
from ernievil2.inference.errors import InferError

__all__ = ["export_inference"]


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


QUICK_GELU_BETA = 1.702


def _fold_quick_gelu(vision):
    """A copy of the image tower whose QuickGELU, x·σ(1.702x), is SiLU between rescaled layers:
    fc2(x·σ(βx)) = fc2'(silu(fc1'(·))) with fc1' = β·fc1 and fc2' = fc2 with its weight divided
    by β. The same function, but oneDNN fuses SiLU into the first layer, where QuickGELU costs
    three passes over the widest activation (about a sixth of the base tower's time on CPU)."""
    import copy

    import paddle

    from ernievil2.models.vision import QuickGELU

    if not any(isinstance(block.act, QuickGELU) for block in vision.blocks):
        return vision
    folded = copy.deepcopy(vision)
    with paddle.no_grad():
        for block in folded.blocks:
            if isinstance(block.act, QuickGELU):
                block.fc1.weight.set_value(block.fc1.weight * QUICK_GELU_BETA)
                block.fc1.bias.set_value(block.fc1.bias * QUICK_GELU_BETA)
                block.fc2.weight.set_value(block.fc2.weight / QUICK_GELU_BETA)
                block.act = paddle.nn.Swish()
    folded.eval()
    return folded


@contextlib.contextmanager
def _without_dropout(tower) -> Iterator[None]:
    """``tower``'s dropout layers replaced by identities inside the block: in eval mode they pass
    their input through, but a traced dropout still runs as an op (a twelfth of the base text
    tower's time under Paddle Inference on CPU)."""
    import paddle

    found = [(layer, name, child) for layer in tower.sublayers(include_self=True)
             for name, child in layer.named_children() if isinstance(child, paddle.nn.Dropout)]
    for layer, name, _ in found:
        setattr(layer, name, paddle.nn.Identity())
    try:
        yield
    finally:
        for layer, name, child in found:
            setattr(layer, name, child)


def _static_image_layer(model):
    import paddle
    import paddle.nn.functional as F

    class _ImageEncoder(paddle.nn.Layer):
        def __init__(self, vision):
            super().__init__()
            self.vision = vision

        def forward(self, pixels):
            return F.normalize(self.vision(pixels), axis=-1)

    return _ImageEncoder(_fold_quick_gelu(model.vision))


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
            with _without_dropout(model.text):
                paddle.jit.save(
                    _static_text_layer(model), str(tmp / "text" / "inference"),
                    input_spec=[InputSpec([None, None], "int64", "input_ids")],
                )
            meta = {
                "format": "paddle",
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
