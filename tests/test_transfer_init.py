"""Per-tower initialisation, ``model.vision.init_from`` / ``model.text.init_from``
(ernievil2.weights.towers): one tower from a checkpoint of ours, the official release, PaddleNLP
(ErnieViL, ErnieModel) or timm, the other left as it was; strict errors; the training run.

Every source checkpoint is built here: PaddleNLP's own ``ErnieModel`` where ``paddlenlp`` is
installed (forward parity), hand-written layouts (key names written out in this file, independently
of the library's maps) elsewhere; timm and torch are not needed (timm's layout is written by hand,
and by the library's exporter for the round trip)."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import paddle
import pytest
from safetensors.numpy import load_file, save_file

from ernievil2.inference.errors import InferError
from ernievil2.models import build_model, model_config
from ernievil2.models.attention import padding_mask
from ernievil2.models.config import DualEncoderConfig, TextConfig, VisionConfig
from ernievil2.models.schema import ModelSchema, TextOverrides, VisionOverrides, resolve_model
from ernievil2.weights.layouts import PADDLENLP_TEXT_LN_EPS, WEIGHTS
from ernievil2.weights.load import CheckpointMismatchError
from ernievil2.weights.save import export_paddlenlp, save_checkpoint, state_to_numpy
from ernievil2.weights.tower_layouts import ours_to_timm
from ernievil2.weights.towers import init_model, load_tower

REPO_ROOT = Path(__file__).resolve().parents[1]
NEEDS_PADDLENLP = "needs paddlenlp (the paddlenlp extra: pip install -e '.[paddlenlp]')"
SMALL = DualEncoderConfig(
    vision=VisionConfig(image_size=32, patch_size=16, width=32, layers=2, heads=2, mlp_dim=64),
    text=TextConfig(vocab_size=100, width=32, layers=2, heads=2, ffn_dim=64, max_positions=16),
)


def _model(seed: int, cfg: DualEncoderConfig = SMALL):
    paddle.seed(seed)
    model = build_model(cfg)
    model.eval()
    return model


def _part(state: dict, prefix: str) -> dict:
    return {k: v for k, v in state.items() if k.startswith(prefix)}


def _assert_same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert np.array_equal(a[k], b[k]), k


def _pdparams(path: Path, state: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:  # as old Paddle wrote them: a protocol-2 pickle of a dict of arrays
        pickle.dump(state, f, protocol=2)
    return path


# ----------------------------------------------------------------------------- hand-written layouts

def _official(state: dict) -> dict:
    """Our state in the official release's names and shapes, plus its unused classification head."""
    out = {"visual.classfy.weight": np.zeros((32, 3), np.float32), "visual.classfy.bias": np.zeros(3, np.float32)}
    for k, v in state.items():
        p = k.split(".")
        if k == "temperature":
            out["contrastive_loss_mm.temperature_b"] = v
        elif p[0] == "vision":
            rest = {"class_embedding": ["class_embedding"], "positional_embedding": ["positional_embedding"],
                    "patch_embed": ["patch_embed", "proj"], "ln_pre": ["norm_pre"], "ln_post": ["norm_post"]}
            if p[1] == "blocks":
                name = ["blocks", p[2]] + (["mlp"] if p[3] in ("fc1", "fc2") else []) + p[3:]
            else:
                name = rest[p[1]] + p[2:]
            v = v.reshape(1, 1, -1) if p[1] == "class_embedding" else v[None] if p[1] == "positional_embedding" else v
            out[".".join(["visual"] + name)] = v
        elif p[1] == "blocks":
            inner = {"ffn_i": ["ffn", "i"], "ffn_o": ["ffn", "o"]}.get(p[3], [p[3]])
            out[".".join(["text_model", "encoder_stack", "block", p[2]] + inner + p[4:])] = v
        else:
            out["text_model." + ".".join(p[1:])] = v
    return out


_ERNIE_BLOCK = {"attn.q": "self_attn.q_proj", "attn.k": "self_attn.k_proj", "attn.v": "self_attn.v_proj",
                "attn.o": "self_attn.out_proj", "ln1": "norm1", "ln2": "norm2", "ffn_i": "linear1", "ffn_o": "linear2"}
_ERNIE_TOP = {"word_emb.weight": "embeddings.word_embeddings.weight",
              "pos_emb.weight": "embeddings.position_embeddings.weight",
              "ln.weight": "embeddings.layer_norm.weight", "ln.bias": "embeddings.layer_norm.bias",
              "pooler.weight": "pooler.dense.weight", "pooler.bias": "pooler.dense.bias"}


