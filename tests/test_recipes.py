"""The economies of a multi-view step and the recipes built from them: shared image view, patch
dropout, low-resolution auxiliary views, auxiliary terms on a fraction of the batch, the paper's
computation kept as ``loss=multiview_paper``, and the training-time budget with its schedule."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import paddle
import pytest
from hydra import compose, initialize_config_dir

from ernievil2.data.sample import RawSample
from ernievil2.data.views import MultiViewTransform, ViewConfig, photometric_params
from ernievil2.losses import FeatureExchange, LossConfig, MultiViewLoss, aux_rows, nt_xent
from ernievil2.models import build_model
from ernievil2.models.config import model_config
from ernievil2.models.flops import text_forward_flops, view_flops_per_sample
from ernievil2.models.vision import drop_patches, kept_patches
from ernievil2.train.config import register_schemas, validate
from ernievil2.train.optim import WarmupCosine, cosine_on_budget
from ernievil2.train.step import encode_views, merge_micro_batches

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
register_schemas()


def _loss_cfg(name: str) -> LossConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return validate(compose(config_name="config", overrides=[f"loss={name}"])).loss


def fixed_batch(b: int = 6, seed: int = 0) -> dict[str, np.ndarray]:
    """A deterministic batch of every view: random uint8 pixels, SimCLR draws (jitter, grey, blur),
    ids ``[CLS] pieces [SEP]`` padded with 0, tags on rows 0, 2, 3, 5."""
    rng = np.random.default_rng(seed)
    batch = {k: rng.integers(0, 256, (b, 64, 64, 3), dtype=np.uint8) for k in ("image", "image_view1", "image_view2")}
    for v in ("image_view1", "image_view2"):
        batch[v + "_photometric"] = np.stack([
            photometric_params(rng.permutation(4), (1.2, 0.8, 1.1, 0.05), i % 2 == 0, 0.8 if i % 3 == 0 else 0.0, 3)
            for i in range(b)])
    for k in ("caption_ids", "text_view_ids", "objects_ids"):
        ids = np.zeros((b, 12), dtype=np.int64)
        for i in range(b):
            n = int(rng.integers(3, 10))
            ids[i, 0], ids[i, 1:n + 1], ids[i, n + 1] = 2, rng.integers(5, 200, n), 3
        batch[k] = ids
    batch["has_objects"] = np.array([1, 0, 1, 1, 0, 1], dtype=np.float32)[:b]
    return batch


def _tiny_model(seed: int = 0):
    paddle.seed(seed)
    return build_model(model_config("tiny", text={"vocab_size": 200}))


# ------------------------------------------------------------------ the paper's computation


def test_multiview_paper_reproduces_the_published_four_term_values():
    """``loss=multiview_paper`` on a fixed batch and seed gives the values the four-term loss gave
    before the economies existed (computed at commit 53c0532 with the same batch, model seed and
    ``LossConfig()``)."""
    cfg = _loss_cfg("multiview_paper")
    assert (cfg.shared_image_view, cfg.aux_fraction, dict(cfg.patch_dropout)) == (False, 1.0, {})
    model = _tiny_model()
    model.train()
    batch = fixed_batch()
    loss = MultiViewLoss(cfg)
    feats, scale = encode_views(model, batch, loss.required_views, True)
    out = {k: float(v) for k, v in loss(feats, scale, paddle.to_tensor(batch["has_objects"])).items()}
    before = {"loss": 8.174830436706543, "image_caption": 1.792022705078125, "image_objects": 1.587785243988037,
              "image_image": 2.3972504138946533, "text_text": 2.3977715969085693}
    assert out == pytest.approx(before, rel=1e-6)


# ------------------------------------------------------------------ shared image view


def test_shared_view_step_equals_separate_views_on_the_same_pixels():
    """With ``image_view1`` carrying exactly the caption view's pixels (no photometric change),
    the shared-view step (2 image forwards) gives every term the separate-view step gives (3)."""
    model = _tiny_model()
    model.eval()
    batch = fixed_batch()
    batch["image_view1"] = batch["image"].copy()
    batch["image_view1_photometric"] = np.stack([photometric_params(None, None, False, 0.0, 3)] * 6)
    mask = paddle.to_tensor(batch["has_objects"])
    separate = MultiViewLoss(LossConfig(shared_image_view=False))
    shared = MultiViewLoss(LossConfig(shared_image_view=True))
    assert separate.required_views == ("image", "caption", "objects", "image_view1", "image_view2", "text_view")
    assert shared.required_views == ("image", "caption", "objects", "image_view2", "text_view")
    f_sep, s_sep = encode_views(model, batch, separate.required_views)
    f_sh, s_sh = encode_views(model, batch, shared.required_views)
    out_sep = {k: float(v) for k, v in separate(f_sep, s_sep, mask).items()}
    out_sh = {k: float(v) for k, v in shared(f_sh, s_sh, mask).items()}
    assert out_sh == pytest.approx(out_sep, rel=1e-5)


def test_text_views_of_different_lengths_run_as_separate_passes():
    """Object tags shorter than the captions go through the text tower in their own pass, trimmed
    to their own length, and get the embeddings they get alone."""
    model = _tiny_model()
    model.eval()
    batch = fixed_batch()
    for key in ("caption_ids", "text_view_ids"):  # every caption and text view 12 tokens
        batch[key][:, 1:11] = np.maximum(batch[key][:, 1:11], 5)
        batch[key][:, 11] = 3
    batch["objects_ids"][:, 4:] = 0
    batch["objects_ids"][:, 3] = 3  # every tag text 4 tokens
    passes = []
    hook = model.text.register_forward_post_hook(lambda layer, inputs, out: passes.append(list(inputs[0].shape)))
    try:
        feats, _ = encode_views(model, batch, ("image", "caption", "objects", "text_view"))
    finally:
        hook.remove()
    assert passes == [[12, 12], [6, 4]]  # captions + text views together, the tags alone
    with paddle.no_grad():
        for view, key in (("caption", "caption_ids"), ("objects", "objects_ids"), ("text_view", "text_view_ids")):
            alone = model.encode_text(paddle.to_tensor(batch[key])).numpy()
            np.testing.assert_allclose(feats[view].numpy(), alone, rtol=0, atol=2e-6)



def test_recurring_texts_are_encoded_once_and_a_small_view_rides_along():
    """Detector tags: 16 rows whose tag texts are 3 distinct ones. Each distinct text is encoded
    once, and the 3 rows, padded to the captions' 12 tokens (36 of 192 tokens), join the captions'
    pass; every row's features equal the text encoded alone, and the gradient reaches each row."""
    model = _tiny_model()
    model.eval()
    batch = fixed_batch(16)
    batch["caption_ids"][:, 11] = 3  # every caption 12 tokens
    batch["caption_ids"][:, 1:11] = np.maximum(batch["caption_ids"][:, 1:11], 5)
    tags = np.zeros((3, 12), dtype=np.int64)
    tags[:, :4] = [[2, 50, 51, 3], [2, 60, 3, 0], [2, 50, 61, 3]]
    batch["objects_ids"] = tags[np.arange(16) % 3]
    passes = []
    hook = model.text.register_forward_post_hook(lambda layer, inputs, out: passes.append(list(inputs[0].shape)))
    try:
        feats, _ = encode_views(model, batch, ("image", "caption", "objects"))
    finally:
        hook.remove()
    assert passes == [[19, 12]]  # 16 captions + 3 distinct tag texts, one pass
    with paddle.no_grad():
        for view, key in (("caption", "caption_ids"), ("objects", "objects_ids")):
            alone = model.encode_text(paddle.to_tensor(batch[key])).numpy()
            np.testing.assert_allclose(feats[view].numpy(), alone, rtol=0, atol=2e-6)
    # rows 1, 4, 7, ... share text 1 (token 60): their gradients add up on its one encoding
    (feats["objects"][1::3] * paddle.arange(1, 6, dtype="float32").unsqueeze(1)).sum().backward()
    grad = model.text.word_emb.weight.grad.numpy()
    assert np.abs(grad[60]).sum() > 0 and np.abs(grad[51]).sum() == 0

