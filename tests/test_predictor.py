"""The CPU predictors of the encode path (ernievil2.inference.predictor): the same embeddings as
dygraph, one export per set of weights (cached, atomic, pruned), clear errors."""
from __future__ import annotations

import numpy as np
import paddle
import pytest
from models import tiny_model

from ernievil2.encode import embed_pixels, embed_token_ids
from ernievil2.inference import InferError
from ernievil2.inference import predictor as pred


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def inputs(model):
    rng = np.random.default_rng(0)
    size = model.cfg.vision.image_size
    pixels = rng.standard_normal((5, 3, size, size)).astype(np.float32)
    ids = rng.integers(5, 100, (6, 21)).astype(np.int64)
    ids[:, 0] = 1
    for row, length in enumerate([21, 3, 11, 7, 17, 2]):  # padding of every length, none in row 0
        ids[row, length:] = model.cfg.text.pad_id
    return pixels, ids


def test_predictor_gives_dygraph_embeddings(model, tmp_path):
    towers = pred.compile_towers(model, threads=2, cache_dir=tmp_path)
    pixels, ids = inputs(model)
    for batch_size in (1, 2, 6):
        np.testing.assert_allclose(embed_pixels(towers, pixels, batch_size), embed_pixels(model, pixels, batch_size),
                                   atol=1e-4)
        np.testing.assert_allclose(embed_token_ids(towers, ids, batch_size), embed_token_ids(model, ids, batch_size),
                                   atol=1e-4)
    got = embed_token_ids(towers, ids)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert embed_pixels(towers, pixels[:0]).shape == (0, model.cfg.text.width)


def test_one_export_per_set_of_weights(model, tmp_path, monkeypatch):
    first = pred.compile_towers(model, cache_dir=tmp_path)
    stamp = (first.folder / "export.json").stat().st_mtime_ns
    from ernievil2.inference import export

    def no_export(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(export, "export_inference", no_export)
    again = pred.compile_towers(model, cache_dir=tmp_path)  # same weights: the cached export
    assert again.folder == first.folder and (again.folder / "export.json").stat().st_mtime_ns == stamp
    monkeypatch.undo()
    other = pred.compile_towers(tiny_model(seed=1), cache_dir=tmp_path)
    assert other.folder != first.folder and other.fingerprint != first.fingerprint
    pixels, _ = inputs(model)
    assert not np.allclose(embed_pixels(other, pixels), embed_pixels(first, pixels), atol=1e-3)


def test_old_exports_are_pruned(tmp_path, monkeypatch):
    monkeypatch.setattr(pred, "KEEP_EXPORTS", 2)
    folders = [pred.compile_towers(tiny_model(seed), cache_dir=tmp_path).folder for seed in range(3)]
    assert sorted(p for p in tmp_path.iterdir() if p.is_dir()) == sorted(folders[1:])


def test_a_failed_export_leaves_nothing(model, tmp_path, monkeypatch):
    real_save = paddle.jit.save

    def save_image_only(layer, path, **kwargs):
        if path.endswith("text/inference"):
            raise RuntimeError("killed while saving the text tower")
        real_save(layer, path, **kwargs)

    monkeypatch.setattr(paddle.jit, "save", save_image_only)
    with pytest.raises(RuntimeError, match="killed"):
        pred.compile_towers(model, cache_dir=tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]  # nor a half-written temporary folder
    monkeypatch.undo()
    towers = pred.compile_towers(model, cache_dir=tmp_path)  # the next run exports whole
    assert (towers.folder / "text" / "inference.pdiparams").is_file()


def test_backend_choice_and_errors(model, tmp_path, monkeypatch):
    monkeypatch.setenv("ERNIEVIL2_PREDICTOR_CACHE", str(tmp_path))
    assert pred.encoder_for(model, "dygraph") is model
    assert isinstance(pred.encoder_for(model, "auto"), pred.CompiledTowers)  # Paddle runs on CPU here
    assert pred.predictor_cache_dir() == tmp_path
    with pytest.raises(InferError, match="unknown encode backend 'onnx'.*auto"):
        pred.encoder_for(model, "onnx")
    with pytest.raises(InferError, match="unknown precision 'int4'"):
        pred.encoder_for(model, "predictor", "int4")
    with pytest.raises(InferError, match="bf16 needs the predictor"):
        pred.encoder_for(model, "dygraph", "bf16")
    monkeypatch.setattr(pred, "bf16_supported", lambda: False)
    with pytest.raises(InferError, match="AVX512-BF16"):
        pred.encoder_for(model, "predictor", "bf16")


@pytest.mark.skipif(not pred.bf16_supported(), reason="this CPU has no fast bfloat16 (AVX512-BF16 / AMX)")
def test_bf16_stays_close(model, tmp_path):
    towers = pred.compile_towers(model, "bf16", cache_dir=tmp_path)
    pixels, ids = inputs(model)
    for got, want in ((embed_pixels(towers, pixels), embed_pixels(model, pixels)),
                      (embed_token_ids(towers, ids), embed_token_ids(model, ids))):
        assert np.abs(got - want).max() < 2e-2
        assert np.all(np.sum(got * want, axis=1) > 0.999)  # cosine with the float32 embedding


def test_export_folds_quick_gelu_and_drops_dropout(model, tmp_path):
    """The exported image tower has SiLU between rescaled layers (no sigmoid), the text tower no
    dropout op; the model itself is left as it was."""
    from ernievil2.models.vision import QuickGELU

    towers = pred.compile_towers(model, cache_dir=tmp_path)
    image_program = (towers.folder / "image" / "inference.json").read_text()
    text_program = (towers.folder / "text" / "inference.json").read_text()
    assert "swish" in image_program and "sigmoid" not in image_program
    assert "dropout" not in text_program
    assert all(isinstance(block.act, QuickGELU) for block in model.vision.blocks)
    assert all(isinstance(block.dropout, paddle.nn.Dropout) for block in model.text.blocks)


WORKER = """
import sys
sys.path.insert(0, sys.argv[2])
from models import tiny_model
from ernievil2.inference.predictor import compile_towers
towers = compile_towers(tiny_model(), cache_dir=sys.argv[1])
print(towers.folder, towers.encode_image(__import__("numpy").zeros((1, 3, 64, 64), "float32"))[0, :3])
"""


def test_processes_share_one_export(tmp_path):
    """Two processes (as the ranks of one launch) compiling the same weights at once: one export,
    both get working predictors from it, nothing half-written is left."""
    import subprocess
    import sys
    from pathlib import Path

    tests = str(Path(__file__).parent)
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path), tests], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    lines = [out.strip().splitlines()[-1] for out, _ in outs]
    assert lines[0] == lines[1]  # the same folder and the same embedding
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == [Path(lines[0].split()[0]).name]
