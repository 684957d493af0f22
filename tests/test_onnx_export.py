"""ONNX export (``launch/export.py --format onnx``, ernievil2.inference.onnx_export): ONNX Runtime
gives the Paddle model's embeddings; a missing extra, an unknown format or a failed conversion is
one clear error. The tests that convert or run need the ``onnx`` extra and skip without it."""
from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from models import tiny_model

from ernievil2.encode import embed_pixels, embed_token_ids
from ernievil2.inference import InferError
from ernievil2.weights.save import save_checkpoint

REPO = Path(__file__).resolve().parents[1]
NEEDS_ONNX = "needs the onnx extra: pip install -e '.[onnx]'"


def export_main():
    """``launch/export.py``'s ``main`` (the launch folder is no package)."""
    spec = importlib.util.spec_from_file_location("export_cli", REPO / "launch" / "export.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def token_ids(rng: np.random.Generator, lengths: tuple[int, ...], width: int) -> np.ndarray:
    """``[CLS] pieces [SEP]`` rows of the given lengths, right-padded with 0 to ``width``."""
    ids = np.zeros((len(lengths), width), dtype=np.int64)
    for row, length in enumerate(lengths):
        ids[row, 0], ids[row, length - 1] = 1, 2
        ids[row, 1: length - 1] = rng.integers(5, 300, length - 2)
    return ids


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny model saved as a checkpoint with a vocab beside its weights."""
    model = tiny_model(seed=3)
    vocab = tmp_path_factory.mktemp("v") / "vocab.txt"
    vocab.write_text("".join(f"{w}\n" for w in ["[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]", *map(str, range(400))]))
    return model, save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "step_0000002", {"vocab.txt": vocab})


@pytest.fixture(scope="module")
def onnx_export(checkpoint, tmp_path_factory):
    pytest.importorskip("paddle2onnx", reason=NEEDS_ONNX)
    pytest.importorskip("onnxruntime", reason=NEEDS_ONNX)
    model, ckpt = checkpoint
    out = tmp_path_factory.mktemp("export") / "onnx"
    assert export_main()([str(out), "--format", "onnx", f"model.init_from={ckpt}", "text_max_length=32"]) == 0
    return model, out


def test_onnx_files_and_metadata(onnx_export):
    import onnx

    _, out = onnx_export
    meta = json.loads((out / "export.json").read_text())
    assert meta["format"] == "onnx" and meta["text"]["max_length"] == 32 and (out / "vocab.txt").is_file()
    assert meta["onnx"]["image"] == "image/model.onnx" and meta["onnx"]["text"] == "text/model.onnx"
    assert meta["onnx"]["opset"] >= 17 and meta["onnx"]["paddle2onnx"] == "2.1.0"
    for tower in ("image", "text"):  # the Paddle Inference models stay beside the ONNX ones
        assert (out / tower / "inference.json").is_file() and (out / tower / "inference.pdiparams").is_file()
    image, text = (onnx.load(str(out / meta["onnx"][t])).graph for t in ("image", "text"))
    dims = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in (image.input[0], image.output[0], text.input[0], text.output[0])]
    assert dims == [["batch", 3, 64, 64], ["batch", 64], ["batch", "length"], ["batch", 64]]
    assert [image.input[0].name, text.input[0].name, text.output[0].name] == ["pixels", "input_ids", "embedding"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # staging folders gone


def test_onnxruntime_matches_paddle_model(onnx_export):
    from ernievil2.inference.onnx_export import OnnxTowers

    model, out = onnx_export
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((3, 3, 64, 64)).astype(np.float32)
    ids = token_ids(rng, (12, 5, 5), width=16)  # two lengths, padded (beyond the longest, too)
    towers = OnnxTowers(out, intra_op_num_threads=2)
    assert (towers.image_size, towers.embedding_dim, towers.pad_id) == (64, 64, 0)
    ref_img, ref_txt = embed_pixels(model, pixels), embed_token_ids(model, ids)
    got_img, got_txt = embed_pixels(towers, pixels), embed_token_ids(towers, ids)
    assert got_img.dtype == got_txt.dtype == np.float32 and got_img.shape == got_txt.shape == (3, 64)
    np.testing.assert_allclose(got_img, ref_img, atol=1e-4)
    np.testing.assert_allclose(got_txt, ref_txt, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(got_txt, axis=1), 1.0, atol=1e-5)
    # other batch sizes and lengths: batches of 2 + 1, the last trimmed to 5; untrimmed padding
    np.testing.assert_allclose(embed_token_ids(towers, ids, batch_size=2), ref_txt, atol=1e-4)
    np.testing.assert_allclose(embed_pixels(towers, pixels, batch_size=2), ref_img, atol=1e-4)
    np.testing.assert_allclose(towers.encode_text(ids), ref_txt, atol=1e-4)  # one batch, padding kept
    np.testing.assert_allclose(towers.encode_image(pixels[1:]), ref_img[1:], atol=1e-4)
    assert (towers.cfg.text.width, towers.cfg.text.max_positions) == (64, model.cfg.text.max_positions)
    assert embed_token_ids(towers, ids[:0]).shape == (0, 64)
    with pytest.raises(InferError, match="pixels must be"):
        embed_pixels(towers, pixels[:, :, :32])
    with pytest.raises(InferError, match="at most 64"):
        towers.encode_text(np.ones((1, 65), dtype=np.int64))


def test_convert_export_dir_and_its_errors(onnx_export, tmp_path):
    from ernievil2.inference.onnx_export import OnnxTowers, convert_export_dir

    _, out = onnx_export
    src = tmp_path / "paddle_only"
    shutil.copytree(out, src, ignore=shutil.ignore_patterns("model.onnx"))
    meta = json.loads((src / "export.json").read_text())
    for key in ("format", "onnx", "paddle_inference"):
        meta.pop(key)
    (src / "export.json").write_text(json.dumps(meta))
    with pytest.raises(InferError, match="holds no ONNX models"):
        OnnxTowers(src)
    files = convert_export_dir(src, tmp_path / "converted")
    assert files["image.onnx"].is_file() and files["text.onnx"].is_file()
    assert json.loads(files["meta"].read_text())["format"] == "onnx"
    (src / "text" / "inference.json").write_text('{"not": "a program"}')
    with pytest.raises(InferError, match="paddle2onnx could not convert"):  # paddle2onnx itself calls sys.exit
        convert_export_dir(src, tmp_path / "broken")
    assert not (tmp_path / "broken").exists() and not (src / "image" / "model.onnx").exists()


def test_unknown_format_is_an_argparse_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        export_main()([str(tmp_path / "x"), "--format", "tflite", "model=tiny"])
    assert exc.value.code == 2 and "invalid choice: 'tflite'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        export_main()([str(tmp_path / "x"), "--opset", "18", "model=tiny"])
    assert "--opset applies to --format onnx only" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_missing_extra_is_one_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "paddle2onnx", None)  # import paddle2onnx raises ImportError
    out = tmp_path / "x"
    assert export_main()([str(out), "--format", "onnx", "model=tiny"]) == 2
    err = capsys.readouterr().err
    assert "export.py: error: ONNX export needs paddle2onnx" in err and '.[onnx]' in err, err
    assert not out.exists()
