"""The procedural demo dataset: determinism, caching, held-out compositions, captions and rendering."""
from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from ernievil2.data import demo
from ernievil2.data.demo import (
    COLOUR_RGB,
    COLOURS,
    COLOURS_ZH,
    SHAPES,
    SHAPES_ZH,
    DemoDataSpec,
    SceneObject,
    all_captions,
    ensure_demo_data,
    scene_captions,
    scene_from_meta,
    val_scenes,
)
from ernievil2.data.sample import RawSample
from ernievil2.data.shard_reader import iter_samples

SPEC = DemoDataSpec(n_train=200, n_val=50, image_size=64, seed=0, samples_per_shard=64)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    return ensure_demo_data(root, SPEC)


@pytest.fixture(scope="module")
def samples(small) -> dict[str, list[RawSample]]:
    return {
        "train": list(iter_samples(small.train_shards)),
        "val": list(iter_samples(small.val_shards)),
    }


def test_layout_and_counts(small, samples):
    assert small.root.name.startswith("demo-v1-")
    assert [Path(s).name for s in small.train_shards] == [f"demo-train-{i:06d}.tar" for i in range(4)]
    assert len(small.val_shards) == 1
    sizes = json.loads((small.train_dir / "sizes.json").read_text())
    assert sizes == {"demo-train-000000.tar": 64, "demo-train-000001.tar": 64, "demo-train-000002.tar": 64, "demo-train-000003.tar": 8}
    assert len(samples["train"]) == 200 and len(samples["val"]) == 50
    keys = [s.key for split in samples.values() for s in split]
    assert len(set(keys)) == 250
    # nothing but the finished dataset is left under root
    assert [p.name for p in small.root.parent.iterdir()] == [small.root.name]


def test_deterministic_bytes(small, tmp_path):
    other = ensure_demo_data(tmp_path, SPEC)
    assert other.root.name == small.root.name
    for a, b in zip(small.train_shards + small.val_shards, other.train_shards + other.val_shards):
        assert Path(a).read_bytes() == Path(b).read_bytes()
    for split in ("train", "val"):
        assert (small.root / split / "sizes.json").read_bytes() == (other.root / split / "sizes.json").read_bytes()
    assert (small.root / "manifest.json").read_bytes() == (other.root / "manifest.json").read_bytes()


def test_cache_reuse(small, monkeypatch):
    before = {p: Path(p).stat().st_mtime_ns for p in small.train_shards + small.val_shards}

    def must_not_run(*args, **kwargs):
        raise AssertionError("cached demo data was regenerated")

    monkeypatch.setattr(demo.dataset, "_write_split", must_not_run)  # where ensure_demo_data looks it up
    again = ensure_demo_data(small.root.parent, SPEC)
    assert again.train_shards == small.train_shards and again.val_shards == small.val_shards
    assert {p: Path(p).stat().st_mtime_ns for p in before} == before
    # another spec is another folder
    assert DemoDataSpec(seed=1).digest() != DemoDataSpec().digest()


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = demo.dataset.make_sample

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 30:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(demo.dataset, "make_sample", flaky)
    with pytest.raises(KeyboardInterrupt):
        ensure_demo_data(tmp_path, SPEC)
    assert list(tmp_path.iterdir()) == []


def test_val_descriptions_unique_and_unseen_in_train(samples):
    val = [s.meta["description"] for s in samples["val"]]
    train = {s.meta["description"] for s in samples["train"]}
    assert len(set(val)) == len(val)
    assert not set(val) & train
    n_objects = Counter(len(s.objects) for s in samples["val"])
    assert n_objects[1] <= 1 and n_objects[2] + n_objects[3] >= 49
    assert Counter(len(s.objects) for s in samples["train"]).keys() == {1, 2, 3}


def test_default_val_split_is_held_out_compositions():
    scenes = val_scenes(500, 0)
    assert len(set(scenes)) == 500
    counts = Counter(len(s) for s in scenes)
    assert counts[1] <= 6 and counts[2] >= 200 and counts[3] >= 200
    held = set(scenes)
    rng = np.random.default_rng(0)
    assert all(demo.train_scene(rng, held) not in held for _ in range(2000))


def _words(text: str, vocab) -> set[str]:
    return {w for w in vocab if w in text}