def test_view_flops_count_object_tags_at_their_own_length():
    """Forward + backward = 3 × forward per view share; base text block by hand at 23 tokens."""
    cfg = model_config("base")
    t = cfg.text
    by_hand = t.layers * (2 * 23 * (4 * t.width**2 + 2 * t.width * t.ffn_dim) + 4 * 23**2 * t.width) + 2 * t.width**2
    flops = view_flops_per_sample(cfg, {"caption": 1.0, "objects": 0.5}, text_len=64, objects_len=23)
    assert flops["objects"] == 3 * 0.5 * by_hand
    assert flops["caption"] == 3 * text_forward_flops(t, 64)
    assert view_flops_per_sample(cfg, {"objects": 1.0}, text_len=64)["objects"] == 3 * text_forward_flops(t, 64)


@pytest.mark.slow
def test_step_cost_bench_runs_and_orders_the_recipes(tmp_path):
    """``bench/step_cost.py`` (one repeat): every recipe timed; per-sample FLOPs follow the views
    each recipe encodes (CLIP-only: image + caption; multiview adds the tags and one half-size SimCLR
    view; the paper's computation adds two full-size SimCLR views and the text view)."""
    out = tmp_path / "step_cost.json"
    proc = subprocess.run([sys.executable, str(CONF_DIR.parent / "bench" / "step_cost.py"), "--repeats", "1",
                           "--batch", "8", "--out", str(out)], check=True, capture_output=True, text=True, cwd=tmp_path)
    res = json.loads(out.read_text())
    assert (res["args"]["repeats"], res["args"]["batch"]) == (1, 8)
    steps = res["step_s"]
    assert list(steps) == ["clip_only", "multiview", "multiview_paper"]
    # the printed table reports the timings of the JSON file, each against clip_only
    rows = {line.split("|")[1].strip(): line.split("|")[2:4] for line in proc.stdout.splitlines()
            if line.startswith("| ") and line.split("|")[1].strip() in steps}
    assert {name: [c.strip() for c in cells] for name, cells in rows.items()} == {
        name: [f"{1e3 * sec:.1f}", f"{sec / steps['clip_only']:.2f}×"] for name, sec in steps.items()}, proc.stdout
    base = res["flops"]["base"]
    assert set(base["clip_only"]) == {"image", "caption"}
    assert set(base["multiview"]) == {"image", "caption", "objects", "image_view2"}
    # the SimCLR view at half the side: a quarter of the patches (and the class token)
    assert base["multiview"]["image_view2"] < 0.3 * base["multiview"]["image"]
    assert base["multiview"]["objects"] == base["multiview"]["caption"]  # --base-objects-len defaults to 64
    tiny = res["flops"]["tiny"]
    assert tiny["multiview"]["objects"] < tiny["multiview"]["caption"]  # 23-token tags against 32-token captions
    assert sum(base["multiview_paper"].values()) / sum(base["clip_only"].values()) == pytest.approx(3.0)


