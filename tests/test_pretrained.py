"""Pretrained weights in and out: layout detection, the official and PaddleNLP layouts, strict
loading, ``model.init_from``, and embedding parity with PaddleNLP's ``ErnieViLModel`` on real
images and captions (the PaddleNLP tests skip where ``paddlenlp`` is not installed)."""
from __future__ import annotations

import json
import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import paddle
import pytest
from PIL import Image
from safetensors.numpy import load_file, save_file

from ernievil2.models import build_model
from ernievil2.models.config import DualEncoderConfig, TextConfig, VisionConfig
from ernievil2.tokenizer import WordPieceTokenizer
from ernievil2.weights.configs import infer_config
from ernievil2.weights.find import detect_layout, resolve_source, vocab_candidates
from ernievil2.weights.layouts import PADDLENLP_TEXT_LN_EPS, WEIGHTS, ours_to_paddlenlp, paddlenlp_to_ours
from ernievil2.weights.load import CheckpointMismatchError, load_model, load_state_into, load_weights
from ernievil2.weights.save import export_paddlenlp, save_checkpoint, state_to_numpy

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
PARITY_ATOL = 1e-5

# Small but real-shaped: ViT/16 on 224 px (197 tokens), the released 40,000-row vocabulary.
SMALL = DualEncoderConfig(
    vision=VisionConfig(image_size=224, patch_size=16, width=64, layers=2, heads=4, mlp_dim=128),
    text=TextConfig(vocab_size=40000, width=64, layers=2, heads=4, ffn_dim=128, max_positions=64),
)

NEEDS_PADDLENLP = "needs paddlenlp (the paddlenlp extra: pip install -e '.[paddlenlp]')"


# ----------------------------------------------------------------------------- real data