def test_captions_tags_and_languages(samples):
    for s in samples["train"] + samples["val"]:
        scene = scene_from_meta(s.meta)
        assert s.lang == "mul"
        assert s.objects == [o.tag for o in scene] and len(s.objects) == len(scene)
        assert s.meta["objects_zh"] == [o.tag_zh for o in scene]
        langs = s.meta["languages"]
        assert len(langs) == len(s.captions)
        en = [c for c, lang in zip(s.captions, langs) if lang == "en"]
        zh = [c for c, lang in zip(s.captions, langs) if lang == "zh"]
        assert len(set(en)) >= 2 and len(set(zh)) >= 2
        assert set(en) <= set(all_captions(scene, "en")) and set(zh) <= set(all_captions(scene, "zh"))
        colours = {o.colour for o in scene}
        shapes = {o.shape for o in scene}
        for c in en:
            assert _words(c, COLOURS) == colours and _words(c, SHAPES) == shapes, c
            assert all(o.size in c for o in scene)
        for c in zh:
            assert _words(c, [COLOURS_ZH[k][0] for k in COLOURS]) == {COLOURS_ZH[k][0] for k in colours}, c
            assert _words(c, SHAPES_ZH.values()) == {SHAPES_ZH[k] for k in shapes}, c
            assert not any(ch.isascii() and ch.isalpha() for ch in c), c  # no Latin letters in zh text


def test_caption_semantics_of_a_known_scene():
    scene = (SceneObject("large", "red", "circle"), SceneObject("small", "blue", "square"))
    en, zh = all_captions(scene, "en"), all_captions(scene, "zh")
    assert "a large red circle to the left of a small blue square" in en
    assert "a small blue square to the right of a large red circle" in en
    assert "from left to right: large red circle, small blue square" in en
    assert "一个大的红色圆形在一个小的蓝色正方形的左边" in zh
    assert "从左到右：大红圆形、小蓝正方形" in zh
    three = scene + (SceneObject("small", "white", "star"),)
    assert "a large red circle, a small blue square and a small white star from left to right" in all_captions(three, "en")
    assert len(set(all_captions(three, "zh"))) == len(all_captions(three, "zh"))
    caps = scene_captions(scene, np.random.default_rng(0))
    assert len(caps) == 4 and len(set(caps)) == 4 and set(caps[:2]) <= set(en) and set(caps[2:]) <= set(zh)
    with pytest.raises(ValueError):
        all_captions(scene, "fr")


def _colour_mask(rgb: np.ndarray, colour: str, tol: float = 60.0) -> np.ndarray:
    diff = rgb.astype(np.float32) - np.asarray(COLOUR_RGB[colour], dtype=np.float32)
    return np.sqrt((diff**2).sum(-1)) < tol


def test_rendered_colours_and_left_to_right_order(samples):
    checked_order = 0
    for s in samples["val"] + samples["train"][:60]:
        scene = scene_from_meta(s.meta)
        bgr = cv2.imdecode(np.frombuffer(s.image, np.uint8), cv2.IMREAD_COLOR)
        assert bgr.shape == (64, 64, 3)
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        present = {o.colour for o in scene}
        for colour in COLOURS:
            n = int(_colour_mask(rgb, colour).sum())
            if colour in present:
                assert n >= 15, (s.key, colour, n)
            else:
                assert n <= 4, (s.key, colour, n)
        # background is dark: most pixels are near black
        assert (rgb.max(-1) < 60).mean() > 0.5
        if len(present) == len(scene) and len(scene) > 1:
            xs = [np.nonzero(_colour_mask(rgb, o.colour))[1].mean() for o in scene]
            assert xs == sorted(xs), (s.key, s.meta["description"], xs)
            checked_order += 1
    assert checked_order > 50


_AREA_FACTOR = {"circle": np.pi, "square": 1.7**2, "triangle": 1.8, "star": 1.32}


