"""ShardWriter / decode_sample / list_shards / iter_samples: round trip, robustness, skip counting."""
from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from ernievil2.data import shard_reader
from ernievil2.data.loader_workers import collate_arrays, loader_worker
from ernievil2.data.sample import SKIP_KINDS, BadSample, RawSample
from ernievil2.data.shard_codec import decode_sample
from ernievil2.data.shard_reader import iter_samples, list_shards, read_sizes
from ernievil2.data.shard_writer import ShardWriter
from ernievil2.data.skips import SkipCounter
from ernievil2.distributed import DistInfo, dist_info

N = 25


def _jpeg(i: int) -> bytes:
    rng = np.random.default_rng(i)
    ok, buf = cv2.imencode(".jpg", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    assert ok
    return buf.tobytes()


def _png(i: int) -> bytes:
    ok, buf = cv2.imencode(".png", np.full((6, 6, 3), i % 256, dtype=np.uint8))
    assert ok
    return buf.tobytes()


def _sample(i: int) -> RawSample:
    lang = "zh" if i % 3 == 0 else "en"
    captions = [f"一只猫 {i}", f"第二个描述 {i}"] if lang == "zh" else [f"a cat number {i}", f"another caption {i}", "third"]
    objects = None if i % 5 == 4 else ([f"cat {i}", "mat"] if i % 2 else [])
    return RawSample(
        key=f"s{i:05d}",
        image=_png(i) if i % 7 == 0 else _jpeg(i),
        captions=captions,
        objects=objects,
        lang=lang,
        meta={"width": 8, "source": f"synthetic-{i}"},
    )


def _write(out: Path, n: int = N, max_samples: int = 10, prefix: str = "shard") -> list[RawSample]:
    samples = [_sample(i) for i in range(n)]
    with ShardWriter(out, prefix=prefix, max_samples=max_samples) as w:
        for s in samples:
            w.write(s, image_ext="png" if s.image.startswith(b"\x89PNG") else "jpg")
    return samples


@pytest.fixture()
def three_shards(tmp_path: Path) -> tuple[Path, list[RawSample]]:
    return tmp_path, _write(tmp_path)


def test_round_trip_all_fields(three_shards):
    out, samples = three_shards
    files = sorted(p.name for p in out.iterdir())
    assert files == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar", "sizes.json"]
    assert json.loads((out / "sizes.json").read_text()) == {
        "shard-000000.tar": 10,
        "shard-000001.tar": 10,
        "shard-000002.tar": 5,
    }
    assert read_sizes(list_shards(out)) == N
    # img2dataset layout inside the tar
    with tarfile.open(out / "shard-000000.tar") as tf:
        names = tf.getnames()
        assert names[:3] == ["s00000.png", "s00000.txt", "s00000.json"]
        assert tf.extractfile("s00001.txt").read().decode("utf-8") == "a cat number 1"
        assert all(m.mtime == 0 for m in tf.getmembers())
        rec = json.loads(tf.extractfile("s00003.json").read())
        assert rec["key"] == "s00003" and rec["language"] == "zh" and rec["objects"] == ["cat 3", "mat"]
        assert "objects" not in json.loads(tf.extractfile("s00004.json").read())

    assert [s.key for s in iter_samples(out)] == [s.key for s in samples]  # shard by shard, in order
    got = {s.key: s for s in iter_samples(str(out))}
    assert len(got) == N
    for s in samples:
        r = got[s.key]
        assert r.image == s.image
        assert r.captions == s.captions
        assert r.objects == s.objects
        assert r.lang == s.lang
        assert r.meta == s.meta
    assert got["s00000"].image.startswith(b"\x89PNG")
    assert got["s00003"].captions[0] == "一只猫 3"


def test_deterministic_bytes(tmp_path: Path):
    _write(tmp_path / "a")
    _write(tmp_path / "b")
    for name in ["shard-000000.tar", "shard-000002.tar", "sizes.json"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_max_bytes_rolls_over(tmp_path: Path):
    with ShardWriter(tmp_path, max_samples=1000, max_bytes=8 * 1024) as w:
        for i in range(10):
            w.write(_sample(i))
    sizes = json.loads((tmp_path / "sizes.json").read_text())
    # a sample takes ~3-4 KiB of tar blocks here, so 2 fit under 8 KiB and a third never does
    assert sum(sizes.values()) == 10 and 1 < len(sizes) < 10 and max(sizes.values()) == 2
    for name in sizes:  # each shard holds whole samples (3 members each) and stays near the cap
        with tarfile.open(tmp_path / name) as tf:
            assert len(tf.getnames()) == 3 * sizes[name]


def test_bad_key_and_meta_rejected(tmp_path: Path):
    with ShardWriter(tmp_path) as w:
        with pytest.raises(ValueError, match="a.b"):
            w.write(RawSample(key="a.b", image=b"x", captions=["c"]))
        with pytest.raises(ValueError, match="reserved"):
            w.write(RawSample(key="k", image=b"x", captions=["c"], meta={"captions": 1}))


def test_interrupted_writer_leaves_no_complete_looking_shard(tmp_path: Path):
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(tmp_path, max_samples=10) as w:
            for i in range(15):
                w.write(_sample(i))
            raise RuntimeError("boom")
    names = sorted(p.name for p in tmp_path.iterdir())
    # the finished first shard stays (it is complete); the unfinished one is deleted; no sizes.json
    assert names == ["shard-000000.tar"]
    with tarfile.open(tmp_path / "shard-000000.tar") as tf:
        assert len(tf.getnames()) == 30


def test_open_shard_is_only_a_tmp_file(tmp_path: Path):
    w = ShardWriter(tmp_path, max_samples=10)
    for i in range(3):
        w.write(_sample(i))
    assert list_shards(str(tmp_path / "*.tar*")) == [str(tmp_path / "shard-000000.tar.tmp")]
    with pytest.raises(ValueError, match=re.escape(str(tmp_path))):
        list_shards(tmp_path)  # the directory holds no *.tar yet
    w.close()
    assert list_shards(tmp_path) == [str(tmp_path / "shard-000000.tar")]


def test_decode_sample_variants():
    img = _jpeg(0)
    s = decode_sample(
        {
            "__key__": "k1",
            "__url__": "u.tar",
            "webp": img,
            "txt": b"only caption",
            "json": json.dumps({"objects": [{"name": "dog", "count": 2}, {"name": "frisbee", "count": 1}], "url": "x"}).encode(),
        }
    )
    assert s.captions == ["only caption"] and s.objects == ["dog", "frisbee"] and s.meta == {"url": "x"}
    assert s.objects is not None and s.lang == "en"
    s = decode_sample({"__key__": "k2", "__url__": "u.tar", "jpeg": img, "txt": "图片".encode()})
    assert s.captions == ["图片"] and s.objects is None
    with pytest.raises(ValueError, match=r"u\.tar.*k3"):
        decode_sample({"__key__": "k3", "__url__": "u.tar", "txt": b"no image"})
    with pytest.raises(ValueError, match=r"u\.tar.*k4.*no caption"):
        decode_sample({"__key__": "k4", "__url__": "u.tar", "jpg": img, "json": b'{"captions": []}'})
    with pytest.raises(ValueError, match="k5"):
        decode_sample({"__key__": "k5", "__url__": "u.tar", "jpg": img, "txt": b"c", "json": b"{not json"})


def test_list_shards_forms(tmp_path: Path):
    _write(tmp_path, n=40)
    expected = [str(tmp_path / f"shard-{i:06d}.tar") for i in range(4)]
    assert list_shards(tmp_path) == expected
    assert list_shards(str(tmp_path)) == expected
    assert list_shards(str(tmp_path / "shard-{000000..000003}.tar")) == expected
    assert list_shards(str(tmp_path / "shard-00000[13].tar")) == [expected[1], expected[3]]
    assert list_shards([expected[2], str(tmp_path / "shard-00000[01].tar")]) == [expected[2], *expected[:2]]
    with pytest.raises(ValueError, match="nothing-here"):
        list_shards(str(tmp_path / "nothing-here*.tar"))
    with pytest.raises(ValueError):
        list_shards([])


def _rewrite_with_corruption(src: Path, dst: Path) -> None:
    """Copy a shard, replacing s00002's json with garbage and dropping s00005's image."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for m in tin.getmembers():
            data = tin.extractfile(m).read()
            if m.name == "s00002.json":
                data = b"{this is not json"
            if m.name.startswith("s00005.") and not m.name.endswith((".txt", ".json")):
                continue
            m.size = len(data)
            tout.addfile(m, io.BytesIO(data))


def _cut_inside(src: Path, dst: Path, key: str) -> None:
    """Copy a shard cut in the middle of ``key``'s first member (a tar that ends early)."""
    with tarfile.open(src) as tf:
        first = next(m for m in tf.getmembers() if m.name.startswith(f"{key}."))
    dst.write_bytes(src.read_bytes()[: first.offset_data + 16])


def test_corrupt_samples_and_damaged_shards_are_skipped_and_counted(tmp_path: Path, caplog):
    _write(tmp_path / "ok", n=25)
    bad = tmp_path / "bad"
    bad.mkdir()
    _rewrite_with_corruption(tmp_path / "ok" / "shard-000000.tar", bad / "shard-000000.tar")
    _cut_inside(tmp_path / "ok" / "shard-000001.tar", bad / "shard-000001.tar", "s00013")
    (bad / "shard-000002.tar").write_bytes((tmp_path / "ok" / "shard-000002.tar").read_bytes())

    skips = SkipCounter()
    with caplog.at_level("WARNING", logger=shard_reader.__name__):
        got = [s.key for s in iter_samples(bad, skips)]
    # the samples before the damage are read, then the next shard
    assert got == [f"s{i:05d}" for i in range(25) if i not in (2, 5) and not 13 <= i < 20]
    assert skips.by_kind() == {"bad_json": 1, "no_image": 1, "truncated_tar": 1}
    text = caplog.text
    assert "sample s00002 of shard" in text and "sample s00005 of shard" in text and "shard-000000.tar" in text
    assert "skipping truncated_tar: shard " in text and "shard-000001.tar" in text


def test_one_skip_counter_for_training_and_evaluation(caplog):
    """SKIP_KINDS in the loader's vector order, free-form evaluation reasons, a name prefix, quiet and muted."""
    train = SkipCounter(max_logged=2)
    with caplog.at_level("WARNING"):
        for key in "abc":
            train.add_error("s.tar", key, BadSample("corrupt_image", "broken"))
        train.add_error("s.tar", "d", ValueError("plain"))
    assert [r.getMessage() for r in caplog.records] == [
        "skipping corrupt_image: sample a of shard s.tar: broken", "skipping corrupt_image: sample b of shard s.tar: broken",
        "further corrupt_image skips are only counted", "skipping other: sample d of shard s.tar: plain"]
    vector = train.take()
    assert vector.dtype == np.int64 and dict(zip(SKIP_KINDS, vector.tolist())) == {
        k: {"corrupt_image": 3, "other": 1}.get(k, 0) for k in SKIP_KINDS}
    train.muted = True
    train.add_damage("t.tar", "cut")
    assert not train.take().any() and train.by_kind() == {"corrupt_image": 3, "other": 1} and train.total == 4

    caplog.clear()
    evaluation = SkipCounter("evaluation set x")
    with caplog.at_level("WARNING"):
        evaluation.add("undecodable_image", "f.tsv:3", "not an image")
        evaluation.add("no_captions", "f.tsv:4", "no text lists image id '7'")
        evaluation.add("no_image", "s.tar: sample k", "no image")
        evaluation.finish()
        SkipCounter("evaluation set x", quiet=True).add("bad_record", "f.tsv:5", "columns")
    assert [r.getMessage() for r in caplog.records] == [
        "evaluation set x: skipping undecodable_image: f.tsv:3: not an image",
        "evaluation set x: skipping no_captions: f.tsv:4: no text lists image id '7'",
        "evaluation set x: skipping no_image: s.tar: sample k: no image",
        "evaluation set x: skipped 3 malformed sample(s) (no_captions 1, no_image 1, undecodable_image 1)"]
    assert evaluation.by_kind() == {"no_image": 1, "no_captions": 1, "undecodable_image": 1}
    with pytest.raises(ValueError, match="not in SKIP_KINDS"):
        evaluation.take()  # a free-form reason has no place in the loader's vector


def test_collate_arrays():
    out = collate_arrays([{"a": np.zeros((2, 3)), "b": np.array(1)}, {"a": np.ones((2, 3)), "b": np.array(2)}])
    assert out["a"].shape == (2, 2, 3) and out["b"].tolist() == [1, 2]
    with pytest.raises(ValueError):
        collate_arrays([{"a": np.zeros(1)}, {"b": np.zeros(1)}])
    with pytest.raises(ValueError):
        collate_arrays([])


def test_rank_and_world_come_from_paddles_variables_only(monkeypatch):
    """A single process when no launcher variables are set; only paddle's variables count (the one
    reader, ernievil2.distributed.dist_info)."""
    for var in ("PADDLE_TRAINER_ID", "PADDLE_TRAINERS_NUM", "PADDLE_LOCAL_RANK", "PADDLE_RANK_IN_NODE", "RANK",
                "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert dist_info() == DistInfo(0, 1, 0)
    assert loader_worker() == (0, 1)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert dist_info() == DistInfo(0, 1, 0)
    monkeypatch.setenv("PADDLE_TRAINER_ID", "1")
    monkeypatch.setenv("PADDLE_TRAINERS_NUM", "2")
    assert dist_info() == DistInfo(1, 2, 1)
    monkeypatch.setenv("PADDLE_RANK_IN_NODE", "0")
    assert dist_info().local_rank == 0
    monkeypatch.setenv("PADDLE_TRAINER_ID", "2")
    with pytest.raises(ValueError, match="invalid PADDLE_TRAINER_ID=2 / PADDLE_TRAINERS_NUM=2"):
        dist_info()