def _ernie_model_state(text_state: dict) -> dict:
    """Our text tower in PaddleNLP ErnieModel's names (no token/task types)."""
    out = {}
    for k, v in text_state.items():
        p = k.split(".")[1:]
        if p[0] == "blocks":
            sub, kind = ".".join(p[2:-1]), p[-1]
            out[f"encoder.layers.{p[1]}.{_ERNIE_BLOCK[sub]}.{kind}"] = v
        else:
            out[_ERNIE_TOP[".".join(p)]] = v
    return out


def _ernie_folder(folder: Path, state: dict, **config) -> Path:
    conf = {"architectures": ["ErnieModel"], "model_type": "ernie", "hidden_act": "gelu", "num_attention_heads": 2,
            "pad_token_id": 0, **config}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(conf), encoding="utf-8")
    _pdparams(folder / "model_state.pdparams", state)
    return folder


def _timm_clip_state(rng: np.random.Generator, width=32, layers=2, mlp=64, patch=16, tokens=5) -> dict:
    """A timm CLIP ViT (pre_norm=True) state by hand: PyTorch shapes, a 512-wide projection head."""
    def r(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    state = {"cls_token": r(1, 1, width), "pos_embed": r(1, tokens, width), "patch_embed.proj.weight": r(width, 3, patch, patch),
             "norm_pre.weight": r(width), "norm_pre.bias": r(width), "norm.weight": r(width), "norm.bias": r(width),
             "head.weight": r(512, width)}
    for i in range(layers):
        b = f"blocks.{i}."
        state.update({b + "norm1.weight": r(width), b + "norm1.bias": r(width), b + "norm2.weight": r(width),
                      b + "norm2.bias": r(width), b + "attn.qkv.weight": r(3 * width, width),
                      b + "attn.qkv.bias": r(3 * width), b + "attn.proj.weight": r(width, width),
                      b + "attn.proj.bias": r(width), b + "mlp.fc1.weight": r(mlp, width), b + "mlp.fc1.bias": r(mlp),
                      b + "mlp.fc2.weight": r(width, mlp), b + "mlp.fc2.bias": r(width)})
    return state


# ----------------------------------------------------------------------------- text tower: PaddleNLP ErnieModel

def _our_hidden_states(model, ids: paddle.Tensor) -> paddle.Tensor:
    """Our text tower's last hidden states (its forward returns only the pooled first token)."""
    t = model.text
    x = t.ln(t.word_emb(ids) + t.pos_emb(paddle.arange(ids.shape[1], dtype="int64").unsqueeze(0)))
    mask = padding_mask(ids, t.cfg.pad_id, x.dtype)
    for block in t.blocks:
        x = block(x, mask)
    return x


@pytest.mark.parametrize("task_id", [0, 2])
def test_text_tower_from_paddlenlp_ernie_model_matches_its_forward(tmp_path, task_id):
    """A random ERNIE-3.0-shaped ErnieModel (token and task types) saved by PaddleNLP: our text tower
    loaded from its folder gives its pooled output and last hidden states on the same ids."""
    transformers = pytest.importorskip("paddlenlp.transformers", reason=NEEDS_PADDLENLP)
    paddle.seed(11)
    config = transformers.ErnieConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=16, type_vocab_size=4,
                                      use_task_id=True, task_type_vocab_size=3, task_id=task_id)
    ref = transformers.ErnieModel(config)
    ref.eval()
    ref.save_pretrained(str(tmp_path / "ernie"))

    cfg = replace(SMALL, text=replace(SMALL.text, ln_eps=PADDLENLP_TEXT_LN_EPS))  # what ErnieModel runs with
    model = _model(3, cfg)
    before = state_to_numpy(model)
    report = load_tower(model, "text", tmp_path / "ernie")
    assert report.source.layout == "paddlenlp-ernie" and report.fresh == [] and report.ignored == []
    assert report.loaded == len(_part(before, "text."))
    after = state_to_numpy(model)
    _assert_same(_part(after, "vision."), _part(before, "vision."))  # the image tower keeps its init
    assert np.array_equal(after["temperature"], before["temperature"])

    ids = np.random.default_rng(0).integers(1, 100, (5, 12))
    ids[1:, 7:] = 0  # padding
    with paddle.no_grad():
        seq, pooled = ref(paddle.to_tensor(ids))
        ours_pooled = model.encode_text(paddle.to_tensor(ids), normalize=False).numpy()
        ours_seq = _our_hidden_states(model, paddle.to_tensor(ids)).numpy()
    # At the padded positions the two differ by design: PaddleNLP embeds id 0 (padding_idx) as zeros,
    # ours as its row; padding is masked out of attention, so no other position sees it.
    real = ids != 0
    d_pooled = float(np.abs(ours_pooled - pooled.numpy()).max())
    d_seq = float(np.abs(ours_seq[real] - seq.numpy()[real]).max())
    print(f"\nErnieModel parity, max |Δ|: pooled {d_pooled:.3g}, hidden states {d_seq:.3g}")
    assert d_pooled <= 1e-5 and d_seq <= 1e-5, (d_pooled, d_seq)
    assert np.abs(ours_pooled[0] - ours_pooled[1]).max() > 1e-3  # not degenerate


