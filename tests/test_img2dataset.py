"""img2dataset's output folder trains as it is.

An img2dataset-layout folder is built here (``NNNNN.tar`` of ``KEY.jpg`` / ``KEY.txt`` / ``KEY.json``,
``NNNNN_stats.json``, ``NNNNN.parquet`` when pyarrow is installed) and checked:

- the epoch length comes from the ``_stats.json`` files, with no counting pass; a ``sizes.json``
  wins over them; a malformed one is an error naming it;
- without stats, ``num_samples`` stands in (spread over the shards, estimates not taken for damage);
- without either, one counting pass, cached beside the run and reused; a changed shard is
  counted again; under the launcher only rank 0 counts (slow);
- each sample's language comes from its json, else from its caption's script;
- ``launch/train.py data=shards data.train_shards=DIR`` trains on the folder (slow).
"""
from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ernievil2.data import epoch_sizes
from ernievil2.data.caption_language import guess_language
from ernievil2.data.loader import StreamSource, TrainStream, build_train_data
from ernievil2.data.shard_reader import iter_samples, list_shards, read_shard
from ernievil2.train.config import DataSchema, SourceSchema

REPO_ROOT = Path(__file__).resolve().parents[1]
SIZES = (5, 3, 4)  # samples per shard
CAPTIONS = ("a red car parked on a street", "一只狗在草地上奔跑", "Nike 运动鞋 男款", "a photo of 北京 at night")


def _jpeg(i: int) -> bytes:
    rng = np.random.default_rng(i)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    tar.addfile(info, io.BytesIO(data))