# ------------------------------------------------------------------ patch dropout


def test_drop_patches_keeps_the_requested_count_in_order():
    x = paddle.arange(2 * 16 * 3, dtype="float32").reshape([2, 16, 3])
    paddle.seed(3)
    kept = drop_patches(x, 0.5).numpy()
    assert kept.shape == (2, kept_patches(16, 0.5), 3) == (2, 8, 3)
    for b in range(2):
        rows = kept[b, :, 0] / 3 - 16 * b  # the original token index of each kept row
        assert np.all(np.diff(rows) > 0) and set(rows) <= set(range(16))
        np.testing.assert_array_equal(kept[b], x.numpy()[b][rows.astype(int)])
    assert kept_patches(16, 0.0) == 16 and kept_patches(4, 0.9) == 1
    with pytest.raises(ValueError, match="patch dropout"):
        kept_patches(16, 1.0)


def test_patch_dropout_keeps_cls_and_is_off_in_eval():
    model = _tiny_model()
    vision = model.vision
    seen: list[paddle.Tensor] = []
    hook = vision.blocks[0].register_forward_pre_hook(lambda layer, args: seen.append(args[0]))
    pixels = paddle.to_tensor(np.random.default_rng(0).standard_normal((3, 3, 64, 64)).astype("float32"))
    try:
        vision.train()
        vision(pixels, patch_dropout=0.75)
        tokens = seen[-1]
        assert tokens.shape[1] == 1 + kept_patches(16, 0.75) == 5
        cls = vision.ln_pre((vision.class_embedding + vision.positional_embedding[0]).reshape([1, -1])).numpy()[0]
        np.testing.assert_allclose(tokens[:, 0].numpy(), np.broadcast_to(cls, (3, cls.shape[-1])), rtol=1e-5, atol=1e-6)
        vision.eval()
        out_eval = vision(pixels, patch_dropout=0.75).numpy()
        assert seen[-1].shape[1] == 17
        np.testing.assert_array_equal(out_eval, vision(pixels).numpy())
    finally:
        hook.remove()


