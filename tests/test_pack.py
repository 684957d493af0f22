"""Packers (launch/pack.py, ernievil2.data.packers): every input format round-trips through the shard reader."""
from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from ernievil2.data.b64 import decode_base64
from ernievil2.data.formats import SourceSpec, sample_key
from ernievil2.data.packers import pipeline
from ernievil2.data.packers.errors import PackError
from ernievil2.data.packers.images import ImageOptions, encode_image
from ernievil2.data.packers.objects import (
    load_detector_objects,
    merge_tags,
    select_tags,
)
from ernievil2.data.packers.pipeline import PackOptions, pack
from ernievil2.data.sample import RawSample
from ernievil2.data.shard_reader import iter_samples

REPO = Path(__file__).resolve().parents[1]
QUIET = PackOptions(progress=False)


def jpeg(w: int = 12, h: int = 8, shade: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (shade % 256, 80, 160)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def png(w: int = 10, h: int = 6, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    colour = (10, 20, 30, 0) if mode == "RGBA" else (10, 20, 30)
    Image.new(mode, (w, h), colour).save(buf, format="PNG")
    return buf.getvalue()


def read_back(out: Path) -> dict[str, RawSample]:
    return {s.key: s for s in iter_samples(out)}


def options(**kw) -> PackOptions:
    return PackOptions(progress=False, **kw)


def summary_json(out: Path) -> dict:
    return json.loads((out / pipeline.SUMMARY_FILE).read_text(encoding="utf-8"))


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# jsonl
# --------------------------------------------------------------------------------------------


@pytest.fixture()
def jsonl_set(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    for i in range(5):
        (images / f"im{i}.jpg").write_bytes(jpeg(shade=i * 40))
    (images / "broken.jpg").write_bytes(jpeg()[:40])  # truncated JPEG
    rows = [
        {"image": "images/im0.jpg", "image_id": "a.0", "captions_en": ["a dog", " a dog ", "a brown dog"],
         "captions_zh": ["一只狗"], "objects": [{"name": "dog", "count": 2}, {"name": "ball", "count": 1}],
         "license": "CC"},
        {"image": "images/im1.jpg", "captions": ["only one"], "language": "de", "objects": ["tree", "tree", " "]},
        {"image": "images/missing.jpg", "image_id": 7, "captions_en": ["gone"]},
        {"image": "images/im2.jpg", "image_id": 8, "captions_en": ["  ", ""]},
        "{not json",
        {"image": "images/broken.jpg", "image_id": 9, "captions_en": ["broken"]},
        {"image": "images/im3.jpg", "image_id": "a.0", "captions_en": ["same key as the first"]},
        {"image": "images/im4.jpg", "image_id": 10, "captions_en": ["last"]},
    ]
    return write_jsonl(tmp_path / "captions.jsonl", rows)


def test_jsonl_round_trip(jsonl_set: Path, tmp_path: Path):
    out = tmp_path / "out"
    summary = pack(SourceSpec("jsonl", jsonl_set), out, options(samples_per_shard=2))
    got = read_back(out)
    assert list(got) == ["a_0", "im1", "10"]
    first = got["a_0"]
    assert first.captions == ["a dog", "a brown dog", "一只狗"]
    assert first.lang == "mul" and first.meta["languages"] == ["en", "en", "zh"]
    assert first.objects == ["dog", "ball"] and first.meta["object_counts"] == {"dog": 2, "ball": 1}
    assert first.meta["image_id"] == "a.0" and first.meta["license"] == "CC"
    assert (first.meta["width"], first.meta["height"]) == (12, 8)
    assert first.image == (jsonl_set.parent / "images" / "im0.jpg").read_bytes()  # JPEG kept byte for byte
    assert got["im1"].captions == ["only one"] and got["im1"].lang == "de" and got["im1"].objects == ["tree"]
    assert got["10"].objects is None and got["10"].lang == "en"

    assert summary.written == 3 and summary.shards == 2 and summary.with_objects == 2
    assert summary.skipped == {"bad_record": 1, "corrupt_image": 1, "duplicate_key": 1, "missing_image": 1,
                               "no_captions": 1}
    assert json.loads((out / "sizes.json").read_text()) == {"shard-000000.tar": 2, "shard-000001.tar": 1}
    written = summary_json(out)
    assert written["written"] == 3 and written["skipped_total"] == 5
    assert written["skipped_examples"]["bad_record"] == [
        f"{jsonl_set}:5: invalid JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))"]
    assert "missing.jpg" in written["skipped_examples"]["missing_image"][0]
    assert written["skipped_examples"]["duplicate_key"] == [f"{jsonl_set}:7 (key a_0)"]


def test_jsonl_language_selects_captions(jsonl_set: Path, tmp_path: Path):
    pack(SourceSpec("jsonl", jsonl_set, language="zh"), tmp_path / "zh", QUIET)
    got = read_back(tmp_path / "zh")
    # captions_zh where present, else the generic "captions" field; records without either are skipped
    assert {k: (s.captions, s.lang) for k, s in got.items()} == {
        "a_0": (["一只狗"], "zh"), "im1": (["only one"], "zh")}
    assert "languages" not in got["a_0"].meta


def test_shard_byte_limit(jsonl_set: Path, tmp_path: Path):
    # each sample takes about 3.5 kB of tar (three members with headers, 512-byte padded)
    summary = pack(SourceSpec("jsonl", jsonl_set), tmp_path / "o", options(max_shard_bytes=5000))
    assert summary.shards == 3
    assert json.loads((tmp_path / "o" / "sizes.json").read_text()) == {f"shard-00000{i}.tar": 1 for i in range(3)}


def test_limit_reads_only_the_first_records(jsonl_set: Path, tmp_path: Path):
    summary = pack(SourceSpec("jsonl", jsonl_set), tmp_path / "o", options(limit=3))
    assert list(read_back(tmp_path / "o")) == ["a_0", "im1"]
    assert summary.skipped == {"missing_image": 1}


# --------------------------------------------------------------------------------------------
# seed_tsv and chinese_clip (base64 images)
# --------------------------------------------------------------------------------------------


def test_seed_tsv_groups_lines_of_one_image(tmp_path: Path):
    b64 = [base64.b64encode(jpeg(shade=i)).decode() for i in range(3)]
    lines = [f"红色的车\tid1\t{b64[0]}", f"一辆车\tid2\t{b64[1]}", f"路上的车\tid1\t{b64[0]}",
             "too\tfew", f"   \tid3\t{b64[2]}", f"坏图\tid4\t{base64.b64encode(b'not an image').decode()}",
             "坏码\tid5\t@@@@"]
    tsv = tmp_path / "seed.tsv"
    tsv.write_text("\n".join(lines) + "\n", encoding="utf-8")
    summary = pack(SourceSpec("seed_tsv", tsv), tmp_path / "o", QUIET)
    got = read_back(tmp_path / "o")
    assert {k: s.captions for k, s in got.items()} == {"id1": ["红色的车", "路上的车"], "id2": ["一辆车"]}
    assert all(s.lang == "zh" for s in got.values())
    assert got["id1"].image == jpeg(shade=0) and got["id1"].meta["image_id"] == "id1"
    assert summary.skipped == {"bad_base64": 1, "bad_record": 1, "corrupt_image": 1, "no_captions": 1}
    assert summary.skipped_examples["bad_record"] == [
        f"{tsv}:4: wrong column count: expected 3 tab-separated columns (text, image_id, base64), found 2 "
        "(image id 'few')"]
    assert summary.skipped_examples["bad_base64"][0].startswith(f"{tsv}:7: invalid base64")


def test_shared_seed_sample_packs(seed_sample: Path, tmp_path: Path):
    tsv = seed_sample
    lines = tsv.read_text(encoding="utf-8").splitlines()
    summary = pack(SourceSpec("seed_tsv", tsv), tmp_path / "o", QUIET)
    got = read_back(tmp_path / "o")
    assert summary.written == len(got) == len({ln.split("\t")[1] for ln in lines}) == 40
    text, image_id, _ = lines[0].split("\t")
    assert got[sample_key(image_id)].captions == [text]


def chinese_clip_files(folder: Path) -> None:
    folder.mkdir(exist_ok=True)
    urlsafe = [base64.urlsafe_b64encode(jpeg(w=30 + i, shade=200 + i)).decode().rstrip("=") for i in range(3)]
    (folder / "train_imgs.tsv").write_text(f"100\t{urlsafe[0]}\n101\t{urlsafe[1]}\n102\t{urlsafe[2]}\n", encoding="utf-8")
    write_jsonl(folder / "train_texts.jsonl", [
        {"text_id": 1, "text": "两只猫", "image_ids": [100, 101]},
        {"text_id": 2, "text": "一只猫在睡觉", "image_ids": [100]},
        {"text_id": 3, "text": "没有图片", "image_ids": [999]},
    ])


def test_chinese_clip_texts_join_images(tmp_path: Path):
    chinese_clip_files(tmp_path / "cc")
    summary = pack(SourceSpec("chinese_clip", tmp_path / "cc", splits=("train",)), tmp_path / "o", QUIET)
    got = read_back(tmp_path / "o")
    assert {k: s.captions for k, s in got.items()} == {"100": ["两只猫", "一只猫在睡觉"], "101": ["两只猫"]}
    assert got["101"].lang == "zh" and got["101"].meta["width"] == 31
    assert summary.skipped == {"no_captions": 1}
    assert summary.notes == {"text_image_ids": 3, "text_image_ids_without_image": 1}
    # the imgs.tsv path itself finds its texts file; --language relabels
    pack(SourceSpec("chinese_clip", tmp_path / "cc" / "train_imgs.tsv", language="en"), tmp_path / "o2", QUIET)
    assert {s.lang for s in read_back(tmp_path / "o2").values()} == {"en"}


def test_chinese_clip_folder_needs_split(tmp_path: Path):
    chinese_clip_files(tmp_path / "cc")
    with pytest.raises(PackError, match="name one split"):
        pack(SourceSpec("chinese_clip", tmp_path / "cc"), tmp_path / "o", QUIET)


# --------------------------------------------------------------------------------------------
# coco and karpathy (json + image folder)
# --------------------------------------------------------------------------------------------


def test_coco_objects_with_counts(tmp_path: Path):
    imgs = tmp_path / "train2017"
    imgs.mkdir()
    for i in (1, 2):
        (imgs / f"00000000000{i}.jpg").write_bytes(jpeg(shade=i))
    captions = {"images": [{"id": 1, "file_name": "000000000001.jpg"}, {"id": 2, "file_name": "000000000002.jpg"},
                           {"id": 3, "file_name": "000000000003.jpg"}],
                "annotations": [{"image_id": 1, "caption": "a cat and two dogs"}, {"image_id": 2, "caption": "grass"},
                                {"image_id": 1, "caption": "pets"}, {"image_id": 3, "caption": "no file"}]}
    instances = {"categories": [{"id": 17, "name": "cat"}, {"id": 18, "name": "dog"}],
                 "annotations": [{"id": 1, "image_id": 1, "category_id": 17}, {"id": 2, "image_id": 1, "category_id": 18},
                                 {"id": 3, "image_id": 1, "category_id": 18, "iscrowd": 1}]}
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    summary = pack(SourceSpec("coco", tmp_path / "captions.json", images=imgs, instances=tmp_path / "instances.json"),
                   tmp_path / "o", QUIET)
    got = read_back(tmp_path / "o")
    assert list(got) == ["000000000001", "000000000002"]
    one, two = got["000000000001"], got["000000000002"]
    assert one.captions == ["a cat and two dogs", "pets"] and one.lang == "en"
    assert one.objects == ["dog", "cat"] and one.meta["object_counts"] == {"dog": 2, "cat": 1}
    assert one.meta["image_id"] == 1
    assert two.objects is None and "object_counts" not in two.meta
    assert summary.skipped == {"missing_image": 1} and summary.with_objects == 1


def test_coco_unknown_category_is_an_error(tmp_path: Path):
    (tmp_path / "c.json").write_text(json.dumps({"images": [], "annotations": []}))
    (tmp_path / "i.json").write_text(json.dumps({"categories": [], "annotations": [{"id": 5, "image_id": 1, "category_id": 3}]}))
    with pytest.raises(PackError, match=r"i\.json: annotation 5 .* unknown category_id 3"):
        pack(SourceSpec("coco", tmp_path / "c.json", instances=tmp_path / "i.json"), tmp_path / "o", QUIET)
    assert not (tmp_path / "o").exists()  # input errors come before the output is touched


def test_karpathy_split_filter_and_filepath(tmp_path: Path):
    (tmp_path / "imgs" / "val2014").mkdir(parents=True)
    (tmp_path / "imgs" / "val2014" / "COCO_val2014_1.jpg").write_bytes(jpeg(shade=3))
    (tmp_path / "imgs" / "f30k.jpg").write_bytes(png())
    data = {"dataset": "mixed", "images": [
        {"filename": "COCO_val2014_1.jpg", "filepath": "val2014", "split": "test", "imgid": 0, "cocoid": 1,
         "sentences": [{"raw": "A man riding a horse."}, {"raw": "A rider."}]},
        {"filename": "f30k.jpg", "split": "restval", "imgid": 1, "sentences": [{"raw": "Grey square."}]},
        {"filename": "other.jpg", "split": "train", "imgid": 2, "sentences": [{"raw": "not kept"}]},
    ]}
    (tmp_path / "karpathy.json").write_text(json.dumps(data))
    spec = SourceSpec("karpathy", tmp_path / "karpathy.json", images=tmp_path / "imgs", splits=("test", "restval"))
    summary = pack(spec, tmp_path / "o", QUIET)
    got = read_back(tmp_path / "o")
    assert {k: s.captions for k, s in got.items()} == {"COCO_val2014_1": ["A man riding a horse.", "A rider."],
                                                       "f30k": ["Grey square."]}
    assert got["COCO_val2014_1"].meta["cocoid"] == 1 and got["f30k"].meta["split"] == "restval"
    assert summary.written == 2 and summary.reencoded == 1  # the PNG became a JPEG
    assert Image.open(io.BytesIO(got["f30k"].image)).format == "JPEG"


# --------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------


def test_resize_keeps_aspect_and_reencodes_only_when_needed():
    big = jpeg(w=300, h=120)
    out = encode_image(big, ImageOptions(max_side=100, jpeg_quality=80))
    assert (out.width, out.height, out.original_width, out.original_height) == (100, 40, 300, 120)
    assert out.resized and out.reencoded and Image.open(io.BytesIO(out.data)).size == (100, 40)
    kept = encode_image(big, ImageOptions(max_side=300))
    assert kept.data == big and not kept.resized and not kept.reencoded
    transparent = encode_image(png(mode="RGBA"), ImageOptions())
    assert transparent.reencoded and not transparent.resized
    pixel = Image.open(io.BytesIO(transparent.data)).convert("RGB").getpixel((5, 3))
    assert all(c > 240 for c in pixel)  # transparent pixels land on white
    with pytest.raises(ValueError, match="cannot decode image"):
        encode_image(big[: len(big) // 2], ImageOptions())


def test_resize_option_in_a_pack(jsonl_set: Path, tmp_path: Path):
    summary = pack(SourceSpec("jsonl", jsonl_set), tmp_path / "o", options(image=ImageOptions(max_side=6)))
    got = read_back(tmp_path / "o")
    assert summary.resized == summary.written == 3
    assert {(s.meta["width"], s.meta["height"], s.meta["original_width"]) for s in got.values()} == {(6, 4, 12)}


def test_decode_base64_both_alphabets():
    data = bytes(range(256))
    assert decode_base64(base64.b64encode(data).decode()) == data
    assert decode_base64(base64.urlsafe_b64encode(data).decode().rstrip("=")) == data
    with pytest.raises(ValueError, match="not base64"):
        decode_base64("ab$d")


# --------------------------------------------------------------------------------------------
# detector / tagger objects
# --------------------------------------------------------------------------------------------


def test_select_and_merge_tags():
    tags = [("car", 0.4), ("tree", 0.9), ("car", 0.8), ("sky", 0.2), ("road", 0.8)]
    assert select_tags(tags, min_score=0.3) == [("tree", 0.9), ("car", 0.8), ("road", 0.8)]
    assert select_tags(tags, min_score=0.3, max_count=2) == [("tree", 0.9), ("car", 0.8)]
    assert merge_tags(["car", "person"], [("tree", 0.9), ("car", 0.8)]) == ["car", "person", "tree"]
    assert merge_tags(None, []) is None


def test_objects_file_threshold_max_and_merge(jsonl_set: Path, tmp_path: Path):
    tags = write_jsonl(tmp_path / "tags.jsonl", [
        {"key": "a.0", "objects": [{"name": "grass", "score": 0.9}, {"name": "dog", "score": 0.95},
                                   {"name": "cloud", "score": 0.1}, {"name": "leash", "score": 0.6}]},
        {"im1": [{"name": "bird", "score": 0.7}], "nowhere": [{"name": "x", "score": 1.0}]},
        {"10": [{"name": "sun", "score": 0.05}]},
    ])
    summary = pack(SourceSpec("jsonl", jsonl_set), tmp_path / "o",
                   options(objects_file=tags, objects_min_score=0.5, objects_max=2))
    got = read_back(tmp_path / "o")
    assert got["a_0"].objects == ["dog", "ball", "grass"]  # own tags first, then the 2 best new ones
    assert got["a_0"].meta["object_scores"] == {"dog": 0.95, "grass": 0.9}
    assert got["im1"].objects == ["tree", "bird"]
    assert got["10"].objects is None and "object_scores" not in got["10"].meta  # its only tag is below 0.5
    assert summary.detector["samples_tagged"] == 2 and summary.detector["keys_without_sample"] == 1


def test_objects_file_errors_name_the_line(tmp_path: Path):
    bad = write_jsonl(tmp_path / "tags.jsonl", [{"k": [{"name": "a", "score": 1}]}, {"k": [{"name": "a"}]}])
    with pytest.raises(PackError, match=r"tags\.jsonl:2, key k: entry .* is not a"):
        load_detector_objects(bad)


# --------------------------------------------------------------------------------------------
# workers, output folder, interruption
# --------------------------------------------------------------------------------------------


def test_two_workers_write_the_same_bytes(tmp_path: Path):
    rows = []
    (tmp_path / "images").mkdir()
    for i in range(40):
        (tmp_path / "images" / f"{i}.png").write_bytes(png(w=20 + i, h=10)) if i % 3 == 0 else \
            (tmp_path / "images" / f"{i}.jpg").write_bytes(jpeg(w=20 + i, shade=i))
        rows.append({"image": f"images/{i}.{'png' if i % 3 == 0 else 'jpg'}", "captions": [f"image {i}"]})
    rows.insert(7, {"image": "images/none.jpg", "captions": ["missing"]})
    src = SourceSpec("jsonl", write_jsonl(tmp_path / "c.jsonl", rows))
    one = pack(src, tmp_path / "w1", options(samples_per_shard=16, image=ImageOptions(max_side=30)))
    two = pack(src, tmp_path / "w2", options(samples_per_shard=16, image=ImageOptions(max_side=30), workers=2,
                                             batch_size=3))
    assert one.written == two.written == 40 and one.skipped == two.skipped == {"missing_image": 1}
    names = sorted(p.name for p in (tmp_path / "w1").glob("*.tar"))
    assert names == sorted(p.name for p in (tmp_path / "w2").glob("*.tar")) and len(names) == 3
    for name in names + ["sizes.json"]:
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes()


def test_refuses_non_empty_output_unless_overwrite(jsonl_set: Path, tmp_path: Path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "shard-000099.tar").write_bytes(b"old")
    (out / "shard-000000.tar.tmp").write_bytes(b"half")
    (out / "README.txt").write_text("mine")
    with pytest.raises(PackError, match=f"output folder {out} is not empty"):
        pack(SourceSpec("jsonl", jsonl_set), out, QUIET)
    assert (out / "shard-000099.tar").read_bytes() == b"old"
    pack(SourceSpec("jsonl", jsonl_set), out, options(overwrite=True))
    assert sorted(p.name for p in out.iterdir()) == ["README.txt", "pack_summary.json", "shard-000000.tar", "sizes.json"]
    assert len(read_back(out)) == 3


def test_failure_midway_leaves_only_complete_shards(jsonl_set: Path, tmp_path: Path, monkeypatch):
    calls = []
    real = pipeline.prepare_image

    def failing(source, opts):
        calls.append(source)
        if len(calls) == 4:
            raise RuntimeError("disk on fire")
        return real(source, opts)

    monkeypatch.setattr(pipeline, "prepare_image", failing)
    out = tmp_path / "o"
    with pytest.raises(RuntimeError, match="disk on fire"):
        pack(SourceSpec("jsonl", jsonl_set), out, options(samples_per_shard=1))
    # im0's shard was closed when im1 arrived; im1's shard was still open when the 4th call raised
    # (the 3rd image is missing): it is dropped, and there is no sizes.json or summary
    assert sorted(p.name for p in out.iterdir()) == ["shard-000000.tar"]
    assert [s.key for s in iter_samples(out)] == ["a_0"]


KILL_SCRIPT = """
import os, signal, sys
from pathlib import Path
from ernievil2.data.packers import pipeline
from ernievil2.data.formats import SourceSpec
calls = [0]
real = pipeline.prepare_image
def dying(source, opts):
    calls[0] += 1
    if calls[0] == 6:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(source, opts)
pipeline.prepare_image = dying
pipeline.pack(SourceSpec("jsonl", Path(sys.argv[1])), sys.argv[2],
              pipeline.PackOptions(samples_per_shard=2, progress=False))
"""


def test_sigkill_midway_leaves_no_incomplete_tar(tmp_path: Path):
    (tmp_path / "images").mkdir()
    rows = []
    for i in range(8):
        (tmp_path / "images" / f"{i}.jpg").write_bytes(jpeg(shade=i))
        rows.append({"image": f"images/{i}.jpg", "captions": [f"c{i}"]})
    src = write_jsonl(tmp_path / "c.jsonl", rows)
    out = tmp_path / "o"
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(src), str(out)], cwd=REPO, capture_output=True,
                          check=False)
    assert proc.returncode == -9
    names = sorted(p.name for p in out.iterdir())
    # two full shards renamed into place; the third (holding sample 4) still under its temporary name
    assert names == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar.tmp"]
    for name in names[:2]:
        with tarfile.open(out / name) as tar:
            assert len(tar.getmembers()) == 6
    summary = pack(SourceSpec("jsonl", src), out, options(overwrite=True, samples_per_shard=2))
    assert summary.written == 8 and not list(out.glob("*.tmp"))


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


def run_pack_cli(args: list[str]) -> subprocess.CompletedProcess:
    """launch/pack.py ARGS in a subprocess (the CLI under test)."""
    return subprocess.run([sys.executable, "launch/pack.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def test_cli_exit_codes(jsonl_set: Path, tmp_path: Path):
    out = tmp_path / "o"
    base = ["--format", "jsonl", "--input", str(jsonl_set), "--output", str(out), "--no-progress"]
    proc = run_pack_cli(base + ["--samples-per-shard", "2", "--max-side", "8"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "packed 3 sample(s) into 2 shard(s)" in proc.stdout
    proc = run_pack_cli(base)
    assert proc.returncode == 2 and "is not empty" in proc.stderr
    gone = write_jsonl(tmp_path / "gone.jsonl", [{"image": "nowhere.jpg", "captions": ["lost"]}])
    proc = run_pack_cli(["--format", "jsonl", "--input", str(gone), "--output", str(tmp_path / "empty")])
    assert proc.returncode == 1 and "nothing was written" in proc.stderr
    assert summary_json(tmp_path / "empty")["skipped"] == {"missing_image": 1}
    assert json.loads((tmp_path / "empty" / "sizes.json").read_text()) == {}


# --------------------------------------------------------------------------------------------
# the shared real sets
# --------------------------------------------------------------------------------------------


def source_rows(path: Path, n: int) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for _, line in zip(range(n), f)]


def test_shared_flickr8k_cn_packs(flickr8k_dir: Path, tmp_path: Path):
    jsonl = flickr8k_dir / "captions.jsonl"
    summary = pack(SourceSpec("jsonl", jsonl, language="zh"), tmp_path / "o", options(limit=20, samples_per_shard=8))
    got = read_back(tmp_path / "o")
    rows = source_rows(jsonl, 20)
    assert summary.written == 20 and summary.shards == 3 and not summary.skipped
    assert [s.key for s in got.values()] == [r["image_id"] for r in rows]
    assert sum(len(set(r["captions_zh"])) < len(r["captions_zh"]) for r in rows) > 0
    for row in rows:
        sample = got[row["image_id"]]
        # repeated captions of one image (this set has some) are kept once, in their first place
        assert sample.captions == list(dict.fromkeys(row["captions_zh"])) and sample.lang == "zh"
        assert sample.image == (flickr8k_dir / row["image"]).read_bytes()


def test_shared_coco_mini_packs(coco_mini_dir: Path, tmp_path: Path):
    jsonl = coco_mini_dir / "captions.jsonl"
    summary = pack(SourceSpec("jsonl", jsonl), tmp_path / "o", options(limit=20, workers=2))
    got = read_back(tmp_path / "o")
    assert summary.written == 20 and summary.with_objects == 20
    for row in source_rows(jsonl, 20):
        sample = got[str(row["image_id"])]
        assert sample.captions == row["captions_en"] and sample.lang == "en"
        assert sample.objects == [o["name"] for o in row["objects"]]
        assert sample.meta["object_counts"] == {o["name"]: o["count"] for o in row["objects"]}