def test_text_tower_from_an_ernie_task_model_without_pooler(tmp_path, caplog):
    """``ernie.``-prefixed keys (a task model): its head is skipped, the pooler it lacks starts fresh."""
    src = _model(1)
    state = {"ernie." + k: v for k, v in _ernie_model_state(_part(state_to_numpy(src), "text.")).items()
             if not k.startswith("pooler.")}
    state["classifier.weight"], state["classifier.bias"] = np.zeros((32, 2), np.float32), np.zeros(2, np.float32)
    folder = _ernie_folder(tmp_path / "cls", state)
    model = _model(2)
    before = state_to_numpy(model)
    with caplog.at_level("INFO", logger="ernievil2.weights.towers"):
        report = load_tower(model, "text", folder)
    assert report.ignored == ["classifier.bias", "classifier.weight"]
    assert report.fresh == ["text.pooler.bias", "text.pooler.weight"]
    assert "text.pooler.bias, text.pooler.weight: they start fresh" in caplog.text
    after = state_to_numpy(model)
    want = {**_part(state_to_numpy(src), "text."), **_part(before, "text.pooler.")}
    _assert_same(_part(after, "text."), want)


def test_ernie_model_architecture_checks(tmp_path):
    state = _ernie_model_state(_part(state_to_numpy(_model(1)), "text."))
    with pytest.raises(ValueError, match=r"config\.json.*4 attention heads, the model 2 \(model\.text\.heads\)"):
        load_tower(_model(2), "text", _ernie_folder(tmp_path / "heads", state, num_attention_heads=4))
    with pytest.raises(ValueError, match="hidden_act='relu': our text tower runs GELU"):
        load_tower(_model(2), "text", _ernie_folder(tmp_path / "relu", state, hidden_act="relu"))
    with pytest.raises(CheckpointMismatchError, match="holds the text tower only, no image tower"):
        load_tower(_model(2), "vision", _ernie_folder(tmp_path / "ok", state))


# ----------------------------------------------------------------------------- image tower: timm

def test_image_tower_timm_round_trip(tmp_path):
    """Our tower → timm's layout → loaded back: bit-identical parameters and embeddings."""
    src = _model(1)
    timm = ours_to_timm(state_to_numpy(src))
    assert timm["cls_token"].shape == (1, 1, 32) and timm["pos_embed"].shape == (1, 5, 32)
    assert timm["blocks.0.attn.qkv.weight"].shape == (96, 32) and timm["blocks.1.mlp.fc1.weight"].shape == (64, 32)
    assert timm["patch_embed.proj.weight"].shape == (32, 3, 16, 16) and "patch_embed.proj.bias" not in timm
    assert {"norm_pre.weight", "norm.bias"} <= set(timm) and not any(k.startswith("head") for k in timm)
    save_file(timm, str(tmp_path / "vit.safetensors"))

    model = _model(2)
    before = state_to_numpy(model)
    report = load_tower(model, "vision", tmp_path / "vit.safetensors")
    assert report.source.layout == "timm" and report.loaded == len(_part(before, "vision."))
    after = state_to_numpy(model)
    _assert_same(_part(after, "vision."), _part(state_to_numpy(src), "vision."))
    _assert_same(_part(after, "text."), _part(before, "text."))
    pixels = paddle.to_tensor(np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32))
    with paddle.no_grad():
        assert np.array_equal(model.encode_image(pixels).numpy(), src.encode_image(pixels).numpy())