# ------------------------------------------------------------------ low-resolution views


def test_position_embeddings_identity_at_native_size_and_resampled_elsewhere(tmp_path):
    from ernievil2.weights.load import load_model
    from ernievil2.weights.save import save_checkpoint

    model = _tiny_model()
    vision = model.vision
    assert vision.position_embeddings(4, 4) is vision.positional_embedding  # identity: the parameter itself
    low = vision.position_embeddings(2, 2)
    assert list(low.shape) == [5, vision.cfg.width]
    np.testing.assert_array_equal(low[0].numpy(), vision.positional_embedding[0].numpy())  # class row kept
    # a constant grid stays constant under bicubic resampling
    const = paddle.concat([vision.positional_embedding[:1], paddle.full([16, vision.cfg.width], 0.5)])
    vision.positional_embedding.set_value(const)
    np.testing.assert_allclose(vision.position_embeddings(2, 2)[1:].numpy(), 0.5, rtol=1e-5)
    # the tower takes 32 px views, and the checkpoint keeps the native shape and loads into a fresh model
    emb = model.encode_image(paddle.zeros([2, 3, 32, 32]))
    assert list(emb.shape) == [2, vision.cfg.width]
    save_checkpoint(model, tmp_path / "ckpt")
    fresh = load_model(tmp_path / "ckpt").model
    assert list(fresh.vision.positional_embedding.shape) == [17, vision.cfg.width]
    np.testing.assert_array_equal(fresh.vision.positional_embedding.numpy(), const.numpy())


# ------------------------------------------------------------------ auxiliary fraction


def test_aux_rows_is_the_ceiling_of_the_fraction():
    assert [aux_rows(64, f) for f in (1.0, 0.5, 0.3, 0.01)] == [64, 32, 20, 1]
    with pytest.raises(ValueError, match="aux_fraction"):
        aux_rows(64, 0.0)
    with pytest.raises(ValueError, match="aux_fraction"):
        LossConfig(aux_fraction=1.5)
    with pytest.raises(ValueError, match="patch_dropout"):
        LossConfig(patch_dropout={"caption": 0.5})


class _Tok:
    """The smallest tokenizer the transform needs: one id per character."""

    pad_id, mask_id = 0, 4

    def encode(self, text, max_length):
        return [2, *[5 + (ord(c) % 50) for c in text][: max_length - 2], 3]

    def pad(self, rows, length):
        return np.array([list(r) + [0] * (length - len(r)) for r in rows], dtype=np.int64)


def _jpeg(seed: int) -> bytes:
    import cv2

    img = np.random.default_rng(seed).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    return cv2.imencode(".jpg", img)[1].tobytes()


def test_transform_makes_aux_views_only_on_the_rows_it_names():
    cfg = ViewConfig(image_size=32, aux_image_scale=0.5)
    views = ("image", "image_view2", "caption", "text_view", "objects")
    full = MultiViewTransform(cfg, _Tok(), 12, seed=1, views=views)
    part = MultiViewTransform(cfg, _Tok(), 12, seed=1, views=views, aux_views=("image_view2", "text_view", "objects"),
                              aux_rows=2)
    sample = RawSample(key="k1", image=_jpeg(1), captions=["a red ball", "一个红球"], objects=["ball"], lang="en")
    ref = full(sample)
    assert ref["image_view2"].shape == (16, 16, 3) and ref["image"].shape == (32, 32, 3)
    for row in (0, 1):  # rows with the auxiliary views: the same views as without a fraction
        out = part(sample, row=row)
        for k in ref:
            np.testing.assert_array_equal(out[k], ref[k])
    out = part(sample, row=2)
    np.testing.assert_array_equal(out["image"], ref["image"])
    np.testing.assert_array_equal(out["caption_ids"], ref["caption_ids"])
    assert not out["image_view2"].any() and not out["image_view2_photometric"].any()
    assert not out["text_view_ids"].any() and not out["objects_ids"].any() and float(out["has_objects"]) == 0.0


