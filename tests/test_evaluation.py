"""Evaluation-set readers, their errors, the protocols, and sharded == single-process evaluation."""
from __future__ import annotations

import base64
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import dist_eval_worker
import numpy as np
import paddle
import pytest

from ernievil2.data.sample import RawSample
from ernievil2.data.shard_writer import ShardWriter
from ernievil2.distributed import DistInfo, shard_range
from ernievil2.evaluators.retrieval import (
    EvalDataError,
    EvalSetSpec,
    RetrievalEvaluator,
    embed,
    eval_set_spec,
    first_caption_per_image,
    items_to_set,
    load_retrieval_set,
    read_items,
)
from ernievil2.retrieval import multi_caption_recall, official_recall
from ernievil2.tokenizer import WordPieceTokenizer
from ernievil2.train.config import EvalSetSchema

REPO_ROOT = Path(__file__).resolve().parents[1]
WORDS = ["red", "blue", "green", "dog", "cat", "car", "tree", "house", "boat", "bird", "sky", "road"]


def _jpeg(seed: int, h: int = 20, w: int = 28) -> bytes:
    rng = np.random.default_rng(seed)
    ok, buf = cv2.imencode(".jpg", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    assert ok
    return buf.tobytes()


def _captions(k: int, n: int) -> list[str]:
    return [f"a {WORDS[(k + j) % len(WORDS)]} {WORDS[(3 * k + 2 * j + 1) % len(WORDS)]}" for j in range(n)]


def _write_jsonl(root: Path, n_images: int = 5, key: str = "captions_en") -> Path:
    """The layout of ../shared/data/*/captions.jsonl; image k has 1 + k % 3 captions."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for k in range(n_images):
        (root / "images" / f"im{k}.jpg").write_bytes(_jpeg(k))
        lines.append(json.dumps({"image": f"images/im{k}.jpg", "image_id": f"id{k}", key: _captions(k, 1 + k % 3)}))
    path = root / "captions.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _write_karpathy(root: Path) -> Path:
    (root / "imgs" / "sub").mkdir(parents=True, exist_ok=True)
    images = []
    for k, split in enumerate(["test", "train", "test", "val", "test"]):
        name = f"{k}.jpg"
        (root / "imgs" / "sub" / name).write_bytes(_jpeg(10 + k))
        images.append({"filename": name, "filepath": "sub", "split": split,
                       "sentences": [{"raw": c, "tokens": c.split()} for c in _captions(k, 2)]})
    path = root / "dataset_flickr30k.json"
    path.write_text(json.dumps({"images": images, "dataset": "flickr30k"}), encoding="utf-8")
    return path


def _write_seed_tsv(path: Path) -> Path:
    """Lines 1..6 over image ids a, b, a, c, b, a (three texts of a, two of b)."""
    ids = ["a", "b", "a", "c", "b", "a"]
    b64 = {i: base64.b64encode(_jpeg(20 + n)).decode() for n, i in enumerate("abc")}
    path.write_text("".join(f"{c}\t{i}\t{b64[i]}\n" for c, i in zip(_captions(0, 6), ids)), encoding="utf-8")
    return path


def _write_chinese_clip(root: Path) -> Path:
    """Chinese-CLIP's layout (``test_imgs.tsv`` + ``test_texts.jsonl``), 7 images; no text lists
    images 1, 4 and 6 (text->image distractors, in both ranks' shares of two)."""
    root.mkdir(parents=True)
    (root / "test_imgs.tsv").write_text(
        "".join(f"{50 + k}\t{base64.b64encode(_jpeg(40 + k)).decode()}\n" for k in range(7)), encoding="utf-8")
    texts = [[50], [52, 53], [55], [50], [53]]
    (root / "test_texts.jsonl").write_text("".join(
        json.dumps({"text_id": t, "text": c, "image_ids": ids}) + "\n" for t, (c, ids) in enumerate(zip(_captions(3, 5), texts))),
        encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> WordPieceTokenizer:
    vocab = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    WordPieceTokenizer.build_vocab([" ".join(["a", *WORDS])], vocab, vocab_size=200)
    return WordPieceTokenizer(vocab, max_length=dist_eval_worker.MAX_LEN)


# --------------------------------------------------------------------------- readers
def test_jsonl_reader_and_cap(tmp_path):
    path = _write_jsonl(tmp_path)
    items = read_items(EvalSetSpec("j", "jsonl", str(path), caption_key="captions_en"))
    assert [i.key for i in items] == [f"id{k}" for k in range(5)]
    assert [len(i.captions) for i in items] == [1, 2, 3, 1, 2]
    assert items[2].captions == _captions(2, 3)
    assert items[3].load_image() == _jpeg(3)
    capped = read_items(EvalSetSpec("j", "jsonl", str(path), caption_key="captions_en", max_images=2))
    assert [i.key for i in capped] == ["id0", "id1"]
    # image_root moves the images; a missing caption key names the line
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "images").rename(tmp_path / "elsewhere" / "images")
    spec = EvalSetSpec("j", "jsonl", str(path), image_root=str(tmp_path / "elsewhere"), caption_key="captions_en")
    assert len(read_items(spec)) == 5
    with pytest.raises(EvalDataError, match=r"captions\.jsonl:1: no caption in 'captions_zh' \(key id0\)"):
        read_items(EvalSetSpec("j", "jsonl", str(path), image_root=str(tmp_path / "elsewhere"), caption_key="captions_zh"))


def test_jsonl_reader_names_file_and_line_of_bad_input(tmp_path):
    path = _write_jsonl(tmp_path)
    spec = EvalSetSpec("j", "jsonl", str(path), caption_key="captions_en")
    lines = path.read_text(encoding="utf-8").splitlines()
    path.write_text("\n".join(lines[:2] + ['{"image": "images/im2.jpg", "captions_en": ["x"]'] + lines[3:]) + "\n")
    with pytest.raises(EvalDataError, match=rf"{path}:3: invalid JSON"):
        read_items(spec)
    path.write_text("\n".join(lines) + "\n")
    (tmp_path / "images" / "im3.jpg").unlink()
    with pytest.raises(EvalDataError, match=rf"{path}:4: image file not found: .*im3\.jpg"):
        read_items(spec)
    (tmp_path / "images" / "im3.jpg").write_bytes(b"not an image")
    items = read_items(spec)
    with pytest.raises(EvalDataError, match=rf"{path}:4: "):
        items_to_set(items, 32, None, 8)


def test_karpathy_reader_selects_the_split(tmp_path):
    path = _write_karpathy(tmp_path)
    spec = EvalSetSpec("k", "karpathy", str(path), image_root=str(tmp_path / "imgs"))
    items = read_items(spec)
    assert [i.key for i in items] == ["0", "2", "4"]  # the file-name stem, as packed
    assert items[1].captions == _captions(2, 2) and items[1].load_image() == _jpeg(12)
    assert [i.key for i in read_items(EvalSetSpec("k", "karpathy", str(path), str(tmp_path / "imgs"), split="val"))] == ["3"]
    (tmp_path / "imgs" / "sub" / "2.jpg").unlink()
    with pytest.raises(EvalDataError, match=r"dataset_flickr30k\.json: images\[2\]: image file not found"):
        read_items(spec)
    path.write_text('{"images": [\n{"filename": "0.jpg",\n')
    with pytest.raises(EvalDataError, match=r"dataset_flickr30k\.json:3: not valid JSON"):
        read_items(spec)
    path.write_text(json.dumps({"images": [{"filename": "0.jpg", "split": "test"}]}))
    with pytest.raises(EvalDataError, match=r"images\[0\]: missing or malformed key 'sentences'"):
        read_items(spec)


def test_seed_tsv_reader_groups_texts_by_image_id(tmp_path):
    path = _write_seed_tsv(tmp_path / "test.tsv")
    items = read_items(EvalSetSpec("s", "seed_tsv", str(path)))
    caps = _captions(0, 6)
    assert [i.key for i in items] == ["a", "b", "c"]
    assert [i.captions for i in items] == [[caps[0], caps[2], caps[5]], [caps[1], caps[4]], [caps[3]]]
    assert items[2].load_image() == _jpeg(22)
    lines = path.read_text(encoding="utf-8").splitlines()
    text, image_id, b64 = lines[2].split("\t")
    path.write_text("\n".join(lines[:2] + [f"{text}\t{image_id}\t{b64[:-7]}!!{b64[-5:]}"] + lines[3:]) + "\n")
    with pytest.raises(EvalDataError, match=rf"{path}:3: invalid base64: .* \(image id 'a'\)"):
        read_items(EvalSetSpec("s", "seed_tsv", str(path)))
    path.write_text("\n".join(lines[:4] + ["only\ttwo"] + lines[5:]) + "\n")
    with pytest.raises(EvalDataError, match=rf"{path}:5: wrong column count: expected 3 tab-separated columns"):
        read_items(EvalSetSpec("s", "seed_tsv", str(path)))


def test_shards_reader_and_legacy_loader(tmp_path, tokenizer):
    with ShardWriter(tmp_path / "shards", max_samples=2) as writer:
        for k in range(3):
            writer.write(RawSample(key=f"s{k:03d}", image=_jpeg(30 + k), captions=_captions(k, 2)))
    items = read_items(EvalSetSpec("sh", "shards", str(tmp_path / "shards")))
    assert [i.key for i in items] == ["s000", "s001", "s002"] and items[1].captions == _captions(1, 2)
    data = load_retrieval_set(str(tmp_path / "shards"), 32, tokenizer, 12)
    assert data.images.shape == (3, 32, 32, 3) and data.images.dtype == np.uint8
    assert data.n_images == 3 and data.text_image.tolist() == [0, 0, 1, 1, 2, 2]


def test_eval_set_spec_from_config():
    spec = eval_set_spec(EvalSetSchema(name="packed", format="shards", path="/data/{0..3}.tar", protocol="both"))
    assert (spec.format, spec.path) == ("shards", "/data/{0..3}.tar")
    with pytest.raises(TypeError, match="shards"):  # no legacy 'shards:' key
        EvalSetSchema(name="old", shards="/data/{0..3}.tar")
    assert eval_set_spec(EvalSetSchema(name="packed", path="/data")).format == "shards"  # the default
    with pytest.raises(ValueError, match="evaluation set 'x': unknown format 'csv'"):
        eval_set_spec(EvalSetSchema(name="x", format="csv", path="f"))
    with pytest.raises(ValueError, match="evaluation set 'x': unknown protocol 'oneway'"):
        eval_set_spec(EvalSetSchema(name="x", format="jsonl", path="f", protocol="oneway"))
    with pytest.raises(ValueError, match="evaluation set 'k' \\(format karpathy\\): 'path' is not set"):
        read_items(eval_set_spec(EvalSetSchema(name="k", format="karpathy")))


# --------------------------------------------------------------------------- protocols and sharding
def test_shard_ranges_cover_every_item_once():
    for n in (0, 1, 5, 13):
        for world in (1, 2, 3):
            ranges = [shard_range(n, DistInfo(rank=r, world_size=world)) for r in range(world)]
            assert [i for a, b in ranges for i in range(a, b)] == list(range(n))


def test_first_caption_per_image():
    assert first_caption_per_image(np.array([0, 1, 0, 2, 1, 0]), 3).tolist() == [0, 1, 3]
    with pytest.raises(ValueError, match="1 image"):
        first_caption_per_image(np.array([0, 0, 2]), 3)
    assert first_caption_per_image(np.array([0, 0, 2]), 4, distractors=True).tolist() == [0, -1, 2, -1]


def test_protocol_both_gives_multi_and_official_records(tmp_path, tokenizer):
    paddle.seed(0)
    model = dist_eval_worker.tiny_model(tokenizer.vocab_size)
    path = _write_seed_tsv(tmp_path / "test.tsv")
    data = items_to_set(read_items(EvalSetSpec("s", "seed_tsv", str(path))), 32, tokenizer, 12)
    records = RetrievalEvaluator("coco_cn", data, "both", batch_size=2)(model, 5)
    assert [(r["dataset"], r["protocol"], r["step"]) for r in records] == [("coco_cn", "multi", 5), ("coco_cn", "official", 5)]
    # texts grouped by image (a: lines 1, 3, 6; b: 2, 5; c: 4); the 1:1 protocol takes each image's first line
    assert data.images.shape[0] == 3 and data.text_image.tolist() == [0, 0, 0, 1, 1, 2]
    assert first_caption_per_image(data.text_image, 3).tolist() == [0, 3, 5]
    img, txt = embed(model, data)
    expected_multi = multi_caption_recall(img, txt, data.text_image)
    expected_official = official_recall(txt[[0, 3, 5]], img)
    assert {k: records[0][k] for k in expected_multi} == expected_multi
    assert {k: records[1][k] for k in expected_official} == expected_official
    with pytest.raises(ValueError, match="unknown protocol 'all'"):
        RetrievalEvaluator("x", data, "all")
    # a set holds uint8 crops; one prepared for another rank layout is refused before any collective
    assert data.images.dtype == np.uint8 and (data.image_start, data.n_images) == (0, 3)
    share = dataclasses.replace(data, images=data.images[:1])
    with pytest.raises(ValueError, match=r"holds images 0\.\.0 of 3, but rank 1 of 2 embeds 1\.\.2"):
        embed(model, share, info=DistInfo(rank=1, world_size=2))


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PADDLE_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


@pytest.mark.slow
def test_two_ranks_give_the_same_records_as_one_process(tmp_path, tokenizer):
    """Real processes (gloo on CPU): sets of 5 images / 9 texts and 3 images / 6 texts (odd sizes) on 2 ranks."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "vocab.txt").write_text(Path(tokenizer.vocab_file).read_text(encoding="utf-8"), encoding="utf-8")
    paddle.seed(3)
    paddle.save(dist_eval_worker.tiny_model(tokenizer.vocab_size).state_dict(), str(work / "model.pdparams"))
    jsonl = _write_jsonl(tmp_path / "jsonl")
    seed = _write_seed_tsv(tmp_path / "test.tsv")
    bad = _write_jsonl(tmp_path / "bad")
    (tmp_path / "bad" / "images" / "im4.jpg").write_bytes(b"not an image")  # line 5: rank 1's share
    cn = _write_chinese_clip(tmp_path / "cn")
    bad0 = _write_jsonl(tmp_path / "bad0")
    (tmp_path / "bad0" / "images" / "im1.jpg").write_bytes(b"not an image")  # line 2: rank 0's share
    sets = [
        {"name": "j", "format": "jsonl", "path": str(jsonl), "caption_key": "captions_en", "protocol": "both"},
        {"name": "s", "format": "seed_tsv", "path": str(seed), "protocol": "multi"},
        # the undecodable image skipped: rank 1 holds one image less, the ranks agree on the set
        {"name": "k", "format": "jsonl", "path": str(bad), "caption_key": "captions_en", "protocol": "both",
         "skip_bad_samples": True},
        # ... and rank 0 one less: the ranks' shares are no longer shard_range's of the 4 images left
        {"name": "k0", "format": "jsonl", "path": str(bad0), "caption_key": "captions_en", "protocol": "multi",
         "skip_bad_samples": True},
        # images no text lists: in the text->image pool, no image->text queries, on either rank
        {"name": "cn", "format": "chinese_clip", "path": str(cn), "split": "test", "protocol": "both"},
    ]
    (work / "sets.json").write_text(json.dumps(sets), encoding="utf-8")
    (work / "bad_set.json").write_text(json.dumps({"name": "bad", "format": "jsonl", "path": str(bad),
                                                   "caption_key": "captions_en"}), encoding="utf-8")
    single = dist_eval_worker.evaluate_sets(work, DistInfo())
    assert [(r["dataset"], r["protocol"]) for r in single] == [("j", "multi"), ("j", "official"), ("s", "multi"),
                                                               ("k", "multi"), ("k", "official"), ("k0", "multi"),
                                                               ("cn", "multi"), ("cn", "official")]

    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir",
           str(tmp_path / "log"), str(REPO_ROOT / "tests" / "dist_eval_worker.py"), str(work)]
    proc = subprocess.run(cmd, check=False, cwd=tmp_path, env=_clean_env(), capture_output=True, text=True, timeout=240)
    if proc.returncode != 0:
        logs = "".join(f"\n==== {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                       for p in sorted((tmp_path / "log").glob("workerlog.*")))
        pytest.fail(f"launcher exited {proc.returncode}\n{proc.stderr[-3000:]}{logs}")
    # held (the sets fit the default budget) and streamed (eval.hold_images_mb=0: decoded batch by batch)
    for rank, mode in ((0, ""), (1, ""), (0, "stream_"), (1, "stream_")):
        records = json.loads((work / f"records_{mode}rank{rank}.json").read_text(encoding="utf-8"))
        assert len(records) == len(single)
        for got, want in zip(records, single):
            assert {k: v for k, v in got.items() if isinstance(v, str)} == {k: v for k, v in want.items() if isinstance(v, str)}
            for key, value in want.items():
                if not isinstance(value, str):
                    assert got[key] == pytest.approx(value, abs=1e-6), (rank, mode, want["dataset"], want["protocol"], key)
    # each rank decoded only its share of the images (5 = 2 + 3, 3 = 1 + 2; 4 = 2 + (3 - 1 skipped),
    # 4 = (2 - 1 skipped) + 3; 7 = 3 + 4, the distractors included)
    held = [json.loads((work / f"held_rank{rank}.json").read_text(encoding="utf-8")) for rank in (0, 1)]
    assert held == [[[0, 2, 5], [0, 1, 3], [0, 2, 4], [0, 1, 4], [0, 3, 7]],
                    [[2, 3, 5], [1, 2, 3], [2, 2, 4], [1, 3, 4], [3, 4, 7]]]
    # an undecodable image in rank 1's share stops both ranks, naming it
    errors = [(work / f"bad_rank{rank}.txt").read_text(encoding="utf-8") for rank in (0, 1)]
    assert errors[0] == errors[1] and f"{bad}:5: " in errors[0], errors