def test_hand_built_timm_clip_state_loads(tmp_path):
    """timm's key names and PyTorch shapes, written by hand: loads, Linear weights transposed."""
    state = _timm_clip_state(np.random.default_rng(5))
    folder = tmp_path / "vit_clip"  # a Hugging Face hub folder: config.json + model.safetensors
    folder.mkdir()
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"architecture": "vit_base_patch16_clip_quickgelu_224"}))
    model = _model(2)
    report = load_tower(model, "vision", folder)
    assert report.ignored == ["head.weight"]
    v = {k[len("vision."):]: t for k, t in state_to_numpy(model).items() if k.startswith("vision.")}
    assert np.array_equal(v["class_embedding"], state["cls_token"][0, 0])
    assert np.array_equal(v["positional_embedding"], state["pos_embed"][0])
    assert np.array_equal(v["patch_embed.weight"], state["patch_embed.proj.weight"])
    assert np.array_equal(v["ln_pre.weight"], state["norm_pre.weight"])
    assert np.array_equal(v["ln_post.bias"], state["norm.bias"])
    assert np.array_equal(v["blocks.1.attn.qkv.weight"], state["blocks.1.attn.qkv.weight"].T)
    assert np.array_equal(v["blocks.1.attn.qkv.bias"], state["blocks.1.attn.qkv.bias"])
    assert np.array_equal(v["blocks.0.attn.proj.weight"], state["blocks.0.attn.proj.weight"].T)
    assert np.array_equal(v["blocks.0.fc1.weight"], state["blocks.0.mlp.fc1.weight"].T)
    assert np.array_equal(v["blocks.0.fc2.weight"], state["blocks.0.mlp.fc2.weight"].T)
    assert np.array_equal(v["blocks.0.norm2.bias"], state["blocks.0.norm2.bias"])


def test_timm_imagenet_vit_fails_clearly(tmp_path):
    """A timm ImageNet ViT (patch-conv bias, no norm_pre, average pooled) has no counterpart: one
    error naming the file, every difference, and why."""
    state = _timm_clip_state(np.random.default_rng(5))
    del state["norm_pre.weight"], state["norm_pre.bias"]
    state["patch_embed.proj.bias"] = np.zeros(32, np.float32)
    state["fc_norm.weight"], state["fc_norm.bias"] = state.pop("norm.weight"), state.pop("norm.bias")
    path = tmp_path / "vit_in1k.safetensors"
    save_file(state, str(path))
    model = _model(2)
    before = state_to_numpy(model)
    with pytest.raises(CheckpointMismatchError) as e:
        load_tower(model, "vision", path)
    msg = str(e.value)
    assert str(path) in msg
    assert ("missing keys (4): ['vision.ln_post.bias', 'vision.ln_post.weight', 'vision.ln_pre.bias', "
            "'vision.ln_pre.weight']") in msg
    assert "unexpected keys (3): ['fc_norm.bias', 'fc_norm.weight', 'patch_embed.proj.bias']" in msg
    assert "hint: patch_embed.proj.bias: a patch-embedding bias" in msg and "hint: no norm_pre" in msg
    assert "hint: fc_norm.bias, fc_norm.weight: fc_norm: an average-pooled model" in msg
    _assert_same(state_to_numpy(model), before)  # strict: nothing was set
    with pytest.raises(CheckpointMismatchError, match="holds the image tower only, no text tower"):
        load_tower(model, "text", path)


# ----------------------------------------------------------------------------- two-tower sources

def test_tower_from_our_checkpoint_and_run_folder(tmp_path):
    src = _model(1)
    ckpt = save_checkpoint(src, tmp_path / "run" / "checkpoints" / "step_0000001")
    model = _model(2)
    before = state_to_numpy(model)
    report = load_tower(model, "text", tmp_path / "run")  # a run folder: its latest checkpoint
    assert report.source.weights == ckpt / WEIGHTS
    after = state_to_numpy(model)
    _assert_same(_part(after, "text."), _part(state_to_numpy(src), "text."))
    _assert_same(_part(after, "vision."), _part(before, "vision."))
    assert np.array_equal(after["temperature"], before["temperature"])

    model = _model(2)
    load_tower(model, "vision", ckpt / WEIGHTS)  # the bare weights file
    after = state_to_numpy(model)
    _assert_same(_part(after, "vision."), _part(state_to_numpy(src), "vision."))
    _assert_same(_part(after, "text."), _part(before, "text."))