def test_aux_terms_use_exactly_the_first_rows():
    """Features of the auxiliary views for the first k rows: each auxiliary term equals the term
    computed on those k rows alone; image-caption keeps every row."""
    rng = np.random.default_rng(5)

    def normed(n):
        x = rng.standard_normal((n, 8))
        return paddle.to_tensor(x / np.linalg.norm(x, axis=1, keepdims=True))

    b, f = 8, 0.3
    k = aux_rows(b, f)
    loss = MultiViewLoss(LossConfig(shared_image_view=True, aux_fraction=f, intra_temperature=0.2))
    assert loss.aux_views == ("objects", "image_view2", "text_view")
    assert {v: loss.rows(v, b) for v in loss.required_views} == {
        "image": b, "caption": b, "objects": k, "image_view2": k, "text_view": k}
    feats = {"image": normed(b), "caption": normed(b), "objects": normed(k), "image_view2": normed(k), "text_view": normed(k)}
    mask = paddle.to_tensor(np.array([1, 0, 1, 1, 1, 1, 1, 1], dtype=np.float64))
    out = loss(feats, paddle.to_tensor(10.0, dtype="float64"), mask)
    ex = FeatureExchange()
    full = MultiViewLoss(LossConfig(shared_image_view=True, intra_temperature=0.2))
    first = {"image": feats["image"][:k], "caption": feats["caption"][:k], "objects": feats["objects"],
             "image_view2": feats["image_view2"], "text_view": feats["text_view"]}
    on_k = full(first, paddle.to_tensor(10.0, dtype="float64"), mask[:k])
    for term in ("image_objects", "image_image", "text_text"):
        assert float(out[term]) == pytest.approx(float(on_k[term]), rel=1e-12)
    assert float(out["image_image"]) == pytest.approx(float(nt_xent(feats["image"][:k], feats["image_view2"], 5.0, ex)))
    assert float(out["image_caption"]) != pytest.approx(float(on_k["image_caption"]))


def test_merge_micro_batches_keeps_pairs_aligned():
    lead = 2
    parts = [{"image": paddle.to_tensor([[10.0 * j + i] for i in range(4)]),
              "text_view": paddle.to_tensor([[10.0 * j + i] for i in range(lead)])} for j in range(2)]
    merged = merge_micro_batches(parts, lead)
    assert merged["image"].numpy().ravel().tolist() == [0, 1, 10, 11, 2, 3, 12, 13]
    assert merged["text_view"].numpy().ravel().tolist() == [0, 1, 10, 11]  # row i pairs with image row i


# ------------------------------------------------------------------ time budget


def test_cosine_on_budget_and_its_scheduler_state():
    assert cosine_on_budget(0, 4, 0.0, 0.0) == pytest.approx(0.25)
    assert cosine_on_budget(10, 4, 0.5, 0.0) == pytest.approx(0.5)
    assert cosine_on_budget(10, 4, 1.7, 0.1) == pytest.approx(0.1)
    sched = WarmupCosine(2e-3, 0, 10, time_budget_s=100.0)
    sched.elapsed_s = 25.0
    sched.step()
    assert sched.get_lr() == pytest.approx(2e-3 * 0.5 * (1 + math.cos(math.pi / 4)))
    state = sched.state_dict()
    again = WarmupCosine(2e-3, 0, 10, time_budget_s=100.0)
    again.set_state_dict(state)
    assert again.elapsed_s == 25.0 and again.get_lr() == pytest.approx(sched.get_lr())
    with pytest.raises(ValueError, match="time_budget_s"):
        WarmupCosine(1e-3, 0, 10, time_budget_s=0)