def _pixels(paths: list[Path], size: int = 224) -> np.ndarray:
    """Plain resize + ImageNet normalisation (the preprocessing profiles are tested elsewhere)."""
    out = []
    for p in paths:
        img = Image.open(p).convert("RGB").resize((size, size), Image.BICUBIC)
        arr = (np.asarray(img, dtype=np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
        out.append(arr.transpose(2, 0, 1))
    return np.stack(out).astype(np.float32)


@pytest.fixture(scope="module")
def real_batch(flickr8k_dir, coco_mini_dir, released_vocab):
    """8 Flickr8k photos with Chinese captions + 4 COCO photos with English captions, tokenised
    with the released vocab (length 48, right-padded with 0)."""
    images, captions = [], []
    for root, n, field in ((flickr8k_dir, 8, "captions_zh"), (coco_mini_dir, 4, "captions_en")):
        rows = [json.loads(line) for line in (root / "captions.jsonl").read_text(encoding="utf-8").splitlines()[:n]]
        images += [root / r["image"] for r in rows]
        captions += [r[field][0] for r in rows]
    tok = WordPieceTokenizer(released_vocab, max_length=48)
    ids = np.asarray(tok(captions), dtype=np.int64)
    assert (ids == 0).any(), "the batch should contain padding"
    return {"pixels": _pixels(images), "ids": ids, "captions": captions}


def _ours(model, batch) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    with paddle.no_grad():
        img = model.encode_image(paddle.to_tensor(batch["pixels"])).numpy()
        txt = model.encode_text(paddle.to_tensor(batch["ids"])).numpy()
    return img, txt


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _paddlenlp_embeddings(model, batch) -> tuple[np.ndarray, np.ndarray]:
    """PaddleNLP's get_*_features are NOT L2-normalised (ln_post CLS / tanh pooler): normalise here."""
    model.eval()
    with paddle.no_grad():
        img = model.get_image_features(pixel_values=paddle.to_tensor(batch["pixels"])).numpy()
        txt = model.get_text_features(input_ids=paddle.to_tensor(batch["ids"])).numpy()
    return _normalise(img), _normalise(txt)


def _seeded_model(cfg: DualEncoderConfig, seed: int):
    paddle.seed(seed)
    return build_model(cfg)


# ----------------------------------------------------------------------------- official layout (test-local inverse)

def _ours_to_official(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Our state dict in the official ERNIE-repo layout, written independently of the library's map."""
    out = {}
    for k, v in state.items():
        parts = k.split(".")
        if k == "temperature":
            out["contrastive_loss_mm.temperature_b"] = v
        elif k == "vision.class_embedding":
            out["visual.class_embedding"] = v.reshape(1, 1, -1)
        elif k == "vision.positional_embedding":
            out["visual.positional_embedding"] = v[None]
        elif k == "vision.patch_embed.weight":
            out["visual.patch_embed.proj.weight"] = v
        elif parts[:2] in (["vision", "ln_pre"], ["vision", "ln_post"]):
            out[f"visual.norm_{parts[1][3:]}.{parts[2]}"] = v
        elif parts[:2] == ["vision", "blocks"]:
            i, rest = parts[2], parts[3:]
            if rest[0] in ("fc1", "fc2"):
                rest = ["mlp"] + rest
            out[".".join(["visual", "blocks", i] + rest)] = v
        elif k in ("text.word_emb.weight", "text.pos_emb.weight") or parts[:2] in (["text", "ln"], ["text", "pooler"]):
            out["text_model." + ".".join(parts[1:])] = v
        elif parts[:2] == ["text", "blocks"]:
            i, rest = parts[2], parts[3:]
            rest = {"ffn_i": ["ffn", "i"], "ffn_o": ["ffn", "o"]}.get(rest[0], [rest[0]]) + rest[1:]
            out[".".join(["text_model", "encoder_stack", "block", i] + rest)] = v
        else:
            raise AssertionError(f"unmapped key {k}")
    return out


@pytest.fixture(scope="module")
def small_model():
    return _seeded_model(SMALL, 7)


def test_official_pdparams_reproduces_embeddings(small_model, real_batch, tmp_path):
    state = state_to_numpy(small_model)
    official = _ours_to_official(state)
    # The release also carries an unused classification head.
    official["visual.classfy.weight"] = np.zeros((64, 10), np.float32)
    official["visual.classfy.bias"] = np.zeros((10,), np.float32)
    path = tmp_path / "release" / "ERNIE_VIL2_BASE_ViT.pdparams"
    path.parent.mkdir()
    with open(path, "wb") as f:  # an old-Paddle-style pickle: protocol 2, plain dict of arrays
        pickle.dump(official, f, protocol=2)

    assert detect_layout(path) == "official"
    assert detect_layout(path.parent) == "official"
    # Width 64 has no known head count: the error asks for a config.
    with pytest.raises(ValueError, match="attention heads"):
        load_model(path).model

    model = load_model(path.parent, config=SMALL).model
    got = state_to_numpy(model)
    assert set(got) == set(state)
    for k in state:
        assert np.array_equal(got[k], state[k]), k
    ref_img, ref_txt = _ours(small_model, real_batch)
    img, txt = _ours(model, real_batch)
    assert np.array_equal(img, ref_img) and np.array_equal(txt, ref_txt)

    report = load_weights(build_model(SMALL), path)
    assert report.source.layout == "official" and report.loaded == len(state)
    assert report.ignored == ["visual.classfy.bias", "visual.classfy.weight"]


def test_infer_config_for_the_released_base_shapes():
    """The released base architecture is read off the shapes alone (zero-memory broadcast arrays)."""
    base = DualEncoderConfig()
    model_shapes = {
        "vision.patch_embed.weight": (768, 3, 16, 16), "vision.positional_embedding": (197, 768),
        "text.word_emb.weight": (40000, 768), "text.pos_emb.weight": (2048, 768),
    }
    for i in range(12):
        model_shapes[f"vision.blocks.{i}.fc1.weight"] = (768, 3072)
        model_shapes[f"text.blocks.{i}.ffn_i.weight"] = (768, 3072)
    state = {k: np.broadcast_to(np.float32(0), s) for k, s in model_shapes.items()}
    cfg = infer_config(state)
    assert cfg.vision == base.vision
    assert cfg.text == base.text


# ----------------------------------------------------------------------------- our layout, strictness, detection

def test_detect_layout_of_our_checkpoints(small_model, tmp_path):
    ckpt = save_checkpoint(small_model, tmp_path / "run" / "checkpoints" / "step_0000010")
    assert detect_layout(ckpt) == "ernievil2"
    assert detect_layout(ckpt / WEIGHTS) == "ernievil2"
    src = resolve_source(tmp_path / "run")  # a run folder: its latest checkpoint
    assert src.layout == "ernievil2" and src.weights == ckpt / WEIGHTS
    model = load_model(tmp_path / "run").model
    assert model.cfg == SMALL


def test_detect_layout_fails_clearly(tmp_path):
    folder = tmp_path / "holiday_photos"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    (folder / "beach.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(ValueError) as e:
        detect_layout(folder)
    msg = str(e.value)
    assert str(folder) in msg and "notes.txt" in msg and "beach.jpg" in msg and "model_config.json" in msg

    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        detect_layout(tmp_path / "no_such_dir")

    stray = tmp_path / "other.pdparams"
    with open(stray, "wb") as f:
        pickle.dump({"encoder.weight": np.zeros(2, np.float32)}, f)
    with pytest.raises(ValueError, match=r"other\.pdparams.*encoder\.weight"):
        detect_layout(stray)


def test_strict_load_lists_missing_and_unexpected_in_one_error(small_model, tmp_path):
    ckpt = save_checkpoint(small_model, tmp_path / "ck")
    state = load_file(str(ckpt / WEIGHTS))
    del state["text.pooler.bias"]
    state["text.extra_head.weight"] = np.zeros((3,), np.float32)
    save_file(state, str(ckpt / WEIGHTS))

    with pytest.raises(CheckpointMismatchError) as e:
        load_weights(build_model(SMALL), ckpt)
    msg = str(e.value)
    assert str(ckpt / WEIGHTS) in msg
    assert "missing keys (1): ['text.pooler.bias']" in msg
    assert "unexpected keys (1): ['text.extra_head.weight']" in msg
    assert e.value.missing == ["text.pooler.bias"] and e.value.unexpected == ["text.extra_head.weight"]

    # strict=False loads what fits.
    model = build_model(SMALL)
    report = load_weights(model, ckpt, strict=False)
    assert report.missing == ["text.pooler.bias"] and report.unexpected == ["text.extra_head.weight"]
    assert np.array_equal(model.text.pooler.weight.numpy(), small_model.text.pooler.weight.numpy())


def test_shape_mismatch_names_key_and_both_shapes(small_model, tmp_path):
    ckpt = save_checkpoint(small_model, tmp_path / "ck")
    other = build_model(replace(SMALL, vision=replace(SMALL.vision, mlp_dim=96)))
    with pytest.raises(CheckpointMismatchError) as e:
        load_weights(other, ckpt)
    msg = str(e.value)
    assert str(ckpt / WEIGHTS) in msg
    assert "shape mismatch for vision.blocks.0.fc1.weight: checkpoint [64, 128], model [64, 96]" in msg
    assert "shape mismatch for vision.blocks.1.fc2.weight: checkpoint [128, 64], model [96, 64]" in msg


def _vocab(path: Path, words: list[str]) -> Path:
    """A plain vocab file: the special tokens, then ``words``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{t}\n" for t in ["[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]", *words]), encoding="utf-8")
    return path


def test_load_model_finds_the_vocab_by_one_rule(small_model, tmp_path):
    """Explicit vocab, else vocab.txt beside the weights (a run folder: its latest checkpoint's),
    else vocab.txt in the run folder, else the fallback; none: ``vocab_file`` is None."""
    run = tmp_path / "run"
    ckpt = save_checkpoint(small_model, run / "checkpoints" / "step_0000010")
    in_run = _vocab(run / "vocab.txt", ["run"])
    beside = _vocab(ckpt / "vocab.txt", ["beside"])
    explicit = _vocab(tmp_path / "explicit.txt", ["explicit"])
    fallback = _vocab(tmp_path / "fallback.txt", ["fallback"])

    assert load_model(run).vocab_file == beside
    assert load_model(ckpt).vocab_file == beside
    assert load_model(ckpt / WEIGHTS).vocab_file == beside  # a file: the vocab beside it
    assert load_model(run, explicit, fallback_vocab=fallback).vocab_file == explicit
    loaded = load_model(run)
    assert loaded.tokenizer(16).token_to_id("beside") == 5 and loaded.tokenizer(16).max_length == 16
    assert loaded.source.weights == ckpt / WEIGHTS and loaded.report.loaded == len(state_to_numpy(small_model))
    with pytest.raises(FileNotFoundError, match="vocab file not found: .*nowhere.txt"):
        load_model(run, tmp_path / "nowhere.txt")

    beside.unlink()
    assert load_model(run).vocab_file == in_run  # the run folder's own
    assert load_model(ckpt, fallback_vocab=fallback).vocab_file == fallback  # nothing beside the weights
    in_run.unlink()
    assert load_model(run, fallback_vocab=tmp_path / "gone.txt").vocab_file is None
    bare = load_model(run)
    assert bare.vocab_file is None and vocab_candidates(bare.source) == [ckpt / "vocab.txt", run / "vocab.txt"]
    with pytest.raises(FileNotFoundError, match=r"no WordPiece vocab \(looked for .*step_0000010/vocab.txt"):
        bare.tokenizer()

    # A vocab with more ids than the word embedding has rows is not this model's.
    big = tmp_path / "big.txt"
    big.write_text("[PAD]\t0\n[CLS]\t1\n[SEP]\t2\n[MASK]\t3\n[UNK]\t40000\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"40001 ids .* 40000-row word embedding"):
        load_model(ckpt, big)


def test_bare_safetensors_takes_its_architecture_from_the_fallback(small_model, tmp_path):
    """A ``.safetensors`` file without ``model_config.json`` records no architecture: the
    fallback config describes it (a function of the vocab's size, as ``mode=eval`` and inference pass)."""
    ckpt = save_checkpoint(small_model, tmp_path / "ck")
    bare = tmp_path / "elsewhere" / "weights.safetensors"
    bare.parent.mkdir()
    bare.write_bytes((ckpt / WEIGHTS).read_bytes())
    with pytest.raises(ValueError, match="no model_config.json beside it"):
        load_model(bare)
    vocab = _vocab(bare.parent / "vocab.txt", ["a", "b"])
    sizes = []
    loaded = load_model(bare, fallback_config=lambda n: sizes.append(n) or SMALL)
    assert sizes == [7] and loaded.vocab_file == vocab and loaded.model.cfg == SMALL
    a, b = state_to_numpy(small_model), state_to_numpy(loaded.model)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    # A folder's own config wins over the fallback; an explicit config wins over everything.
    assert load_model(ckpt, fallback_config=lambda n: 1 / 0).model.cfg == SMALL
    with pytest.raises(CheckpointMismatchError, match="shape mismatch for vision.blocks.0.fc1.weight"):
        load_model(ckpt, config=replace(SMALL, vision=replace(SMALL.vision, mlp_dim=96)))


def test_inference_and_search_find_the_same_vocab(small_model, tmp_path):
    """``launch/infer.py`` / ``launch/export.py`` and search load through :func:`load_model`: a run
    folder trained on an explicit vocab (none in the run folder itself) gives its checkpoint's vocab."""
    from ernievil2.inference import build_inference_model
    from ernievil2.models.schema import ModelSchema
    from ernievil2.search import load_encoder
    from ernievil2.train.infer_config import InferSchema

    vocab = _vocab(tmp_path / "released" / "vocab.txt", ["词"])
    run = tmp_path / "run"
    ckpt = save_checkpoint(small_model, run / "checkpoints" / "step_0000010", files={"vocab.txt": vocab})
    model, tokenizer = build_inference_model(
        InferSchema(model=ModelSchema(preset="tiny", init_from=str(run)), test_file="-", output_file="-"))
    assert tokenizer.vocab_file == ckpt / "vocab.txt" and model.cfg == SMALL
    encoder = load_encoder(run, device="cpu")
    assert Path(encoder.vocab_file) == (ckpt / "vocab.txt").resolve()
    assert encoder.identity.model_sha256 == load_encoder(ckpt / WEIGHTS, device="cpu").identity.model_sha256


def test_export_then_import_without_paddlenlp(small_model, tmp_path):
    """Export → import is lossless (tensors and config) and reads the .pdparams without paddle.load."""
    out = export_paddlenlp(small_model, tmp_path / "pnlp")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model_state.pdparams"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folder left behind"
    assert detect_layout(out) == "paddlenlp"

    def refuse(*a, **k):
        raise AssertionError("paddle.load must not be used on checkpoints")

    orig = paddle.load
    paddle.load = refuse
    try:
        model = load_model(out).model
    finally:
        paddle.load = orig
    assert model.cfg == SMALL  # the exact config travels inside config.json
    a, b = state_to_numpy(small_model), state_to_numpy(model)
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_paddlenlp_key_conversion_fuses_and_splits_qkv(small_model):
    state = state_to_numpy(small_model)
    pn = ours_to_paddlenlp(state, SMALL)
    q = pn["vision_model.transformer.layers.1.self_attn.q_proj.weight"]
    v = pn["vision_model.transformer.layers.1.self_attn.v_proj.bias"]
    assert q.shape == (64, 64)
    assert np.array_equal(q, state["vision.blocks.1.attn.qkv.weight"][:, :64])
    assert np.array_equal(v, state["vision.blocks.1.attn.qkv.bias"][128:])
    assert pn["vision_model.positional_embedding.weight"].shape == (197, 64)
    back = paddlenlp_to_ours(pn)
    assert set(back) == set(state) and all(np.array_equal(back[k], state[k]) for k in state)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_init_from_through_run_training(tmp_path):
    """``model.init_from=CKPT``: with lr 0 the run's final checkpoint equals the one it started from.
    The run's fixed vocab (``model.vocab_file``) is a small stand-in built here."""
    from hydra import compose, initialize_config_dir

    from ernievil2.models.schema import resolve_model
    from ernievil2.train.config import register_schemas, validate
    from ernievil2.train.run import run_training

    register_schemas()
    vocab_file = WordPieceTokenizer.build_vocab(["a red circle left of a blue square", "一个红色的圆形"],
                                                tmp_path / "vocab.txt", vocab_size=100)
    overrides = [
        "data.demo.n_train=64", "data.demo.n_val=16", "data.demo.samples_per_shard=32",
        f"data.demo.cache_dir={tmp_path / 'demo'}", "data.batch_size=8", "data.num_workers=0",
        "data.shuffle_buffer=16", "trainer.device=cpu", "logger.backend=none", "eval=none",
        "trainer.max_steps=2", "optim.lr=0", "optim.warmup_steps=0", "model.vision.layers=1",
        "model.text.layers=1", f"model.vocab_file={vocab_file}",
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    vocab = WordPieceTokenizer(vocab_file).vocab_size
    model_cfg = resolve_model(validate(cfg).model, vocab, built_vocab=False)
    init = save_checkpoint(_seeded_model(model_cfg, 1234), tmp_path / "init")

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides + [f"model.init_from={init}"])
    run_training(cfg, tmp_path / "run")
    final = sorted((tmp_path / "run" / "checkpoints").glob("step_*"))[-1]
    a, b = load_file(str(init / WEIGHTS)), load_file(str(final / WEIGHTS))
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    # Control: without init_from the same run ends elsewhere (its own random init).
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    run_training(cfg, tmp_path / "run0")
    c = load_file(str(sorted((tmp_path / "run0" / "checkpoints").glob("step_*"))[-1] / WEIGHTS))
    assert not np.array_equal(a["text.word_emb.weight"], c["text.word_emb.weight"])

    # A checkpoint of another architecture stops the run and names the file.
    other = save_checkpoint(_seeded_model(replace(model_cfg, vision=replace(model_cfg.vision, layers=2)), 1),
                            tmp_path / "other")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides + [f"model.init_from={other}"])
    with pytest.raises(CheckpointMismatchError) as e:
        run_training(cfg, tmp_path / "run2")
    assert str(other / WEIGHTS) in str(e.value) and "unexpected keys" in str(e.value)
    assert all(k.startswith("vision.blocks.1.") for k in e.value.unexpected)


# ----------------------------------------------------------------------------- PaddleNLP parity

@pytest.fixture(scope="module")
def paddlenlp_saved(tmp_path_factory):
    """A random-initialised small PaddleNLP ErnieViLModel and its save_pretrained folder."""
    transformers = pytest.importorskip("paddlenlp.transformers", reason=NEEDS_PADDLENLP)
    paddle.seed(2024)
    config = transformers.ErnieViLConfig(
        text_config=dict(vocab_size=40000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=128, max_position_embeddings=64),
        vision_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                           image_size=224, patch_size=16),
    )
    model = transformers.ErnieViLModel(config)
    model.eval()
    out = tmp_path_factory.mktemp("paddlenlp") / "ernie_vil_small"
    model.save_pretrained(str(out))
    return transformers, model, out


@pytest.mark.slow
def test_paddlenlp_import_parity_on_real_data(paddlenlp_saved, real_batch):
    transformers, ref, folder = paddlenlp_saved
    assert detect_layout(folder) == "paddlenlp"
    ours = load_model(folder).model
    # PaddleNLP runs the text LayerNorms at eps 1e-12 whatever config.json says; the vision ones at 1e-6.
    assert ours.cfg.text.ln_eps == 1e-12 and ours.cfg.vision.ln_eps == 1e-6
    ref_img, ref_txt = _paddlenlp_embeddings(ref, real_batch)
    img, txt = _ours(ours, real_batch)
    d_img, d_txt = float(np.abs(img - ref_img).max()), float(np.abs(txt - ref_txt).max())
    print(f"\nPaddleNLP import parity, max |Δ|: image {d_img:.3g}, text {d_txt:.3g}")
    assert d_img <= PARITY_ATOL and d_txt <= PARITY_ATOL, (d_img, d_txt)
    # Sanity: the embeddings are not degenerate (distinct rows).
    assert np.abs(img[0] - img[1]).max() > 1e-3 and np.abs(txt[0] - txt[1]).max() > 1e-3


@pytest.mark.slow
def test_paddlenlp_export_round_trip(paddlenlp_saved, real_batch, released_vocab, tmp_path):
    transformers, ref, folder = paddlenlp_saved
    ours = load_model(folder).model
    out = export_paddlenlp(ours, tmp_path / "export", vocab_file=released_vocab)

    # Export → import: identical tensors.
    back = load_model(out).model
    a, b = state_to_numpy(ours), state_to_numpy(back)
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert back.cfg == ours.cfg

    # The exported tensors equal PaddleNLP's own, key for key.
    theirs = {k: v.numpy() for k, v in ref.state_dict().items()}
    exported = ours_to_paddlenlp(a, ours.cfg)
    assert set(exported) == set(theirs)
    assert all(np.array_equal(exported[k], theirs[k]) for k in theirs)

    # PaddleNLP loads the export and gives our embeddings.
    loaded = transformers.ErnieViLModel.from_pretrained(str(out))
    img, txt = _ours(ours, real_batch)
    p_img, p_txt = _paddlenlp_embeddings(loaded, real_batch)
    d_img, d_txt = float(np.abs(img - p_img).max()), float(np.abs(txt - p_txt).max())
    print(f"\nexport → PaddleNLP parity, max |Δ|: image {d_img:.3g}, text {d_txt:.3g}")
    assert d_img <= PARITY_ATOL and d_txt <= PARITY_ATOL, (d_img, d_txt)

    # Its tokenizer reads the exported vocab and agrees with ours on the captions.
    tok = transformers.ErnieViLTokenizer.from_pretrained(str(out))
    ids = tok(real_batch["captions"], max_length=48, padding="max_length", truncation=True)["input_ids"]
    assert np.array_equal(np.asarray(ids), real_batch["ids"])


@pytest.mark.slow
def test_export_of_our_model_runs_in_paddlenlp(small_model, real_batch, tmp_path, caplog):
    """A model trained here (text eps 1e-5) exports and runs in PaddleNLP: identical image
    embeddings; the text ones differ only through PaddleNLP's fixed 1e-12 text LayerNorm eps."""
    transformers = pytest.importorskip("paddlenlp.transformers", reason=NEEDS_PADDLENLP)
    with caplog.at_level("WARNING", logger="ernievil2.weights.save"):
        out = export_paddlenlp(small_model, tmp_path / "export")
    assert "eps" in caplog.text
    loaded = transformers.ErnieViLModel.from_pretrained(str(out))
    img, txt = _ours(small_model, real_batch)
    p_img, p_txt = _paddlenlp_embeddings(loaded, real_batch)
    assert float(np.abs(img - p_img).max()) <= PARITY_ATOL
    # The same model run at PaddleNLP's eps matches PaddleNLP's text embeddings.
    same = build_model(replace(SMALL, text=replace(SMALL.text, ln_eps=PADDLENLP_TEXT_LN_EPS)))
    load_state_into(same, state_to_numpy(small_model), "small_model")
    _, txt_eps = _ours(same, real_batch)
    d_eps = float(np.abs(txt - p_txt).max())
    print(f"\ntext eps 1e-5 vs PaddleNLP's 1e-12 on a random-init model: max |Δ| {d_eps:.3g}")
    assert float(np.abs(txt_eps - p_txt).max()) <= PARITY_ATOL
