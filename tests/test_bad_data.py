"""Bad training data: each kind is a counted skip, logged with shard and key, its
count reaches the batches (``skipped``), and a wholly bad shard does not stall the stream."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from ernievil2.data import shard_reader
from ernievil2.data.loader import StreamSource, build_train_data
from ernievil2.data.views import MultiViewTransform, ViewConfig
from ernievil2.tokenizer import SPECIAL_TOKENS, WordPieceTokenizer

GOOD = 6


def _image(side: int = 24, ext: str = ".jpg") -> bytes:
    ok, buf = cv2.imencode(ext, np.full((side, side, 3), 128, dtype=np.uint8))
    assert ok
    return buf.tobytes()


def _bomb_jpeg() -> bytes:
    """A small JPEG whose header declares 60000 x 60000 pixels (a decompression bomb)."""
    data = bytearray(_image(16))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = (60000).to_bytes(2, "big") * 2  # height, width
    return bytes(data)


def _good_members(i: int) -> list[tuple[str, bytes]]:
    return [(f"k{i:03d}.jpg", _image()), (f"k{i:03d}.json", json.dumps({"captions": [f"caption {i}"]}).encode())]


BAD: dict[str, list[tuple[str, bytes]]] = {
    "corrupt_image": [("bad.jpg", b"\xff\xd8\xff\xe0 not really a jpeg"), ("bad.txt", b"caption")],
    "no_caption": [("bad.jpg", _image())],
    "bad_caption": [("bad.jpg", _image()), ("bad.txt", b"   ")],
    "bad_caption_utf8": [("bad.jpg", _image()), ("bad.txt", b"caption \xff\xfe")],
    "bad_json": [("bad.jpg", _image()), ("bad.txt", b"caption"), ("bad.json", b"{not json")],
    "image_too_large": [("bad.jpg", _bomb_jpeg()), ("bad.txt", b"caption")],
    "image_too_small": [("bad.png", _image(1, ".png")), ("bad.txt", b"caption")],
    "no_image": [("bad.txt", b"caption")],
}


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def transform(tmp_path_factory) -> MultiViewTransform:
    vocab = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    vocab.write_text("\n".join([*SPECIAL_TOKENS, "caption", *map(str, range(10))]) + "\n", encoding="utf-8")
    return MultiViewTransform(ViewConfig(image_size=16, min_image_side=4, max_image_pixels=10_000),
                              WordPieceTokenizer(vocab, max_length=8), max_length=8, seed=0,
                              views=["image", "caption_ids"])


def _skipped(batches) -> dict[str, int]:
    total: dict[str, int] = {}
    for b in batches:
        for kind, n in b.get("skipped", {}).items():
            total[kind] = total.get(kind, 0) + n
    return total


@pytest.mark.parametrize("case", sorted(BAD))
def test_each_kind_is_a_counted_logged_skip(tmp_path, transform, caplog, case):
    members = [m for i in range(3) for m in _good_members(i)] + BAD[case]
    members += [m for i in range(3, GOOD) for m in _good_members(i)]
    _write_tar(tmp_path / "shard-0.tar", members)
    data = build_train_data([StreamSource.of("x", tmp_path)], transform, batch_size=2, num_workers=0,
                            shuffle_buffer=0, seed=0, world_size=1)
    with caplog.at_level("WARNING", logger=shard_reader.__name__):
        batches = list(data.batches(0))
    kind = case.removesuffix("_utf8")
    assert _skipped(batches) == {kind: 1}
    # 7 raw samples -> 3 batches of 2 from the 6 good ones, none repeated
    keys = np.concatenate([np.asarray(b["caption_ids"]) for b in batches])
    assert keys.shape == (6, 8)
    assert f"skipping {kind}: sample bad of shard {tmp_path / 'shard-0.tar'}" in caplog.text


def test_truncated_tar_is_counted_and_the_rest_is_read(tmp_path, transform, caplog):
    _write_tar(tmp_path / "a.tar", [m for i in range(GOOD) for m in _good_members(i)])
    data = (tmp_path / "a.tar").read_bytes()
    (tmp_path / "a.tar").write_bytes(data[: 3000])  # cut inside the third member
    _write_tar(tmp_path / "b.tar", [m for i in range(GOOD, 2 * GOOD) for m in _good_members(i)])
    # a.tar was written whole (sizes.json), then cut in transit; c.tar ends inside a member
    _write_tar(tmp_path / "c.tar", [m for i in range(2 * GOOD, 3 * GOOD) for m in _good_members(i)])
    (tmp_path / "c.tar").write_bytes((tmp_path / "c.tar").read_bytes()[:3000 + 700])
    (tmp_path / "sizes.json").write_text(json.dumps({"a.tar": GOOD, "b.tar": GOOD, "c.tar": GOOD}))
    stream = build_train_data([StreamSource.of("x", tmp_path)], transform, batch_size=2, num_workers=0,
                              shuffle_buffer=0, seed=0, world_size=1)
    with caplog.at_level("WARNING", logger=shard_reader.__name__):
        batches = list(stream.batches(0))
    assert _skipped(batches) == {"truncated_tar": 2}
    assert "skipping truncated_tar" in caplog.text and "a.tar" in caplog.text and "c.tar" in caplog.text
    assert "read 1 of the 6 samples" in caplog.text
    assert len(batches) == stream.batches_per_epoch(0)


@pytest.mark.timeout(60)
def test_wholly_bad_shard_does_not_stall(tmp_path, transform):
    """One shard of junk bytes and one whose every image is corrupt, two loader workers: the job
    goes on with the good shard and the counts say what happened."""
    (tmp_path / "a-junk.tar").write_bytes(b"this is no tar file" * 50)
    _write_tar(tmp_path / "b-corrupt.tar", [m for i in range(4) for m in
                                            [(f"c{i}.jpg", b"garbage"), (f"c{i}.txt", b"caption")]])
    _write_tar(tmp_path / "c-good.tar", [m for i in range(2 * GOOD) for m in _good_members(i)])
    (tmp_path / "sizes.json").write_text(json.dumps({"a-junk.tar": 5, "b-corrupt.tar": 4, "c-good.tar": 12}))
    data = build_train_data([StreamSource.of("x", tmp_path)], transform, batch_size=2, num_workers=2,
                            shuffle_buffer=0, seed=0, world_size=1)
    batches = list(data.batches(0))
    skipped = _skipped(batches)
    assert skipped.get("corrupt_image", 0) == 4 and skipped.get("truncated_tar", 0) == 1
    assert sum(np.asarray(b["caption_ids"]).shape[0] for b in batches) >= 12
