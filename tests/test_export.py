"""Deployment export (paddle.jit.save of both towers): the exported models give the dynamic model's embeddings."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import paddle
import pytest
from models import tiny_model

from ernievil2.inference import InferError, export_inference

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = tiny_model()
    vocab = tmp_path_factory.mktemp("v") / "vocab.txt"
    vocab.write_text("[PAD]\n[CLS]\n[SEP]\n[MASK]\n[UNK]\n")
    out = tmp_path_factory.mktemp("export") / "tiny"
    files = export_inference(model, out, image_size=64, text_max_length=48, vocab_file=vocab)
    return model, out, files


def inputs():
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((3, 3, 64, 64)).astype(np.float32)
    ids = np.zeros((4, 12), dtype=np.int64)  # [CLS] pieces [SEP], right-padded with 0
    for row, length in enumerate((12, 7, 3, 2)):
        ids[row, 0] = 1
        ids[row, 1 : length - 1] = rng.integers(5, 8000, length - 2)
        ids[row, length - 1] = 2
    return pixels, ids


def test_files_and_metadata(exported):
    model, out, files = exported
    for tower in ("image", "text"):
        assert any(p.name.startswith("inference.") for p in (out / tower).iterdir())
    meta = json.loads((out / "export.json").read_text())
    assert meta["image"]["shape"] == [None, 3, 64, 64] and meta["text"]["shape"] == [None, None]
    assert meta["text"]["pad_id"] == 0 and meta["embedding_dim"] == 64 and meta["normalized"] is True
    assert (out / "vocab.txt").is_file() and files["vocab"] == out / "vocab.txt"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # staging folder gone


def test_jit_load_matches_dynamic_model(exported):
    model, out, _ = exported
    pixels, ids = inputs()
    image_model = paddle.jit.load(str(out / "image" / "inference"))
    text_model = paddle.jit.load(str(out / "text" / "inference"))
    with paddle.no_grad():
        ref_img = model.encode_image(paddle.to_tensor(pixels)).numpy()
        ref_txt = model.encode_text(paddle.to_tensor(ids)).numpy()
        got_img = image_model(paddle.to_tensor(pixels)).numpy()
        got_txt = text_model(paddle.to_tensor(ids)).numpy()
        # dynamic shapes: another batch size and a shorter (trimmed) padding give the same rows
        got_txt_short = text_model(paddle.to_tensor(ids[1:, :7])).numpy()
        got_img_one = image_model(paddle.to_tensor(pixels[:1])).numpy()
    np.testing.assert_allclose(got_img, ref_img, atol=1e-5)
    np.testing.assert_allclose(got_txt, ref_txt, atol=1e-5)
    np.testing.assert_allclose(got_txt_short, ref_txt[1:], atol=1e-5)
    np.testing.assert_allclose(got_img_one, ref_img[:1], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got_txt, axis=1), 1.0, atol=1e-5)


def _predictor(prefix: Path):
    from paddle import inference

    model_file = next(p for p in (prefix.with_suffix(".json"), prefix.with_suffix(".pdmodel")) if p.exists())
    config = inference.Config(str(model_file), str(prefix.with_suffix(".pdiparams")))
    config.disable_gpu()
    config.disable_glog_info()
    return inference.create_predictor(config)


def _run(predictor, array: np.ndarray) -> np.ndarray:
    handle = predictor.get_input_handle(predictor.get_input_names()[0])
    handle.reshape(list(array.shape))
    handle.copy_from_cpu(np.ascontiguousarray(array))
    predictor.run()
    return predictor.get_output_handle(predictor.get_output_names()[0]).copy_to_cpu()


def test_paddle_inference_predictor_matches(exported):
    model, out, _ = exported
    pixels, ids = inputs()
    with paddle.no_grad():
        ref_img = model.encode_image(paddle.to_tensor(pixels)).numpy()
        ref_txt = model.encode_text(paddle.to_tensor(ids)).numpy()
    np.testing.assert_allclose(_run(_predictor(out / "image" / "inference"), pixels), ref_img, atol=1e-5)
    text = _predictor(out / "text" / "inference")
    np.testing.assert_allclose(_run(text, ids), ref_txt, atol=1e-5)
    with paddle.no_grad():
        ref_cut = model.encode_text(paddle.to_tensor(ids[:2, :5])).numpy()
    np.testing.assert_allclose(_run(text, ids[:2, :5]), ref_cut, atol=1e-5)  # another batch and length


def test_export_checks_sizes(exported, tmp_path):
    model, _, _ = exported
    with pytest.raises(InferError, match="image_size"):
        export_inference(model, tmp_path / "x", image_size=224, text_max_length=48)
    with pytest.raises(InferError, match="text_max_length"):
        export_inference(model, tmp_path / "x", image_size=64, text_max_length=65)
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_export_cli(tmp_path):
    out = tmp_path / "exported"
    proc = subprocess.run(
        [sys.executable, "launch/export.py", str(out), "model=tiny", "seed=1", "text_max_length=32"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "export.json").is_file() and json.loads((out / "export.json").read_text())["text"]["max_length"] == 32
    assert not (out / "vocab.txt").exists()  # no vocab configured: none copied
