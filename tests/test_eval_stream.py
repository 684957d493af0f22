"""Held and streamed evaluation sets (``eval.hold_images_mb``): the same records, the same skips,
and a streamed set holds no decoded image between (or during more than one batch of) a pass."""
from __future__ import annotations

import base64
import json
import logging
import weakref
from pathlib import Path

import cv2
import dist_eval_worker
import numpy as np
import paddle
import pytest
from omegaconf import OmegaConf

from ernievil2.distributed import DistInfo
from ernievil2.evaluators import EvalContext, build_evaluators
from ernievil2.evaluators import base as eval_base
from ernievil2.evaluators.base import EvalDataError, holds_crops
from ernievil2.tokenizer import WordPieceTokenizer
from ernievil2.train.config import ClassificationSetSchema, EvalSchema, EvalSetSchema

SIZE = dist_eval_worker.IMAGE_SIZE
MAX_LEN = dist_eval_worker.MAX_LEN
BATCH = 3  # several batches per set, the last one not full
WORDS = ["red", "blue", "green", "dog", "cat", "car", "tree", "house", "boat", "bird", "sky", "road"]
CLASSES = ["dog", "cat", "car"]


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    ok, buf = cv2.imencode(".jpg", rng.integers(0, 256, (20 + seed % 7, 28, 3), dtype=np.uint8))
    assert ok
    return buf.tobytes()


def _caption(k: int, j: int) -> str:
    return f"a {WORDS[(k + j) % len(WORDS)]} {WORDS[(3 * k + 2 * j + 1) % len(WORDS)]}"


def _jsonl_set(root: Path, n: int = 8, corrupt: tuple[int, ...] = ()) -> Path:
    """``n`` images with 1 + k % 3 captions each; the images of ``corrupt`` are not images."""
    (root / "images").mkdir(parents=True)
    lines = []
    for k in range(n):
        (root / "images" / f"im{k}.jpg").write_bytes(b"not an image" if k in corrupt else _jpeg(k))
        lines.append(json.dumps({"image": f"images/im{k}.jpg", "image_id": f"id{k}",
                                 "captions": [_caption(k, j) for j in range(1 + k % 3)]}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root / "captions.jsonl"


def _chinese_clip_set(root: Path, corrupt: tuple[int, ...] = ()) -> Path:
    """Chinese-CLIP's layout: 9 images, 5 texts, two of them listing several images; no text lists
    images 107 and 108 (text->image distractors)."""
    root.mkdir(parents=True)
    imgs = [f"{100 + k}\t{base64.b64encode(b'junk' if k in corrupt else _jpeg(30 + k)).decode()}" for k in range(9)]
    (root / "valid_imgs.tsv").write_text("\n".join(imgs) + "\n", encoding="utf-8")
    texts = [[100, 101], [102], [103, 104, 100], [105], [106, 102]]
    (root / "valid_texts.jsonl").write_text("".join(
        json.dumps({"text_id": 900 + t, "text": _caption(t, 0), "image_ids": ids}) + "\n" for t, ids in enumerate(texts)),
        encoding="utf-8")
    return root


def _imagefolder(root: Path, corrupt: tuple[str, ...] = ()) -> Path:
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for k in range(3 + c):
            key = f"{name}/{k}.jpg"
            (root / key).write_bytes(b"broken" if key in corrupt else _jpeg(60 + 10 * c + k))
    return root


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> WordPieceTokenizer:
    vocab = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    WordPieceTokenizer.build_vocab([" ".join(["a", "photo", "of", *WORDS])], vocab, vocab_size=200)
    return WordPieceTokenizer(vocab, max_length=MAX_LEN)


@pytest.fixture(scope="module")
def model(tokenizer):
    paddle.set_device("cpu")
    paddle.seed(5)
    return dist_eval_worker.tiny_model(tokenizer.vocab_size)


def _evaluators(tokenizer, hold_mb: int, datasets=(), classification=(), info: DistInfo = DistInfo()):
    cfg = OmegaConf.structured(EvalSchema(batch_size=BATCH, hold_images_mb=hold_mb, datasets=list(datasets),
                                          classification=list(classification)))
    return build_evaluators(cfg, EvalContext(SIZE, tokenizer, MAX_LEN, info))


def _records(evaluators, model, passes: int = 2) -> list[list[dict]]:
    """Each pass's records (a streamed set decodes again at every pass)."""
    return [[r for ev in evaluators for r in ev(model, step)] for step in range(passes)]


def _sets(tmp_path: Path, skip: bool, corrupt: bool):
    jsonl = _jsonl_set(tmp_path / "jsonl", corrupt=(2, 5) if corrupt else ())
    cn = _chinese_clip_set(tmp_path / "cn", corrupt=(0, 7) if corrupt else ())  # 7: a distractor
    folder = _imagefolder(tmp_path / "folder", corrupt=("cat/1.jpg",) if corrupt else ())
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES) + "\n", encoding="utf-8")
    datasets = [EvalSetSchema(name="j", format="jsonl", path=str(jsonl), protocol="both", recall_k=[1, 2, 5, 10],
                              skip_bad_samples=skip),
                EvalSetSchema(name="cn", format="chinese_clip", path=str(cn), split="valid", protocol="both",
                              skip_bad_samples=skip),
                EvalSetSchema(name="cn_t2i", format="chinese_clip", path=str(cn), split="valid", directions="t2i",
                              skip_bad_samples=skip)]
    classification = [ClassificationSetSchema(name="f", format="imagefolder", path=str(folder),
                                              classnames=str(tmp_path / "classes.txt"), templates="en",
                                              skip_bad_samples=skip)]
    return datasets, classification