def write_shard(folder: Path, shard: int, n: int, failed: int = 2, stats: bool = True, first: int = 0) -> list[dict]:
    """One img2dataset webdataset shard: ``n`` successes in ``{shard:05d}.tar`` (keys shard + index,
    as img2dataset makes them), ``failed`` rows only in the parquet and the stats. Returns the rows."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
        for i in range(n + failed):
            key = f"{shard:05d}{i:04d}"
            caption = CAPTIONS[(first + i) % len(CAPTIONS)]
            ok = i < n
            meta = {"url": f"http://example.com/{key}.jpg", "caption": caption, "key": key,
                    "status": "success" if ok else "failed_to_download",
                    "error_message": None if ok else "HTTP Error 404", "width": 48 if ok else None,
                    "height": 40 if ok else None, "original_width": 96 if ok else None,
                    "original_height": 80 if ok else None, "exif": None, "sha256": None}
            rows.append(meta)
            if ok:
                _add(tar, f"{key}.jpg", _jpeg(shard * 100 + i))
                _add(tar, f"{key}.txt", caption.encode("utf-8"))
                _add(tar, f"{key}.json", json.dumps(meta, indent=4).encode("utf-8"))
    if stats:
        (folder / f"{shard:05d}_stats.json").write_text(json.dumps({
            "count": n + failed, "successes": n, "failed_to_download": failed, "failed_to_resize": 0,
            "duration": 1.5, "status_dict": {"success": n, "HTTP Error 404": failed}}, indent=4))
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:  # the parquet is img2dataset's record of every row; training never reads it
        return rows
    pq.write_table(pa.Table.from_pylist(rows), folder / f"{shard:05d}.parquet")
    return rows


def img2dataset_folder(folder: Path, sizes=SIZES, stats: bool = True) -> Path:
    first = 0
    for shard, n in enumerate(sizes):
        write_shard(folder, shard, n, stats=stats, first=first)
        first += n
    return folder


@pytest.fixture()
def no_counting(monkeypatch):
    def refuse(url: str) -> int:
        raise AssertionError(f"counting pass over {url}")

    monkeypatch.setattr(epoch_sizes, "count_samples", refuse)


@pytest.fixture()
def counted(monkeypatch) -> list[str]:
    calls: list[str] = []
    count = epoch_sizes.count_samples

    def recording(url: str) -> int:
        calls.append(url)
        return count(url)

    monkeypatch.setattr(epoch_sizes, "count_samples", recording)
    return calls


@pytest.fixture(autouse=True)
def one_process(monkeypatch):
    for var in ("PADDLE_TRAINER_ID", "PADDLE_TRAINERS_NUM"):
        monkeypatch.delenv(var, raising=False)


def _keys(sample, epoch: int) -> dict:
    return {"n": np.asarray(int(sample.key))}


def _stream(folder: Path, **kw) -> TrainStream:
    return TrainStream([StreamSource.of("train", folder, num_samples=kw.pop("num_samples", None))], _keys,
                       batch_size=1, **kw)


# ------------------------------------------------------------------------------------------------
# epoch length
# ------------------------------------------------------------------------------------------------


def test_epoch_length_from_stats_without_counting(tmp_path, no_counting):
    folder = img2dataset_folder(tmp_path / "laion")
    assert sorted(p.name for p in folder.iterdir() if not p.name.endswith(".parquet")) == [
        "00000.tar", "00000_stats.json", "00001.tar", "00001_stats.json", "00002.tar", "00002_stats.json"]
    data = build_train_data([StreamSource.of("train", folder)], _keys, batch_size=2, num_workers=0,
                            shuffle_buffer=0, seed=0, world_size=1, sizes_cache=tmp_path / "run" / "shard_sizes.json")
    assert data.samples_per_epoch == sum(SIZES) == 12
    assert data.stream.sizes == {str(folder / f"{i:05d}.tar"): n for i, n in enumerate(SIZES)}
    assert not data.stream.estimated
    batches = list(data.batches(0))
    assert len(batches) == data.batches_per_epoch(0) == 6
    assert sorted(int(n) for b in batches for n in np.asarray(b["n"])) == sorted(
        int(f"{s:05d}{i:04d}") for s, n in enumerate(SIZES) for i in range(n))
    assert not any("skipped" in b for b in batches)
    assert not (tmp_path / "run").exists(), "nothing counted, nothing cached"


def test_sizes_json_wins_over_stats(tmp_path, no_counting):
    folder = img2dataset_folder(tmp_path / "laion")
    (folder / "sizes.json").write_text(json.dumps({"00000.tar": 5, "00001.tar": 3}))
    (folder / "00000_stats.json").write_text('{"successes": 99}')  # disagrees: never read
    (folder / "00001_stats.json").write_text("{not json")  # malformed: never read either
    stream = _stream(folder)
    assert list(stream.sizes.values()) == [5, 3, 4]  # 00002 from its stats


@pytest.mark.parametrize("text, what", [("{not json", "not JSON"), ('{"count": 5}', "'successes'"),
                                        ('{"successes": -1}', "'successes'"), ("[3]", "'successes'")])
def test_malformed_stats_is_an_error_naming_the_file(tmp_path, no_counting, text, what):
    folder = img2dataset_folder(tmp_path / "laion")
    (folder / "00001_stats.json").write_text(text)
    with pytest.raises(ValueError, match=re.escape(str(folder / "00001_stats.json")) + ".*" + re.escape(what)) as err:
        _stream(folder)
    assert "sizes.json" in str(err.value)  # the way out


def test_num_samples_when_no_stats(tmp_path, no_counting):
    folder = img2dataset_folder(tmp_path / "laion", stats=False)
    stream = _stream(folder, num_samples=12)
    assert list(stream.sizes.values()) == [4, 4, 4] and stream.estimated == set(stream.sizes)
    # The estimates fix the batch count; a shard with fewer samples than its estimate is not damage.
    stream.set_position(0)
    items = list(iter(stream))
    assert sum("n" in b for b in items) == 12 and sum(int(np.sum(b["skipped"])) for b in items) == 0
    # Shards with stats keep their count; num_samples covers the rest.
    write_shard(folder, 0, 5)
    stream = _stream(folder, num_samples=12)
    assert list(stream.sizes.values()) == [5, 4, 3] and stream.estimated == set(list(stream.sizes)[1:])
    with pytest.raises(ValueError, match=r"num_samples=4 is less than the 5 samples"):
        _stream(folder, num_samples=4)
    with pytest.raises(ValueError, match="num_samples must be a whole number >= 1"):
        StreamSource.of("train", folder, num_samples=0)


def test_truncated_shard_is_still_caught_with_stats(tmp_path, caplog):
    folder = img2dataset_folder(tmp_path / "laion")
    (folder / "00001_stats.json").write_text('{"successes": 4}')  # the tar holds 3: it was cut short
    stream = _stream(folder)
    stream.set_position(0)
    batches = list(iter(stream))
    assert sum(int(b["skipped"][0]) for b in batches) == 1  # truncated_tar
    assert "read 3 of the 4 samples" in caplog.text


def test_num_samples_config_keys(tmp_path):
    folder = img2dataset_folder(tmp_path / "laion", stats=False)
    one = DataSchema(source="shards", train_shards=str(folder), num_samples=1000).stream_sources()
    assert [(s.name, s.num_samples) for s in one] == [("train", 1000)]
    mix = DataSchema(source="shards", sources=[SourceSchema(name="a", shards=str(folder), num_samples=7),
                                               SourceSchema(name="b", shards=str(folder))]).stream_sources()
    assert [(s.name, s.num_samples) for s in mix] == [("a", 7), ("b", None)]
    with pytest.raises(ValueError, match="data.num_samples goes with data.train_shards"):
        DataSchema(source="shards", sources=[SourceSchema(name="a", shards=str(folder))], num_samples=3).stream_sources()


def test_counting_pass_is_cached_and_a_changed_shard_recounted(tmp_path, counted):
    folder = img2dataset_folder(tmp_path / "laion", stats=False)
    cache = tmp_path / "run" / "shard_sizes.json"
    shards = list_shards(folder)
    assert list(_stream(folder, sizes_cache=cache).sizes.values()) == list(SIZES)
    assert counted == shards
    entries = json.loads(cache.read_text())["shards"]
    assert set(entries) == {os.path.abspath(u) for u in shards}
    assert all(set(e) == {"samples", "bytes", "mtime_ns"} for e in entries.values())
    counted.clear()
    assert list(_stream(folder, sizes_cache=cache).sizes.values()) == list(SIZES)  # a resumed run
    assert counted == []
    write_shard(folder, 1, 6, stats=False)
    os.utime(shards[1], ns=(0, os.stat(shards[1]).st_mtime_ns + 10**9))  # whatever the clock's resolution
    assert list(_stream(folder, sizes_cache=cache).sizes.values()) == [5, 6, 4]
    assert counted == [shards[1]]
    counted.clear()
    assert list(_stream(folder).sizes.values()) == [5, 6, 4] and len(counted) == 3  # no cache: counted


def test_remote_shards_are_cached_by_url(tmp_path, counted):
    folder = img2dataset_folder(tmp_path / "laion", stats=False)
    url = f"pipe:cat {folder / '00000.tar'}"
    assert epoch_sizes.stats_file(url) is None
    cache = tmp_path / "shard_sizes.json"
    assert epoch_sizes.count_shards([url], cache) == {url: 5}
    assert json.loads(cache.read_text())["shards"] == {url: {"samples": 5}}
    assert epoch_sizes.count_shards([url], cache) == {url: 5} and counted == [url]


# ------------------------------------------------------------------------------------------------
# language per sample
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, lang", [
    ("a red car parked on a street", "en"),
    ("一只狗在草地上奔跑", "zh"),
    ("Nike 运动鞋 男款", "zh"),          # 5 ideographs, 1 word
    ("iPhone 手机壳", "zh"),             # 3 ideographs, 1 word
    ("a photo of 北京 at night", "en"),  # 2 ideographs, 5 words
    ("我 love", "zh"),                   # a tie goes to zh
    ("", "en"),
    ("  2024 !! 123 ", "en"),
    ("東京タワーの夜景", "ja"),          # kana: not Chinese
    ("ひらがな", "ja"),
    ("강아지 사진", "en"),                # Hangul is not told apart
    ("Собака на траве", "en"),
    ("𠀀𠀁", "zh"),                       # extension B
])
def test_guess_language(text, lang):
    assert guess_language(text) == lang


def test_img2dataset_samples_decode_with_a_language_each(tmp_path):
    folder = img2dataset_folder(tmp_path / "laion", sizes=(4,))
    samples = [s for _, s in read_shard(str(folder / "00000.tar"), lambda u, e: pytest.fail(str(e)))]
    assert [s.captions for s in samples] == [[c] for c in CAPTIONS]  # KEY.txt, json has no captions
    assert [s.lang for s in samples] == ["en", "zh", "zh", "en"]
    assert all(s.objects is None for s in samples)  # no tags: left out of the image-objects loss
    first = samples[0]
    assert first.key == "000000000" and first.meta["url"] == "http://example.com/000000000.jpg"
    assert first.meta["status"] == "success" and (first.meta["width"], first.meta["height"]) == (48, 40)
    assert "key" not in first.meta
    # A json that names the language keeps it.
    sub = tmp_path / "named"
    sub.mkdir()
    with tarfile.open(sub / "00000.tar", "w") as tar:
        _add(tar, "k.jpg", _jpeg(0))
        _add(tar, "k.txt", "一只狗".encode())
        _add(tar, "k.json", json.dumps({"caption": "一只狗", "language": "ja"}).encode())
    assert [s.lang for s in iter_samples(sub)] == ["ja"]
    # LAION's column, as img2dataset's --save_additional_columns keeps it (upper case name and value)
    with tarfile.open(sub / "00000.tar", "w") as tar:
        _add(tar, "k.jpg", _jpeg(0))
        _add(tar, "k.txt", b"a dog")
        _add(tar, "k.json", json.dumps({"caption": "a dog", "LANGUAGE": "ZH"}).encode())
    assert [s.lang for s in iter_samples(sub)] == ["zh"]


# ------------------------------------------------------------------------------------------------
# launch/train.py on the folder; one counting process under the launcher
# ------------------------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PADDLE_") and k not in ("RANK", "WORLD_SIZE", "ERNIEVIL2_RUN_TIME")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_train_on_an_img2dataset_folder(tmp_path):
    folder = img2dataset_folder(tmp_path / "shards" / "laion")
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "launch" / "train.py"), "data=shards", f"data.train_shards={folder}",
         "model=tiny", "trainer.max_steps=2", "trainer.device=cpu", "data.batch_size=4", "data.num_workers=0",
         "data.shuffle_buffer=8", "eval=none", "trainer.save_checkpoint=false", "logger.log_every=1",
         f"hydra.run.dir={run}"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=280, check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(np.isfinite(r["loss"]) for r in log)
    assert "_stats.json 3, num_samples 0, to count 0" in text, text[-4000:]
    assert not (run / "shard_sizes.json").exists()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_one_rank_counts_under_the_launcher(tmp_path):
    folder = img2dataset_folder(tmp_path / "laion", stats=False)
    cache = tmp_path / "run" / "shard_sizes.json"
    log_dir = tmp_path / "log"
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", str(log_dir),
           str(REPO_ROOT / "tests" / "dist_count_worker.py"), "--shards", str(folder), "--cache", str(cache),
           "--out", str(tmp_path / "out")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=170, check=False)
    logs = "".join(p.read_text(errors="replace") for p in sorted(log_dir.glob("workerlog.*")))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:] + logs[-4000:]
    records = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in range(2)]
    shards = list_shards(folder)
    assert [(r["rank"], r["world"]) for r in records] == [(0, 2), (1, 2)]
    assert records[0]["counted"] == shards and records[1]["counted"] == []
    assert records[0]["sizes"] == records[1]["sizes"] == dict(zip(shards, SIZES))
    assert set(json.loads(cache.read_text())["shards"]) == {os.path.abspath(u) for u in shards}