def test_large_objects_are_larger(samples):
    for s in samples["train"]:
        scene = scene_from_meta(s.meta)
        if len(scene) == 1:
            rgb = cv2.cvtColor(cv2.imdecode(np.frombuffer(s.image, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
            n = int(_colour_mask(rgb, scene[0].colour).sum())
            # area = factor * r^2 with r = 0.08 * 64 (small) or 0.14 * 64 (large): 3x apart; split at the geometric mean
            threshold = _AREA_FACTOR[scene[0].shape] * (0.08 * 64) * (0.14 * 64)
            assert (n > threshold) == (scene[0].size == "large"), (s.key, s.meta["description"], n, threshold)


# ------------------------------------------------------------------------------------------------
# Web-likeness knobs: detector-like tags, mismatched captions (the val split stays clean)
# ------------------------------------------------------------------------------------------------

WEB = DemoDataSpec(n_train=3000, n_val=50, image_size=32, seed=0, samples_per_shard=1000,
                   tags="detector", tag_recall=0.6, false_tags=0.3, mismatch=0.2)


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_web")
    clean = dataclasses.replace(WEB, tags="exact", mismatch=0.0)
    return {
        name: {split: list(iter_samples(getattr(d, f"{split}_shards")))
               for split in ("train", "val")} | {"data": d}
        for name, d in (("web", ensure_demo_data(root, WEB)), ("clean", ensure_demo_data(root, clean)))
    }


def test_detector_tags_have_the_requested_recall_and_false_rate(web):
    train = web["web"]["train"]
    n_objects = sum(len(s.meta["scene"]) for s in train)
    recall = sum(len(s.meta["detected"]) for s in train) / n_objects
    false_rate = sum(bool(s.meta["false_tags"]) for s in train) / len(train)
    assert abs(recall - 0.6) <= 0.02 and abs(false_rate - 0.3) <= 0.02
    for s in train:
        scene = scene_from_meta(s.meta)
        shapes = {o.shape for o in scene}
        # tags: the shapes of the detected objects plus the false ones, which are absent shapes
        assert sorted(s.objects) == sorted([scene[i].shape for i in s.meta["detected"]] + s.meta["false_tags"])
        assert all(f not in shapes for f in s.meta["false_tags"]) and len(s.meta["false_tags"]) <= 1
        assert [SHAPES_ZH[t] for t in s.objects] == s.meta["objects_zh"]


def test_category_and_attribute_tags(tmp_path):
    category = ensure_demo_data(tmp_path, dataclasses.replace(WEB, n_train=300, tags="category", mismatch=0.0))
    for s in iter_samples(category.train_shards):
        assert s.objects == [o.shape for o in scene_from_meta(s.meta)]
    spec = dataclasses.replace(WEB, tags="detector", tag_recall=1.0, false_tags=0.0, tag_attributes=0.5,
                               attribute_error=0.25, mismatch=0.0)
    samples = list(iter_samples(ensure_demo_data(tmp_path, spec).train_shards))
    with_colour = right = total = 0
    for s in samples:
        scene = scene_from_meta(s.meta)
        by_shape = {}
        for o in scene:
            by_shape.setdefault(o.shape, set()).add(o.colour)
        for tag in s.objects:
            total += 1
            words = tag.split()
            assert words[-1] in by_shape
            if len(words) == 2:
                with_colour += 1
                right += words[0] in by_shape[words[-1]]
    assert abs(with_colour / total - 0.5) <= 0.02
    assert abs(right / with_colour - 0.75) <= 0.03  # a wrong colour can still name another object's


def test_mismatch_is_exact_and_keeps_image_and_tags(web):
    train, clean = web["web"]["train"], web["clean"]["train"]
    swapped = [s for s in train if "caption_scene" in s.meta]
    assert len(swapped) == round(0.2 * len(train)) == 600
    for s, c in zip(train, clean):
        assert s.key == c.key and s.image == c.image  # images never depend on the knobs
        scene = scene_from_meta(s.meta)
        if "caption_scene" in s.meta:
            donor = scene_from_meta({"scene": s.meta["caption_scene"]})
            assert donor != scene
            assert set(s.captions[:2]) <= set(all_captions(donor, "en"))
            assert set(s.captions[2:]) <= set(all_captions(donor, "zh"))
        else:
            assert s.captions == c.captions


def test_evaluation_split_is_unchanged_by_the_knobs(web):
    for a, b in zip(web["web"]["data"].val_shards, web["clean"]["data"].val_shards):
        assert Path(a).read_bytes() == Path(b).read_bytes()
    assert all(s.objects == [o.tag for o in scene_from_meta(s.meta)] for s in web["web"]["val"])


def test_clean_spec_keeps_its_cache_name_and_knobs_are_checked():
    # The clean demo's folder name only hashes the fields it had before the knobs existed.
    assert dataclasses.replace(SPEC, tag_recall=0.1, false_tags=0.9).digest() == SPEC.digest()
    assert dataclasses.replace(SPEC, tags="category").digest() != SPEC.digest()
    with pytest.raises(ValueError, match="data.demo.tags"):
        DemoDataSpec(tags="perfect")
    with pytest.raises(ValueError, match="data.demo.mismatch"):
        DemoDataSpec(mismatch=1.5)
    with pytest.raises(ValueError, match="data.demo.tag_recall"):
        DemoDataSpec(tags="detector", tag_recall=-0.1)