@pytest.mark.parametrize("corrupt", [False, True], ids=["clean", "corrupt_skipped"])
def test_held_and_streamed_sets_give_the_same_records(tmp_path, tokenizer, model, corrupt, caplog):
    datasets, classification = _sets(tmp_path, skip=corrupt, corrupt=corrupt)
    caplog.set_level(logging.WARNING, logger="ernievil2.evaluators")
    held = _evaluators(tokenizer, 1024, datasets, classification)
    held_log = [r.getMessage() for r in caplog.records]
    caplog.clear()
    streamed = _evaluators(tokenizer, 0, datasets, classification)
    assert not [r for r in caplog.records if "undecodable" in r.getMessage()]  # found by the first pass, not here
    assert all(ev.data.images.size == 0 and ev.data.stream is not None for ev in streamed)
    assert all(ev.data.images.size > 0 and ev.data.stream is None for ev in held)
    want = _records(held, model)
    got = _records(streamed, model)
    streamed_log = [r.getMessage() for r in caplog.records]
    assert got == want  # exactly: the same batches go through the same encoder
    assert want[0] == [{**r, "step": 0} for r in want[1]]
    assert [(r["dataset"], r["protocol"]) for r in want[0]] == [
        ("j", "multi"), ("j", "official"), ("cn", "multi"), ("cn", "official"), ("cn_t2i", "multi"), ("f", "zeroshot")]
    # the skips: counted by reason, logged alike (the streamed set at its first evaluation, once)
    assert sorted(streamed_log) == sorted(held_log)
    if corrupt:
        assert "evaluation set j: skipped 2 malformed sample(s) (undecodable_image 2)" in streamed_log
        assert "evaluation set f: skipped 1 malformed sample(s) (undecodable_image 1)" in streamed_log
        assert [ev.data.n_images for ev in streamed[:3]] == [ev.data.n_images for ev in held[:3]] == [6, 7, 7]
        assert want[0][-1]["n_images"] == 11
    else:
        assert [ev.data.n_images for ev in streamed[:3]] == [8, 9, 9]  # cn: the distractors are in the pool
    for h, s in zip(held[:3], streamed[:3]):
        assert np.array_equal(h.data.text_image, s.data.text_image)
        assert np.array_equal(h.data.text_ids, s.data.text_ids)
        assert (h.data.extra_pairs is None) == (s.data.extra_pairs is None)


def test_streamed_set_holds_no_crops(tmp_path, tokenizer, model, monkeypatch):
    datasets, classification = _sets(tmp_path, skip=True, corrupt=True)
    streamed = _evaluators(tokenizer, 0, datasets, classification)
    seen: list[int] = []
    alive: list[int] = []
    real = eval_base.embed_crop_batches

    def watching(model, batches, *args, **kwargs):
        def watch():
            refs: list[weakref.ref] = []
            for batch in batches:
                # the batch before the one being handed over may still be in use; none before it
                alive.append(sum(r() is not None for r in refs[:-1]))
                refs.append(weakref.ref(batch))
                seen.append(len(batch))
                yield batch
        return real(model, watch(), *args, **kwargs)

    monkeypatch.setattr(eval_base, "embed_crop_batches", watching)
    records = _records(streamed, model)
    assert records[0] == [{**r, "step": 0} for r in records[1]]
    assert seen and max(seen) == BATCH and set(alive) == {0}
    # nothing image-sized stays on an evaluator: no uint8 crops, only the items (paths, or the encoded bytes)
    for ev in streamed:
        assert ev.data.images.size == 0
        arrays = [v for v in (*vars(ev.data).values(), *vars(ev.data.stream).values()) if isinstance(v, np.ndarray)]
        assert sum(a.nbytes for a in arrays if a.dtype == np.uint8 or a.ndim == 4) == 0, [a.shape for a in arrays]


def test_an_undecodable_image_stops_a_streamed_set_at_its_first_evaluation(tmp_path, tokenizer, model):
    jsonl = _jsonl_set(tmp_path / "jsonl", corrupt=(3,))
    entry = EvalSetSchema(name="j", format="jsonl", path=str(jsonl))
    with pytest.raises(EvalDataError, match=rf"{jsonl}:4: "):
        _evaluators(tokenizer, 1024, [entry])  # held: while building, as before
    [streamed] = _evaluators(tokenizer, 0, [entry])  # streamed: nothing decoded yet
    with pytest.raises(EvalDataError, match=rf"{jsonl}:4: "):
        streamed(model, 0)


def test_hold_budget_is_the_largest_shares_crops():
    crop = SIZE * SIZE * 3
    one, two = DistInfo(), DistInfo(rank=1, world_size=2)
    assert holds_crops(5, SIZE, one, None)  # no budget: always held (direct library use)
    assert holds_crops(4, SIZE, one, 4 * crop / 2**20) and not holds_crops(5, SIZE, one, 4 * crop / 2**20)
    # two ranks: shares of 2 and 3 images; the larger one decides, the same on both ranks
    assert not holds_crops(5, SIZE, two, 2 * crop / 2**20) and holds_crops(5, SIZE, two, 3 * crop / 2**20)
    assert holds_crops(5, SIZE, DistInfo(rank=0, world_size=2), 3 * crop / 2**20)
    assert not holds_crops(1, SIZE, one, 0)  # 0: always streamed
    with pytest.raises(ValueError, match="hold_images_mb must be >= 0"):
        holds_crops(1, SIZE, one, -1)
    assert EvalSchema().hold_images_mb == 512 == eval_base.HOLD_IMAGES_MB