def test_tower_from_official_pdparams_and_paddlenlp_folder(tmp_path):
    src = _model(1)
    path = _pdparams(tmp_path / "release" / "ERNIE_VIL2_BASE_ViT.pdparams", _official(state_to_numpy(src)))
    model = _model(2)
    before = state_to_numpy(model)
    report = load_tower(model, "vision", path.parent)
    assert report.source.layout == "official" and report.ignored == ["visual.classfy.bias", "visual.classfy.weight"]
    after = state_to_numpy(model)
    _assert_same(_part(after, "vision."), _part(state_to_numpy(src), "vision."))
    _assert_same(_part(after, "text."), _part(before, "text."))
    assert np.array_equal(after["temperature"], before["temperature"])

    model = _model(2)
    load_tower(model, "text", path)
    _assert_same(_part(state_to_numpy(model), "text."), _part(state_to_numpy(src), "text."))

    folder = export_paddlenlp(src, tmp_path / "pnlp")
    model = _model(2)
    assert load_tower(model, "text", folder).source.layout == "paddlenlp"
    after = state_to_numpy(model)
    _assert_same(_part(after, "text."), _part(state_to_numpy(src), "text."))
    _assert_same(_part(after, "vision."), _part(before, "vision."))


def test_whole_model_then_towers_the_tower_wins(tmp_path):
    whole, vision_src = _model(1), _model(4)
    whole_ckpt = save_checkpoint(whole, tmp_path / "whole")
    save_file(ours_to_timm(state_to_numpy(vision_src)), str(tmp_path / "vit.safetensors"))
    model = _model(2)
    reports = init_model(model, str(whole_ckpt), {"vision": str(tmp_path / "vit.safetensors"), "text": None})
    assert len(reports) == 2
    after = state_to_numpy(model)
    _assert_same(_part(after, "vision."), _part(state_to_numpy(vision_src), "vision."))
    _assert_same(_part(after, "text."), _part(state_to_numpy(whole), "text."))
    assert np.array_equal(after["temperature"], state_to_numpy(whole)["temperature"])


# ----------------------------------------------------------------------------- errors

def test_checkpoint_with_neither_tower(tmp_path):
    folder = tmp_path / "empty_ckpt"  # our layout, but only a temperature
    folder.mkdir()
    save_file({"temperature": np.zeros(1, np.float32)}, str(folder / WEIGHTS))
    (folder / "model_config.json").write_text(json.dumps(SMALL.to_dict()))
    with pytest.raises(CheckpointMismatchError) as e:
        load_tower(_model(2), "vision", folder)
    assert str(folder / WEIGHTS) in str(e.value) and "no image tower" in str(e.value)
    assert "neither tower; keys: ['temperature']" in str(e.value)

    stray = tmp_path / "other.safetensors"
    save_file({"encoder.weight": np.zeros(2, np.float32)}, str(stray))
    with pytest.raises(ValueError, match=r"other\.safetensors: no image tower or text tower found.*encoder\.weight"):
        load_tower(_model(2), "text", stray)

    only_text = _model(1)
    ckpt = tmp_path / "text_only"
    ckpt.mkdir()
    save_file(_part(state_to_numpy(only_text), "text."), str(ckpt / WEIGHTS))
    (ckpt / "model_config.json").write_text(json.dumps(SMALL.to_dict()))
    with pytest.raises(CheckpointMismatchError, match="no image tower in this ernievil2 checkpoint .it holds the text tower only"):
        load_tower(_model(2), "vision", ckpt)


def test_width_mismatch_names_file_and_keys(tmp_path):
    wide = replace(SMALL, vision=replace(SMALL.vision, width=48, heads=2), text=replace(SMALL.text, width=48, heads=2))
    ckpt = save_checkpoint(_model(1, wide), tmp_path / "wide")
    model = _model(2)
    before = state_to_numpy(model)
    with pytest.raises(CheckpointMismatchError) as e:
        load_tower(model, "vision", ckpt)
    msg = str(e.value)
    assert str(ckpt / WEIGHTS) in msg and "its image tower is 48 wide, the model's 32 (model.vision.width)" in msg
    assert "shape mismatch for vision.class_embedding: checkpoint [48], model [32]" in msg
    assert "shape mismatch for vision.blocks.1.attn.qkv.weight: checkpoint [48, 144], model [32, 96]" in msg
    assert all(k.startswith("vision.") for k, _, _ in e.value.mismatched)
    _assert_same(state_to_numpy(model), before)


