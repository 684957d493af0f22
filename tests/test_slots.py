"""Shared batch slots (ernievil2.data.slots): the image views reach the trainer through them with
loader workers, and the batches equal those of paddle's own transport, in order, resumed, with a
single slot per worker, and when the trainer stops early."""
from __future__ import annotations

import pickle
import threading
import time
from pathlib import Path

import numpy as np
import paddle
import pytest
from test_stream import write_shards

import ernievil2.data.loader as loader_mod
from ernievil2.data.device_views import ViewFinisher
from ernievil2.data.loader import StreamSource, build_train_data
from ernievil2.data.slots import BatchSlots, SlotsClosed
from ernievil2.data.views import MultiViewTransform, ViewConfig
from ernievil2.tokenizer import WordPieceTokenizer

BATCH = 4


@pytest.fixture(scope="module")
def transform(tmp_path_factory) -> MultiViewTransform:
    vocab = WordPieceTokenizer.build_vocab([f"caption {i}" for i in range(50)],
                                           tmp_path_factory.mktemp("vocab") / "vocab.txt", 100)
    return MultiViewTransform(ViewConfig(image_size=16, min_image_side=4), WordPieceTokenizer(vocab),
                              max_length=8, seed=0)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("shards"), sizes=(9, 7, 11, 6))


def _numpy(batch: dict) -> dict[str, np.ndarray]:
    return {k: np.asarray(v.numpy()) for k, v in batch.items() if k != "skipped"}


def _epoch(shards: Path, transform, epoch: int = 0, skip: int = 0, workers: int = 2,
           finisher: ViewFinisher | None = None) -> list[dict[str, np.ndarray]]:
    data = build_train_data([StreamSource.of("s", shards)], transform, batch_size=BATCH, num_workers=workers,
                            shuffle_buffer=3, seed=0, world_size=1, finisher=finisher)
    return [_numpy(b) for b in data.batches(epoch, skip)]


def _assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.mark.timeout(180)
def test_slots_carry_the_same_batches_as_paddle_transport(shards, transform, monkeypatch):
    taken = []
    real_take = BatchSlots.take
    monkeypatch.setattr(BatchSlots, "take", lambda self, d: taken.append(1) or real_take(self, d))
    with_slots = _epoch(shards, transform, epoch=1)
    assert len(taken) == len(with_slots)  # every batch came through the slots
    for b in with_slots:
        assert b["image_view1"].dtype == np.uint8 and b["image_view1"].shape == (BATCH, 16, 16, 3)
    monkeypatch.setattr(loader_mod, "slots_supported", lambda: False)
    _assert_same(with_slots, _epoch(shards, transform, epoch=1))


@pytest.mark.timeout(180)
@pytest.mark.parametrize("slots", [True, False])
def test_views_finished_by_the_loader_equal_the_trainers(shards, transform, monkeypatch, slots):
    """For a model on the CPU the loader workers finish the views (``finisher``): the batches then
    hold exactly what the trainer's ViewFinisher makes of the plain batches."""
    plain = _epoch(shards, transform)
    if not slots:
        monkeypatch.setattr(loader_mod, "slots_supported", lambda: False)
    finished = _epoch(shards, transform, finisher=ViewFinisher())
    assert len(finished) == len(plain)
    finish = ViewFinisher()
    for f, p in zip(finished, plain):
        assert not any(k.endswith("_photometric") for k in f)
        for view in ("image", "image_view1", "image_view2"):
            assert f[view].dtype == np.float32 and f[view].shape == (BATCH, 3, 16, 16)
            want = finish(paddle.to_tensor(p[view]), p.get(view + "_photometric"), view).numpy()
            np.testing.assert_array_equal(f[view], want, err_msg=view)
            # the trainer takes finished views as they are
            np.testing.assert_array_equal(finish(paddle.to_tensor(f[view]), None, view).numpy(), f[view])
        np.testing.assert_array_equal(f["caption_ids"], p["caption_ids"])


@pytest.mark.timeout(180)
def test_one_slot_per_worker_and_resume(shards, transform, monkeypatch):
    full = _epoch(shards, transform)
    monkeypatch.setattr(loader_mod.ShardLoader, "slot_depth", 1)  # each worker waits for every batch it sent
    _assert_same(_epoch(shards, transform), full)
    _assert_same(_epoch(shards, transform, skip=3), full[3:])


@pytest.mark.timeout(120)
def test_stopping_early_shuts_the_workers_down(shards, transform, monkeypatch):
    monkeypatch.setattr(loader_mod.ShardLoader, "slot_depth", 1)
    data = build_train_data([StreamSource.of("s", shards)], transform, batch_size=BATCH, num_workers=2,
                            shuffle_buffer=0, seed=0, world_size=1)
    it = data.batches(0)
    next(it)
    time.sleep(1.0)  # the workers fill their single slots and wait
    start = time.perf_counter()
    it.close()
    assert time.perf_counter() - start < 15


def test_slot_rules():
    slots = BatchSlots(num_workers=2, depth=2, batch_size=2, layout={"x": ((3,), np.uint8)})
    rows = [{"x": np.array([1, 2, 3], np.uint8)}, {"x": np.array([4, 5, 6], np.uint8)}]
    d0 = slots.put(1, 0, rows)
    slots.put(1, 1, rows[::-1])
    np.testing.assert_array_equal(d0, [1, 0])
    with pytest.raises(RuntimeError, match="batch 1 of loader worker 1 arrived, expected batch 0"):
        slots.take(np.array([1, 1]))
    np.testing.assert_array_equal(slots.take(d0)["x"].numpy(), [[1, 2, 3], [4, 5, 6]])
    with pytest.raises(ValueError, match="batches of 2 rows"):
        slots.put(0, 0, rows[:1])
    with pytest.raises(ValueError, match=r"output 'x' is int64 \[3\], but the layout \(the transform's fixed_outputs\(\)\) declares uint8 \[3\]"):
        slots.put(0, 0, [rows[0], {"x": np.array([1, 2, 3])}])
    with pytest.raises(TypeError, match="shared by forking"):
        pickle.dumps(slots)
    # batch 3 of worker 1 needs the slot of batch 1, not taken yet: put waits until close()
    errors = []
    waiter = threading.Thread(target=lambda: errors.append(_put_error(slots, rows)))
    waiter.start()
    time.sleep(0.3)
    assert waiter.is_alive()
    slots.close()
    waiter.join(5)
    assert not waiter.is_alive() and errors == [SlotsClosed]


def _put_error(slots: BatchSlots, rows) -> type | None:
    try:
        slots.put(1, 3, rows)
    except SlotsClosed as exn:
        return type(exn)
    return None