def test_temperature_learns_at_its_own_rate():
    from ernievil2.train.config import OptimSchema
    from ernievil2.train.optim import build_optimizer

    model = _tiny_model()
    opt, _ = build_optimizer(model, OptimSchema(lr=1e-2, warmup_steps=0, temperature_lr_scale=0.1, grad_clip=0.0), 10)
    t0 = model.temperature.item()
    w0 = model.vision.class_embedding.numpy().copy()
    (model.temperature.sum() + model.vision.class_embedding.sum()).backward()
    opt.step()
    # Adam's first step moves each parameter by about its learning rate
    assert t0 - model.temperature.item() == pytest.approx(1e-3, rel=1e-2)
    np.testing.assert_allclose(w0 - model.vision.class_embedding.numpy(), 1e-2, rtol=1e-2)


# ------------------------------------------------------------------ a sweep and its report


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_multirun_of_two_recipes_and_compare(tmp_path):
    """``launch/train.py -m`` over two recipes and two seeds under one training-time budget, then
    ``launch/compare.py`` over the jobs: the table has a row per recipe with its seeds, the PNG is
    written, every job stopped at its budget with its learning rate annealed."""
    import json
    import subprocess
    import sys

    from PIL import Image

    repo = Path(__file__).resolve().parents[1]
    sweep = tmp_path / "sweep"
    budget = 3.0
    small = ["data.demo.n_train=600", "data.demo.n_val=60", "data.demo.samples_per_shard=200",
             f"data.demo.cache_dir={tmp_path / 'demo'}", "data.batch_size=16", "data.num_workers=0",
             "trainer.device=cpu", "logger.log_every=1", "trainer.save_checkpoint=false"]
    cmd = [sys.executable, "launch/train.py", "-m", "loss=clip_only,multiview", "trainer.seed=1,2",
           f"trainer.time_budget_s={budget}", "trainer.max_steps=100000", "eval.every_n_steps=0",
           "eval.every_n_seconds=1", f"hydra.sweep.dir={sweep}", *small]
    subprocess.run(cmd, cwd=repo, check=True, capture_output=True, timeout=500)
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == 4
    for job in jobs:
        log = [json.loads(line) for line in (job / "train_log.jsonl").read_text().splitlines()]
        metrics = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]
        assert budget <= metrics[-1]["train_seconds"] < budget + 2.0
        assert len(metrics) >= 3  # about every training second, then at the end
        peak = max(r["lr"] for r in log)
        assert log[-1]["lr"] < 0.2 * peak, "the schedule follows the budget: annealed when the time is spent"
    out = tmp_path / "report"
    shown = subprocess.run([sys.executable, "launch/compare.py", *map(str, sweep.iterdir()), "--out", str(out)],
                           cwd=repo, check=True, capture_output=True, text=True, timeout=120).stdout
    table = (out / "compare.md").read_text()
    assert table in shown
    rows = [line for line in table.splitlines() if line.startswith("| clip_only") or line.startswith("| multiview")]
    assert len(rows) == 2
    clip_row = next(r for r in rows if r.startswith("| clip_only"))
    assert "| 2 |" in clip_row and "1.00×" in clip_row and "1: " in clip_row and "2: " in clip_row
    with Image.open(out / "compare.png") as png:
        assert png.format == "PNG" and png.size[0] >= 600


def test_aux_from_ramps_the_auxiliary_terms_in():
    """``aux_from``: image-caption alone at the start (the objects view not even encoded), the
    auxiliary weights rising linearly to full at the given fraction; combined with ``aux_until``
    the smaller factor applies."""
    loss = MultiViewLoss(LossConfig(image_image=0, text_text=0, aux_from=0.25))
    assert [loss.aux_weight(p) for p in (0.0, 0.125, 0.25, 0.9)] == pytest.approx([0.0, 0.5, 1.0, 1.0])
    assert loss.views_at(0.0) == ("image", "caption") and loss.views_at(0.1) == ("image", "caption", "objects")
    both = MultiViewLoss(LossConfig(aux_from=0.2, aux_until=0.8))
    assert [both.aux_weight(p) for p in (0.1, 0.5, 0.7)] == pytest.approx([0.5, 0.375, 0.125])
    with pytest.raises(ValueError, match="aux_from"):
        LossConfig(aux_from=1.5)
    with pytest.raises(ValueError, match="aux_from"):
        MultiViewLoss(LossConfig(image_caption=0, aux_from=0.5))