def test_missing_and_unexpected_keys_listed(tmp_path):
    state = state_to_numpy(_model(1))
    del state["text.blocks.1.ffn_o.bias"]
    state["text.blocks.1.adapter.weight"] = np.zeros((2,), np.float32)
    state["text.word_emb.weight"] = state["text.word_emb.weight"][:90]
    folder = tmp_path / "ck"
    folder.mkdir()
    save_file(state, str(folder / WEIGHTS))
    with pytest.raises(CheckpointMismatchError) as e:
        load_tower(_model(2), "text", folder / WEIGHTS)
    msg = str(e.value)
    assert str(folder / WEIGHTS) in msg
    assert "missing keys (1): ['text.blocks.1.ffn_o.bias']" in msg
    assert "unexpected keys (1): ['text.blocks.1.adapter.weight']" in msg
    assert "shape mismatch for text.word_emb.weight: checkpoint [90, 32], model [100, 32]" in msg
    assert "hint: its word embedding has 90 rows" in msg
    # The vision tower of the same file is intact and loads.
    load_tower(_model(2), "vision", folder / WEIGHTS)


# ----------------------------------------------------------------------------- configuration and the run

def test_tower_init_from_stays_out_of_the_architecture():
    plain = ModelSchema(preset="tiny")
    with_init = ModelSchema(preset="tiny", vision=VisionOverrides(init_from="/w/vit.safetensors"),
                            text=TextOverrides(init_from="/w/ernie"))
    assert resolve_model(with_init) == resolve_model(plain)


def test_inference_refuses_a_tower_init_from():
    from ernievil2.inference.model import build_inference_model
    from ernievil2.train.infer_config import InferSchema

    cfg = InferSchema(model=ModelSchema(preset="tiny", text=TextOverrides(init_from="/w/ernie")), test_file="-",
                      output_file="-")
    with pytest.raises(InferError, match="model.text.init_from starts one tower"):
        build_inference_model(cfg, require_vocab=False)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_train_from_an_ernie_model_and_a_timm_vit(tmp_path):
    """``launch/train.py model.init_from=WHOLE model.text.init_from=ERNIE_FOLDER
    model.vision.init_from=TIMM_FILE`` with lr 0: the final checkpoint holds each tower as loaded
    (the towers' own sources win over the whole model's) and the whole model's temperature."""
    from ernievil2.tokenizer import WordPieceTokenizer

    tiny = model_config("tiny")
    vocab = WordPieceTokenizer.build_vocab(["a red circle left of a blue square", "一个红色的圆形"],
                                           tmp_path / "vocab.txt", vocab_size=100)
    text_src, vision_src, whole = _model(1, tiny), _model(2, tiny), _model(3, tiny)
    text_state = _part(state_to_numpy(text_src), "text.")
    _ernie_folder(tmp_path / "ernie", _ernie_model_state(text_state), num_attention_heads=4)
    save_file(ours_to_timm(state_to_numpy(vision_src)), str(tmp_path / "vit.safetensors"))
    whole_ckpt = save_checkpoint(whole, tmp_path / "whole")

    run = tmp_path / "run"
    cmd = [sys.executable, str(REPO_ROOT / "launch" / "train.py"), "trainer.max_steps=1", "optim.lr=0",
           "optim.warmup_steps=0", "eval=none", "trainer.device=cpu", "logger.backend=none", "data.num_workers=0",
           "data.batch_size=8", "data.shuffle_buffer=16", "data.demo.n_train=64", "data.demo.n_val=16",
           "data.demo.samples_per_shard=32", f"data.demo.cache_dir={tmp_path / 'demo'}", f"model.vocab_file={vocab}",
           f"model.init_from={whole_ckpt}", f"model.text.init_from={tmp_path / 'ernie'}",
           f"model.vision.init_from={tmp_path / 'vit.safetensors'}", f"hydra.run.dir={run}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PADDLE_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    final = load_file(str(run / "checkpoints" / "step_0000001" / WEIGHTS))
    _assert_same(_part(final, "text."), text_state)
    _assert_same(_part(final, "vision."), _part(state_to_numpy(vision_src), "vision."))
    assert np.array_equal(final["temperature"], state_to_numpy(whole)["temperature"])
    log = "".join(p.read_text(encoding="utf-8") for p in run.glob("train*.log")) + proc.stderr + proc.stdout
    assert "loaded the text tower" in log and "loaded the image tower" in log
