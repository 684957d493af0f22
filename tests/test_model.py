"""The dual encoder: presets (README, released ernie_vil-2.0-base-zh layout), block structure against NumPy references, padding mask,
attention backends, temperature, config validation, checkpoints and the optimizer's decay rule."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import paddle
import paddle.nn as nn
import pytest
from safetensors.numpy import load_file, save_file

from ernievil2.models import MAX_LOGIT_SCALE, PRESETS, build_model, model_config
from ernievil2.models.attention import attention, padding_mask
from ernievil2.models.config import INIT_TEMPERATURE
from ernievil2.models.text import TextBlock
from ernievil2.models.vision import QuickGELU, VisionBlock
from ernievil2.train.config import OptimSchema
from ernievil2.train.optim import build_optimizer, cosine_with_warmup, decays
from ernievil2.weights.layouts import MODEL_CONFIG, WEIGHTS
from ernievil2.weights.load import CheckpointMismatchError, load_model, load_weights
from ernievil2.weights.save import save_checkpoint, state_to_numpy

CLS, SEP, PAD = 1, 2, 0
REPO = Path(__file__).resolve().parents[1]


def _tiny(seed: int = 0, **top):
    paddle.seed(seed)
    model = build_model(model_config("tiny", **top))
    model.eval()
    return model


@pytest.fixture(scope="module")
def tiny():
    return _tiny()


def _pixels(b: int, size: int = 64, seed: int = 0) -> paddle.Tensor:
    return paddle.to_tensor(np.random.default_rng(seed).standard_normal((b, 3, size, size)).astype("float32"))


def _ids(rows) -> paddle.Tensor:
    return paddle.to_tensor(np.asarray(rows, dtype="int64"))


def _np(t: paddle.Tensor) -> np.ndarray:
    return t.numpy().astype(np.float64)


# ---------------------------------------------------------------- NumPy reference pieces


def _ln(x, layer: nn.LayerNorm):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + layer._epsilon) * _np(layer.weight) + _np(layer.bias)


def _linear(x, layer: nn.Linear):
    return x @ _np(layer.weight) + _np(layer.bias)  # Paddle Linear weight is [in, out]


def _softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _mha(q, k, v, heads, mask=None):
    """q, k, v [B, N, C] → softmax(q k^T / sqrt(d) + mask) v, heads split along C."""
    b, n, c = q.shape
    d = c // heads
    split = lambda t: t.reshape(b, n, heads, d).transpose(0, 2, 1, 3)  # noqa: E731
    scores = split(q) @ split(k).transpose(0, 1, 3, 2) / math.sqrt(d)
    if mask is not None:
        scores = scores + mask
    return (_softmax(scores) @ split(v)).transpose(0, 2, 1, 3).reshape(b, n, c)


def _gelu(x):
    from math import erf

    return 0.5 * x * (1 + np.vectorize(erf)(x / math.sqrt(2)))


def _randomize(layer: nn.Layer, seed: int) -> None:
    """Random values in every parameter (LayerNorm scales/shifts too, so ln1 and ln2 differ)."""
    rng = np.random.default_rng(seed)
    for name, p in layer.named_parameters():
        shift = 1.0 if p.ndim == 1 and name.endswith("weight") else 0.0  # LayerNorm scales around 1
        p.set_value(rng.normal(0, 0.3, p.shape).astype("float32") + shift)


# ---------------------------------------------------------------- encoders and presets


def test_encoders_return_normalised_float32(tiny):
    width = tiny.cfg.vision.width
    img = tiny.encode_image(_pixels(3))
    txt = tiny.encode_text(_ids([[CLS, 10, 11, SEP, PAD], [CLS, 12, SEP, PAD, PAD]]))
    for emb, b in ((img, 3), (txt, 2)):
        assert list(emb.shape) == [b, width]
        assert emb.dtype == paddle.float32
        np.testing.assert_allclose(np.linalg.norm(emb.numpy(), axis=1), 1.0, atol=1e-5)
    raw = tiny.encode_image(_pixels(3), normalize=False).numpy()
    np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), img.numpy(), atol=1e-6)
    assert list(tiny.text(_ids([[CLS, 10, SEP]])).shape) == [1, width]


def test_base_preset_matches_spec():
    cfg = model_config("base")
    v, t = cfg.vision, cfg.text
    assert (v.image_size, v.patch_size) == (224, 16)
    assert v.num_patches + 1 == 197
    assert (v.width, v.layers, v.heads, v.mlp_dim) == (768, 12, 12, 3072)
    assert v.ln_eps == 1e-6
    assert (t.vocab_size, t.width, t.layers, t.heads, t.ffn_dim) == (40000, 768, 12, 12, 3072)
    assert t.max_positions == 2048
    assert t.ln_eps == 1e-5
    assert t.dropout == 0.1 and t.attention_dropout == 0.1
    assert t.pad_id == 0
    assert cfg.init_temperature == pytest.approx(2.65926, abs=1e-5)
    assert cfg == PRESETS["base"]


def test_large_preset_matches_paper():
    cfg = model_config("large")
    v, t = cfg.vision, cfg.text
    assert (v.width, v.layers, v.heads, v.patch_size, v.image_size) == (1024, 24, 16, 14, 224)
    assert v.mlp_dim == 4096 and v.num_patches + 1 == 257
    assert (t.width, t.layers, t.heads, t.ffn_dim) == (1024, 24, 16, 4096)
    assert (t.vocab_size, t.max_positions) == (40000, 2048)


# ---------------------------------------------------------------- blocks


def test_quick_gelu_numeric():
    x = np.linspace(-8, 8, 101).astype("float32")
    got = QuickGELU()(paddle.to_tensor(x)).numpy()
    np.testing.assert_allclose(got, x / (1 + np.exp(-1.702 * x.astype(np.float64))), rtol=1e-5, atol=1e-6)


def test_vision_block_is_pre_ln():
    paddle.seed(1)
    cfg = model_config("tiny").vision
    block = VisionBlock(cfg, "math")
    block.eval()
    _randomize(block, 1)
    assert isinstance(block.act, QuickGELU)
    assert block.norm1._epsilon == cfg.ln_eps and block.norm2._epsilon == cfg.ln_eps
    x = np.random.default_rng(2).standard_normal((2, 5, cfg.width)).astype("float32")
    got = block(paddle.to_tensor(x)).numpy()

    # From the sublayers: x + attn(norm1(x)), then + fc2(act(fc1(norm2(.))))
    xt = paddle.to_tensor(x)
    h = xt + block.attn(block.norm1(xt))
    by_sublayers = (h + block.fc2(block.act(block.fc1(block.norm2(h))))).numpy()
    np.testing.assert_allclose(got, by_sublayers, atol=1e-5)

    # Fully by hand in float64.
    xd = x.astype(np.float64)
    q, k, v = np.split(_linear(_ln(xd, block.norm1), block.attn.qkv), 3, axis=-1)
    h = xd + _linear(_mha(q, k, v, cfg.heads), block.attn.proj)
    u = _linear(_ln(h, block.norm2), block.fc1)
    ref = h + _linear(u / (1 + np.exp(-1.702 * u)), block.fc2)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)

    # Negative control: the post-LN arrangement gives something else.
    q, k, v = np.split(_linear(xd, block.attn.qkv), 3, axis=-1)
    post = _ln(xd + _linear(_mha(q, k, v, cfg.heads), block.attn.proj), block.norm1)
    assert np.abs(got - post).max() > 1e-2


def test_text_block_is_post_ln():
    paddle.seed(1)
    cfg = model_config("tiny").text
    block = TextBlock(cfg, "math")
    block.eval()
    _randomize(block, 3)
    assert block.ln1._epsilon == cfg.ln_eps and block.ln2._epsilon == cfg.ln_eps
    ids = _ids([[CLS, 7, 8, 9, SEP], [CLS, 7, SEP, PAD, PAD]])
    mask = padding_mask(ids, 0, "float32")
    x = np.random.default_rng(4).standard_normal((2, 5, cfg.width)).astype("float32")
    got = block(paddle.to_tensor(x), mask).numpy()

    # From the sublayers: h = ln1(x + attn(x)); ln2(h + ffn(h)).
    xt = paddle.to_tensor(x)
    h = block.ln1(xt + block.attn(xt, mask))
    by_sublayers = block.ln2(h + block.ffn_o(paddle.nn.functional.gelu(block.ffn_i(h)))).numpy()
    np.testing.assert_allclose(got, by_sublayers, atol=1e-5)

    # Fully by hand in float64 (exact erf GELU, keys at padding dropped).
    xd = x.astype(np.float64)
    mask_np = np.where(ids.numpy() == 0, -1e4, 0.0)[:, None, None, :]
    a = _mha(_linear(xd, block.attn.q), _linear(xd, block.attn.k), _linear(xd, block.attn.v), cfg.heads, mask_np)
    h = _ln(xd + _linear(a, block.attn.o), block.ln1)
    ref = _ln(h + _linear(_gelu(_linear(h, block.ffn_i)), block.ffn_o), block.ln2)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)

    # Negative control: the pre-LN arrangement gives something else.
    hn = _ln(xd, block.ln1)
    pre = xd + _linear(_mha(_linear(hn, block.attn.q), _linear(hn, block.attn.k), _linear(hn, block.attn.v),
                            cfg.heads, mask_np), block.attn.o)
    assert np.abs(got - pre).max() > 1e-2


def test_towers_end_to_end_by_hand(tiny):
    """Vision: ln_post(blocks(ln_pre([cls; patches] + pos)))[:, 0]; text: tanh(pooler(h[:, 0]))."""
    vis, txt = tiny.vision, tiny.text
    assert vis.patch_embed.bias is None  # patch conv without bias (as the released ViT)
    pixels = _pixels(2)
    x = vis.patch_embed(pixels).flatten(2).transpose([0, 2, 1])
    cls = vis.class_embedding.reshape([1, 1, -1]).expand([2, 1, -1])
    x = vis.ln_pre(paddle.concat([cls, x], axis=1) + vis.positional_embedding)
    assert x.shape[1] == vis.cfg.num_patches + 1
    for blk in vis.blocks:
        x = blk(x)
    np.testing.assert_allclose(vis(pixels).numpy(), vis.ln_post(x[:, 0]).numpy(), atol=1e-5)

    ids = _ids([[CLS, 30, 31, SEP, PAD]])
    h = txt.ln(txt.word_emb(ids) + txt.pos_emb(paddle.arange(5).unsqueeze(0)))
    assert txt.ln._epsilon == 1e-5
    for blk in txt.blocks:
        h = blk(h, padding_mask(ids, 0, "float32"))
    np.testing.assert_allclose(txt(ids).numpy(), np.tanh(txt.pooler(h[:, 0]).numpy()), atol=1e-5)


# ---------------------------------------------------------------- padding mask


def test_padding_does_not_change_text_embedding(tiny):
    short = tiny.encode_text(_ids([[CLS, 40, 41, SEP]])).numpy()
    padded = tiny.encode_text(_ids([[CLS, 40, 41, SEP, PAD, PAD]])).numpy()
    np.testing.assert_allclose(padded, short, atol=1e-5)
    # In a batch with a longer row, too.
    batch = tiny.encode_text(_ids([[CLS, 40, 41, SEP, PAD, PAD], [CLS, 5, 6, 7, 8, SEP]])).numpy()
    np.testing.assert_allclose(batch[0], short[0], atol=1e-5)
    # A real token where the pad was changes the embedding.
    filled = tiny.encode_text(_ids([[CLS, 40, 41, SEP, 42, PAD]])).numpy()
    assert np.abs(filled - short).max() > 1e-3


def test_padding_mask_values():
    m = padding_mask(_ids([[1, 5, 0], [1, 0, 0]]), 0, "float32")
    assert list(m.shape) == [2, 1, 1, 3]
    np.testing.assert_array_equal(m.numpy()[:, 0, 0], [[0, 0, -1e4], [0, -1e4, -1e4]])


# ---------------------------------------------------------------- attention backends


@pytest.mark.parametrize("masked", [False, True])
def test_attention_backends_agree(masked):
    rng = np.random.default_rng(5)
    q, k, v = (paddle.to_tensor(rng.standard_normal((3, 6, 4, 8)).astype("float32")) for _ in range(3))
    mask = padding_mask(_ids([[1, 5, 6, 7, 2, 0], [1, 5, 2, 0, 0, 0], [1, 2, 3, 4, 5, 2]]), 0, "float32") \
        if masked else None
    math_out = attention(q, k, v, mask, backend="math")
    sdpa_out = attention(q, k, v, mask, backend="sdpa")
    assert list(sdpa_out.shape) == [3, 6, 4, 8]
    np.testing.assert_allclose(sdpa_out.numpy(), math_out.numpy(), atol=1e-5)
    # And both against NumPy.
    qn, kn, vn = (_np(t).reshape(3, 6, 32) for t in (q, k, v))
    ref = _mha(qn, kn, vn, 4, None if mask is None else _np(mask)).reshape(3, 6, 4, 8)
    np.testing.assert_allclose(math_out.numpy(), ref, atol=1e-5)


def test_model_sdpa_equals_math():
    m_math = _tiny(seed=0, attention="math")
    m_sdpa = _tiny(seed=123, attention="sdpa")
    assert m_sdpa.vision.blocks[0].attn.backend == "sdpa" and m_sdpa.text.blocks[0].attn.backend == "sdpa"
    assert m_math.vision.blocks[0].attn.backend == "math"
    m_sdpa.set_state_dict(m_math.state_dict())
    pixels = _pixels(2)
    ids = _ids([[CLS, 40, 41, SEP, PAD, PAD], [CLS, 5, 6, 7, 8, SEP]])
    np.testing.assert_allclose(m_sdpa.encode_image(pixels).numpy(), m_math.encode_image(pixels).numpy(), atol=1e-5)
    np.testing.assert_allclose(m_sdpa.encode_text(ids).numpy(), m_math.encode_text(ids).numpy(), atol=1e-5)


# ---------------------------------------------------------------- temperature


def test_temperature_init_and_clamp():
    model = _tiny()
    assert INIT_TEMPERATURE == pytest.approx(2.65926, abs=1e-5)
    assert model.temperature.item() == pytest.approx(math.log(1 / 0.07), abs=1e-6)
    assert model.logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-5)  # 14.2857
    param = model.temperature
    # Inside the range: unchanged.
    model.clamp_logit_scale()
    assert model.logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-5)
    param.set_value(paddle.full([1], 10.0))
    assert model.logit_scale.item() > 1e4
    model.clamp_logit_scale()
    assert model.temperature is param
    assert any(p is param for p in model.parameters())
    assert model.logit_scale.item() == pytest.approx(MAX_LOGIT_SCALE, rel=1e-5)
    assert MAX_LOGIT_SCALE == 100.0
    assert not param.stop_gradient


# ---------------------------------------------------------------- config validation


def test_width_mismatch_raises_naming_both():
    with pytest.raises(ValueError) as err:
        model_config("tiny", vision={"width": 32})
    msg = str(err.value)
    assert "vision.width" in msg and "text.width" in msg and "32" in msg and "64" in msg


def test_unknown_override_key_named():
    with pytest.raises(KeyError, match="widht"):
        model_config("tiny", vision={"widht": 3})
    with pytest.raises(KeyError, match="ffn_dimm"):
        model_config("tiny", text={"ffn_dimm": 3})


def test_unknown_preset_lists_presets():
    with pytest.raises(KeyError) as err:
        model_config("huge")
    msg = str(err.value)
    assert "huge" in msg
    for name in ("base", "large", "tiny"):
        assert name in msg


def test_other_validation():
    with pytest.raises(ValueError, match="attention"):
        model_config("tiny", attention="flash")
    with pytest.raises(ValueError, match="heads"):
        model_config("tiny", vision={"heads": 3}, text={"heads": 4})
    cfg = model_config("tiny", vision={"layers": 2, "width": None})
    assert cfg.vision.layers == 2 and cfg.vision.width == 64  # None keeps the preset's value


@pytest.mark.parametrize("scheme", ["normal", "fan_in"])
def test_init_scheme_sets_linear_std(scheme):
    model = _tiny(seed=5, vision={"init": scheme}, text={"init": scheme})
    for tower in (model.vision, model.text):
        for name, layer in tower.named_sublayers():
            if isinstance(layer, nn.Linear):
                fan_in, fan_out = layer.weight.shape
                want = 0.02 if scheme == "normal" else fan_in**-0.5
                got = float(_np(layer.weight).std())
                # the sample std of fan_in * fan_out >= 4096 draws is within 10 % of the true one
                # (truncation at 2 std, the vision tower's normal, shrinks it by 12 %)
                low = 0.8 if scheme == "normal" and tower is model.vision else 0.9
                assert low * want < got < 1.1 * want, (name, got, want)
                assert not _np(layer.bias).any()
    # the embeddings keep initializer_range whatever the scheme
    assert 0.9 * 0.02 < float(_np(model.text.word_emb.weight).std()) < 1.1 * 0.02


@pytest.mark.slow
def test_fan_in_init_separates_inputs_at_the_start(tmp_path):
    """``bench/init_spread.py``: with std 0.02 a 64-wide tower's blocks barely change its class
    token, so every demo scene and caption gets nearly the same embedding (the symmetric start
    short runs stall in); with fan_in they start apart."""
    out = tmp_path / "spread.json"
    subprocess.run([sys.executable, str(REPO / "bench" / "init_spread.py"), "--seeds", "1", "--n", "12",
                    "--out", str(out)], check=True, capture_output=True, cwd=tmp_path)
    rows = {r["init"]: r for r in json.loads(out.read_text())}
    assert rows["normal"]["image_mean"] > 0.9999 and rows["normal"]["caption_mean"] > 0.9999
    assert rows["fan_in"]["image_mean"] < 0.995 and rows["fan_in"]["caption_mean"] < 0.97


def test_unknown_init_scheme_named():
    with pytest.raises(ValueError, match=r"text\.init must be one of normal, fan_in; got 'xavier'"):
        model_config("tiny", text={"init": "xavier"})


# ---------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip(tmp_path):
    tiny = _tiny(seed=11)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("[PAD]\n[CLS]\n[SEP]\n", encoding="utf-8")
    with paddle.no_grad():  # move the weights away from their init so the round trip is meaningful
        tiny.temperature.set_value(paddle.full([1], 3.0))
    out = save_checkpoint(tiny, tmp_path / "ckpt", files={"vocab.txt": vocab, "extra.json": {"a": 1}})
    assert {p.name for p in out.iterdir()} == {WEIGHTS, MODEL_CONFIG, "vocab.txt", "extra.json"}
    loaded = load_model(out).model
    loaded.eval()
    assert loaded.cfg == tiny.cfg
    pixels, ids = _pixels(2), _ids([[CLS, 40, 41, SEP, PAD], [CLS, 5, 6, 7, SEP]])
    np.testing.assert_array_equal(loaded.encode_image(pixels).numpy(), tiny.encode_image(pixels).numpy())
    np.testing.assert_array_equal(loaded.encode_text(ids).numpy(), tiny.encode_text(ids).numpy())
    assert loaded.temperature.item() == 3.0
    # Saving again over an existing folder replaces it (no leftovers beside it).
    save_checkpoint(tiny, out)
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(["ckpt", "vocab.txt"])


def test_load_weights_shape_mismatch_names_key_and_shapes(tmp_path, tiny):
    save_checkpoint(tiny, tmp_path / "ckpt")
    narrow = build_model(model_config("tiny", vision={"width": 32}, text={"width": 32}))
    stored = load_file(str(tmp_path / "ckpt" / WEIGHTS))
    first = next(k for k, v in narrow.state_dict().items() if list(v.shape) != list(stored[k].shape))
    with pytest.raises(ValueError) as err:
        load_weights(narrow, tmp_path / "ckpt" / WEIGHTS)
    msg = str(err.value)
    assert first in msg
    assert str(list(stored[first].shape)) in msg and str(list(narrow.state_dict()[first].shape)) in msg


def test_load_weights_missing_and_unexpected_keys(tmp_path, tiny):
    state = state_to_numpy(tiny)
    missing = "text.blocks.1.ffn_o.bias"
    del state[missing]
    state["text.extra.weight"] = np.zeros(3, dtype=np.float32)
    path = tmp_path / "partial.safetensors"
    save_file(state, str(path))
    model = _tiny(seed=7)
    before = model.state_dict()["text.pooler.weight"].numpy().copy()
    with pytest.raises(CheckpointMismatchError) as err:
        load_weights(model, path)
    assert missing in str(err.value) and "text.extra.weight" in str(err.value)
    # Nothing was loaded on failure.
    np.testing.assert_array_equal(model.state_dict()["text.pooler.weight"].numpy(), before)


# ---------------------------------------------------------------- optimizer


def _should_decay(model: nn.Layer) -> dict[str, bool]:
    """Decay exactly the weight matrices of Linear and Conv layers."""
    expected = {}
    for prefix, layer in model.named_sublayers(include_self=True):
        for pname, _ in layer.named_parameters(include_sublayers=False):
            full = f"{prefix}.{pname}" if prefix else pname
            expected[full] = isinstance(layer, (nn.Linear, nn.Conv2D)) and pname == "weight"
    return expected


def test_decay_rule_over_all_parameters(tiny):
    expected = _should_decay(tiny)
    named = dict(tiny.named_parameters())
    assert set(expected) == set(named)
    got = {n: decays(n, p) for n, p in named.items()}
    wrong = {n: got[n] for n in named if got[n] != expected[n]}
    assert not wrong, f"decays() wrong for {wrong}"
    # Spot checks of the categories the rule names.
    for name in ("temperature", "vision.class_embedding", "vision.positional_embedding", "text.word_emb.weight",
                 "text.pos_emb.weight", "text.ln.weight", "vision.ln_pre.bias", "text.blocks.0.attn.q.bias"):
        assert got[name] is False, name
    for name in ("vision.patch_embed.weight", "vision.blocks.0.attn.qkv.weight", "text.blocks.0.ffn_i.weight",
                 "text.pooler.weight"):
        assert got[name] is True, name


def test_optimizer_applies_decay_only_where_decays_says():
    """With zero gradients AdamW moves a parameter only by decay: w ← w·(1 − lr·wd)."""
    model = _tiny(seed=3)
    cfg = OptimSchema(lr=0.1, weight_decay=0.5, warmup_steps=0, grad_clip=0.0)
    opt, sched = build_optimizer(model, cfg, total_steps=10)
    before = {n: p.numpy().copy() for n, p in model.named_parameters()}
    (paddle.add_n([(p * 0.0).sum() for p in model.parameters()])).backward()
    opt.step()
    for n, p in model.named_parameters():
        factor = 1 - 0.1 * 0.5 if decays(n, p) else 1.0
        np.testing.assert_allclose(p.numpy(), before[n] * factor, rtol=1e-5, atol=1e-7, err_msg=n)


def test_cosine_with_warmup_by_hand():
    f = cosine_with_warmup
    # Linear warm-up over 10 steps: (step + 1) / 10.
    assert f(0, 10, 110, 0.1) == pytest.approx(0.1)
    assert f(4, 10, 110, 0.1) == pytest.approx(0.5)
    assert f(9, 10, 110, 0.1) == pytest.approx(1.0)
    # Cosine from 1 at step 10 to min_ratio at step 110.
    assert f(10, 10, 110, 0.1) == pytest.approx(1.0)
    assert f(35, 10, 110, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert f(60, 10, 110, 0.1) == pytest.approx(0.55)
    assert f(110, 10, 110, 0.1) == pytest.approx(0.1)
    assert f(500, 10, 110, 0.1) == pytest.approx(0.1)
    # No warm-up, min 0.
    assert f(0, 0, 100, 0.0) == pytest.approx(1.0)
    assert f(50, 0, 100, 0.0) == pytest.approx(0.5)
    assert f(100, 0, 100, 0.0) == pytest.approx(0.0, abs=1e-12)


def test_scheduler_follows_cosine_with_warmup():
    model = _tiny()
    cfg = OptimSchema(lr=2e-3, warmup_steps=5, min_lr_ratio=0.0)
    _, sched = build_optimizer(model, cfg, total_steps=30)
    lrs = []
    for _ in range(31):
        lrs.append(sched.get_lr())
        sched.step()
    expected = [2e-3 * cosine_with_warmup(s, 5, 30, 0.0) for s in range(31)]
    np.testing.assert_allclose(lrs, expected, rtol=1e-9, atol=1e-12)
    assert lrs[0] == pytest.approx(2e-3 / 5) and lrs[4] == pytest.approx(2e-3) and lrs[30] == pytest.approx(0.0)