def test_aux_until_fades_the_auxiliary_terms_then_drops_their_views():
    loss = MultiViewLoss(LossConfig(shared_image_view=True, aux_until=0.4))
    assert [loss.aux_weight(p) for p in (0.0, 0.2, 0.4, 0.9)] == pytest.approx([1.0, 0.5, 0.0, 0.0])
    assert loss.views_at(0.1) == loss.required_views
    assert loss.views_at(0.5) == ("image", "caption")
    rng = np.random.default_rng(6)
    feats = {k: paddle.to_tensor(rng.standard_normal((4, 8))) for k in loss.required_views}
    feats = {k: v / paddle.linalg.norm(v, axis=1, keepdim=True) for k, v in feats.items()}
    mask = paddle.ones([4], dtype="float64")
    scale = paddle.to_tensor(10.0, dtype="float64")
    full, half = loss(feats, scale, mask, 0.0), loss(feats, scale, mask, 0.2)
    aux = ("image_objects", "image_image", "text_text")
    assert float(half["loss"]) == pytest.approx(float(half["image_caption"]) + 0.5 * sum(float(half[t]) for t in aux))
    assert float(full["loss"]) == pytest.approx(sum(float(full[t]) for t in ("image_caption", *aux)))
    late = loss({k: feats[k] for k in ("image", "caption")}, scale, mask, 0.6)
    assert set(late) == {"loss", "image_caption"}
    with pytest.raises(ValueError, match="aux_until"):
        MultiViewLoss(LossConfig(image_caption=0.0, aux_until=0.5))


def _readme_sweep_command() -> list[str]:
    """The arguments of the README's ``launch/train.py -m`` sweep command (continuation lines joined)."""
    import shlex

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8").replace("\\\n", " ")
    lines = [line for line in text.splitlines() if line.startswith("python launch/train.py -m ")]
    assert len(lines) == 1, lines
    return shlex.split(lines[0])[3:]


def test_readme_sweep_command_composes_for_every_job():
    """Every job of the README's sweep composes and validates, with the budget it names."""
    import itertools

    args = _readme_sweep_command()
    sweeps = [a.split("=", 1) for a in args if "," in a.split("=", 1)[1]]
    fixed = [a for a in args if "," not in a.split("=", 1)[1]]
    assert {k for k, _ in sweeps} == {"trainer.seed", "loss"}
    names = set()
    for values in itertools.product(*[v.split(",") for _, v in sweeps]):
        overrides = fixed + [f"{k}={v}" for (k, _), v in zip(sweeps, values)]
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = validate(compose(config_name="config", overrides=overrides))
        assert cfg.trainer.time_budget_s == 240 and cfg.eval.every_n_seconds == 60
        names.add(cfg.loss.name)
    assert names == {"clip_only", "multiview", "multiview_paper"}


def test_compare_counts_runs_stalled_at_chance(tmp_path):
    """A run whose image-caption loss is still ≥ 0.95 · ln B a quarter of the way through its
    training seconds counts as stalled; the table says how many runs of a recipe did."""
    import json

    from ernievil2.compare import load_runs, markdown_table, summary_rows

    def run(name: str, seed: int, losses: list[tuple[float, float]]) -> Path:
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"data": {"batch_size": 64}, "trainer": {"seed": seed},
                                                   "loss": {"name": "multiview"}}))
        (d / "metrics.jsonl").write_text(json.dumps({"dataset": "demo_val", "protocol": "multi", "mean_recall": 40.0,
                                                     "step": 100, "train_seconds": 160.0}) + "\n")
        (d / "train_log.jsonl").write_text("".join(
            json.dumps({"step": i, "image_caption": v, "train_seconds": t}) + "\n" for i, (t, v) in enumerate(losses)))
        return d

    ln64 = np.log(64)
    stalled = run("a", 0, [(10.0, ln64), (39.0, ln64), (41.0, 0.96 * ln64), (100.0, 2.0)])
    moving = run("b", 1, [(10.0, ln64), (41.0, 0.9 * ln64), (100.0, 2.0)])
    runs = load_runs([stalled, moving])
    assert [r.stalled for r in runs] == [True, False]
    rows = summary_rows(runs)
    assert rows[0]["stalled"] == 1
    assert "| stalled at ¼ |" in markdown_table(rows) and "| 1 | 0: 40.00, 1: 40.00 |" in markdown_table(rows)
