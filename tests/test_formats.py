"""The dataset format readers (ernievil2.data.formats): every format round-trips through the packer
(pack, read the shards back with the ``shards`` reader, compare with the format's own reader), one
spelling per format name everywhere, one key rule per format, and the per-line checks the upstream TSV
shares with inference and evaluation."""
from __future__ import annotations

import base64
import dataclasses
import io
import json
import re
from collections import Counter
from pathlib import Path

import pytest
import yaml
from PIL import Image

from ernievil2 import inference
from ernievil2.data import formats
from ernievil2.data.formats import (
    FORMATS,
    FormatError,
    ImageLoadError,
    ImageSource,
    Item,
    LineProblem,
    Problem,
    SeedLine,
    SourceSpec,
    open_source,
)
from ernievil2.data.packers.errors import PackError
from ernievil2.data.packers.pipeline import PackOptions, pack
from ernievil2.evaluators import retrieval as evaluation
from ernievil2.evaluators.retrieval import EvalDataError, EvalSetSpec, eval_set_spec, read_items
from ernievil2.train.config import EvalSetSchema

REPO = Path(__file__).resolve().parents[1]
IMAGE_REASONS = {"missing_image", "unreadable_image", "corrupt_image", "too_large_image"}


def jpeg(shade: int, w: int = 14, h: int = 9) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (shade % 256, 60, 200)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def png(w: int = 11, h: int = 7) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes, urlsafe: bool = False) -> str:
    return (base64.urlsafe_b64encode(data).decode().rstrip("=") if urlsafe else base64.b64encode(data).decode())


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# one small dataset, written in every packable format (each with a few records its reader rejects)
# --------------------------------------------------------------------------------------------

# (stem, captions, objects name -> count); captions carry a repeat and stray whitespace on purpose
IMAGES = [
    ("pic.0", ["a red car", " a red car ", "a car on a road"], {"car": 2, "road": 1}),
    ("pic-1", ["two dogs"], {"dog": 2}),
    ("pic_2", ["a grey square", "square"], {}),  # stored as PNG: the packer re-encodes it
    ("pic3", ["a bird in the sky", "bird"], {"bird": 1, "sky": 1}),
]


def image_bytes(k: int) -> bytes:
    return png() if k == 2 else jpeg(40 * k)


def write_files(root: Path) -> Path:
    (root / "images" / "sub").mkdir(parents=True, exist_ok=True)
    for k, (stem, _, _) in enumerate(IMAGES):
        (root / "images" / "sub" / f"{stem}.{'png' if k == 2 else 'jpg'}").write_bytes(image_bytes(k))
    return root / "images"


def file_name(k: int) -> str:
    return f"{IMAGES[k][0]}.{'png' if k == 2 else 'jpg'}"


def make_jsonl(root: Path) -> tuple[SourceSpec, Counter]:
    images = write_files(root)
    rows: list = [{"image": f"sub/{file_name(k)}", **({"image_id": f"id.{k}"} if k % 2 == 0 else {}),
                   "captions_en": caps, "objects": [{"name": n, "count": c} for n, c in objs.items()] or None}
                  for k, (_, caps, objs) in enumerate(IMAGES)]
    rows.insert(1, "{broken")
    rows.insert(3, {"image": "sub/nothing.jpg", "captions_en": ["  "]})
    rows.append({"image": "sub/missing.jpg", "captions_en": ["no file"]})  # an image failure, not a reader problem
    path = write_lines(root / "c.jsonl", [r if isinstance(r, str) else json.dumps(r) for r in rows])
    return SourceSpec("jsonl", path, images=images), Counter(bad_record=1, no_captions=1)


def make_seed_tsv(root: Path) -> tuple[SourceSpec, Counter]:
    lines = []
    for j in range(3):  # captions spread over the file: lines of one image are not adjacent
        for k, (stem, caps, _) in enumerate(IMAGES):
            if j < len(caps):
                lines.append(f"{caps[j]}\t{stem}\t{b64(image_bytes(k))}")
    lines[1:1] = ["only\ttwo", f"  \tpic9\t{b64(jpeg(1))}", "text\tpic8\t@@not base64@@", f"text\t \t{b64(jpeg(1))}"]
    problems = Counter(bad_record=2, no_captions=1, bad_base64=1)
    return SourceSpec("seed_tsv", write_lines(root / "s.tsv", lines)), problems


def make_chinese_clip(root: Path) -> tuple[SourceSpec, Counter]:
    (root / "cc").mkdir()
    imgs = [f"{stem}\t{b64(image_bytes(k), urlsafe=k % 2 == 1)}" for k, (stem, _, _) in enumerate(IMAGES)]
    imgs[2:2] = ["lonely\t" + b64(jpeg(9)), "three\tcolumns\there"]
    write_lines(root / "cc" / "train_imgs.tsv", imgs)
    texts = [{"text_id": 10 * k + j, "text": c, "image_ids": [stem]}
             for k, (stem, caps, _) in enumerate(IMAGES) for j, c in enumerate(caps)]
    texts.append({"text_id": 999, "text": "no such image", "image_ids": ["ghost"]})
    write_lines(root / "cc" / "train_texts.jsonl", [json.dumps(t) for t in texts])
    return SourceSpec("chinese_clip", root / "cc", splits=("train",)), Counter(bad_record=1, no_captions=1)


def make_coco(root: Path) -> tuple[SourceSpec, Counter]:
    images = write_files(root)
    names = sorted({n for _, _, objs in IMAGES for n in objs})
    cat_ids = {n: 3 + 2 * i for i, n in enumerate(names)}
    entries = [{"id": 100 + k, "file_name": f"sub/{file_name(k)}"} for k in range(len(IMAGES))]
    entries.insert(1, {"id": 7})  # no file_name
    entries.append({"id": 8, "file_name": "sub/uncaptioned.jpg"})
    anns = [{"id": 1000 + i, "image_id": 100 + k, "caption": c}
            for i, (k, c) in enumerate((k, c) for k, (_, caps, _) in enumerate(IMAGES) for c in caps)]
    inst = [{"id": 5000 + i, "image_id": 100 + k, "category_id": cat_ids[n]}
            for i, (k, n) in enumerate((k, n) for k, (_, _, objs) in enumerate(IMAGES) for n, c in objs.items()
                                       for _ in range(c))]
    write_json(root / "captions.json", {"images": entries, "annotations": anns})
    write_json(root / "instances.json",
               {"annotations": inst, "categories": [{"id": i, "name": n} for n, i in cat_ids.items()]})
    return (SourceSpec("coco", root / "captions.json", images=images, instances=root / "instances.json"),
            Counter(bad_record=1, no_captions=1))


def make_karpathy(root: Path) -> tuple[SourceSpec, Counter]:
    images = write_files(root)
    entries = [{"filename": file_name(k), "filepath": "sub", "split": "test" if k != 1 else "restval", "imgid": k,
                "sentences": [{"raw": c, "tokens": c.split()} for c in caps]} for k, (_, caps, _) in enumerate(IMAGES)]
    entries.insert(2, {"filename": "x.jpg", "split": "test"})  # no sentences
    entries.insert(3, {"filename": "y.jpg", "split": "train", "sentences": []})  # filtered out by the split
    entries.append({"filename": "z.jpg", "split": "test", "sentences": [{"raw": " "}]})
    write_json(root / "dataset_flickr30k.json", {"images": entries, "dataset": "flickr30k"})
    return (SourceSpec("karpathy", root / "dataset_flickr30k.json", images=images, splits=("test", "restval")),
            Counter(bad_record=1, no_captions=1))


MAKERS = {"jsonl": make_jsonl, "seed_tsv": make_seed_tsv, "chinese_clip": make_chinese_clip, "coco": make_coco,
          "karpathy": make_karpathy}


# --------------------------------------------------------------------------------------------
# round trip: reader -> packer -> shards reader
# --------------------------------------------------------------------------------------------


def decodes(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
        return True
    except (OSError, ValueError):
        return False


def loadable(item: Item) -> bool:
    try:
        return decodes(item.load_image())
    except ImageLoadError:
        return False


def round_trip(spec: SourceSpec, out: Path, **options) -> tuple[list[Item], list[Item], list[Problem], dict]:
    """``(the reader's items, the packed shards' items, the reader's problems, the pack's skips)``."""
    records = list(open_source(spec).records)
    summary = pack(spec, out, PackOptions(progress=False, **options))
    packed = list(open_source(SourceSpec("shards", out)).records)
    assert all(isinstance(r, Item) for r in packed)
    return [r for r in records if isinstance(r, Item)], packed, [r for r in records if isinstance(r, Problem)], \
        summary.skipped


def assert_same_items(direct: list[Item], packed: list[Item]) -> None:
    """What the packer wrote is what the reader yields: keys, captions (each once), language,
    objects and counts, the raw id, the image (byte for byte when it was a JPEG)."""
    want = [item.deduplicated() for item in direct if loadable(item)]
    assert [p.key for p in packed] == [w.key for w in want]
    for got, item in zip(packed, want):
        assert got.captions == item.captions and got.captions == list(dict.fromkeys(got.captions)), item.where
        assert got.language == item.language
        assert got.objects == item.objects and got.object_counts == item.object_counts
        assert got.meta.get("image_id") == item.meta.get("image_id")
        assert got.meta.get("languages") == item.meta.get("languages")
        data = item.load_image()
        if data[:2] == b"\xff\xd8":
            assert got.load_image() == data
        else:
            assert got.load_image()[:2] == b"\xff\xd8" and decodes(got.load_image())


@pytest.mark.parametrize("fmt", sorted(MAKERS))
def test_every_format_round_trips_through_its_packer(fmt: str, tmp_path: Path):
    spec, problems = MAKERS[fmt](tmp_path)
    direct, packed, found, skipped = round_trip(spec, tmp_path / "out")
    assert Counter(p.reason for p in found) == problems
    assert {r: n for r, n in skipped.items() if r not in IMAGE_REASONS} == dict(problems)
    assert_same_items(direct, packed)
    # the one key rule of each format, and the captions of the shared little dataset (each once, stripped)
    stems = ["pic_0", "pic-1", "pic_2", "pic3"]  # "pic.0" -> "pic_0": sample-key form
    assert [p.key for p in packed] == (["id_0", "pic-1", "id_2", "pic3"] if fmt == "jsonl" else stems)
    assert [p.captions for p in packed] == [list(dict.fromkeys(c.strip() for c in caps)) for _, caps, _ in IMAGES]
    if fmt in ("jsonl", "coco"):
        assert [p.object_counts for p in packed] == [objs for _, _, objs in IMAGES]
    # the reader's problems name their place
    assert all(str(spec.input if fmt != "chinese_clip" else spec.input / "train_imgs.tsv") in p.where for p in found)


def test_repacking_shards_round_trips_with_tags(tmp_path: Path):
    spec, _ = make_jsonl(tmp_path)
    tags = write_lines(tmp_path / "tags.jsonl",
                       [json.dumps({"key": "pic-1", "objects": [{"name": "leash", "score": 0.8}]})])
    pack(spec, tmp_path / "first", PackOptions(progress=False, objects_file=tags))
    direct, packed, found, skipped = round_trip(SourceSpec("shards", tmp_path / "first"), tmp_path / "again",
                                                samples_per_shard=2)
    assert not found and not skipped
    assert_same_items(direct, packed)
    assert [p.objects for p in packed] == [["car", "road"], ["dog", "leash"], None, ["bird", "sky"]]
    assert packed[1].object_scores == {"leash": 0.8}
    assert len(list((tmp_path / "again").glob("*.tar"))) == 2


def test_shared_seed_sample_round_trips(seed_sample: Path, tmp_path: Path):
    path = seed_sample
    direct, packed, found, skipped = round_trip(SourceSpec("seed_tsv", path), tmp_path / "o")
    assert not found and not skipped and len(packed) == 40
    assert_same_items(direct, packed)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert sum(len(i.captions) for i in direct) == len(lines)


def test_shared_coco_mini_round_trips_as_jsonl_and_as_coco(coco_mini_dir: Path, tmp_path: Path):
    """COCO-mini packed from its jsonl, and from COCO files made of the same rows (boxes as
    instances): both round-trip, and the two readers agree on captions and object counts."""
    lines = (coco_mini_dir / "captions.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines[:12]]
    jsonl = write_lines(tmp_path / "c.jsonl", [json.dumps(r) for r in rows])
    as_jsonl = round_trip(SourceSpec("jsonl", jsonl, images=coco_mini_dir), tmp_path / "j")
    assert_same_items(as_jsonl[0], as_jsonl[1])
    names = sorted({b["category"] for r in rows for b in r["boxes"]})
    write_json(tmp_path / "captions.json", {
        "images": [{"id": r["image_id"], "file_name": Path(r["image"]).name} for r in rows],
        "annotations": [{"image_id": r["image_id"], "caption": c} for r in rows for c in r["captions_en"]]})
    write_json(tmp_path / "instances.json", {
        "categories": [{"id": i, "name": n} for i, n in enumerate(names)],
        "annotations": [{"id": j, "image_id": r["image_id"], "category_id": names.index(b["category"])}
                        for r in rows for j, b in enumerate(r["boxes"])]})
    as_coco = round_trip(SourceSpec("coco", tmp_path / "captions.json", images=coco_mini_dir / "images",
                                    instances=tmp_path / "instances.json"), tmp_path / "k")
    assert_same_items(as_coco[0], as_coco[1])
    jsonl_items, coco_items = as_jsonl[1], as_coco[1]
    assert len(jsonl_items) == len(coco_items) == 12
    for row, j, c in zip(rows, jsonl_items, coco_items):
        assert (j.key, c.key) == (str(row["image_id"]), Path(row["image"]).stem)  # jsonl: image_id; coco: stem
        assert j.captions == c.captions and j.object_counts == c.object_counts
        assert j.load_image() == c.load_image()


# --------------------------------------------------------------------------------------------
# one name per format
# --------------------------------------------------------------------------------------------


def load_cli():
    from ernievil2.data.packers import cli

    return cli


def test_one_spelling_per_format_name():
    assert tuple(formats.READERS) == FORMATS
    assert all(name.isidentifier() and name.islower() for name in FORMATS)  # underscores, never hyphens
    parser = load_cli().build_parser()
    (fmt_action,) = [a for a in parser._actions if a.dest == "format"]
    assert tuple(fmt_action.choices) == FORMATS
    assert evaluation.FORMATS == FORMATS
    # the shipped evaluation configs and every documented --format use these names
    for path in sorted((REPO / "conf" / "eval").glob("*.yaml")):
        for entry in (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("datasets") or []:
            assert entry["format"] in evaluation.FORMATS, path
    documented = [REPO / "README.md", REPO / "launch" / "pack.py", *sorted((REPO / "docs").glob("*.md"))]
    used = {m for p in documented for m in re.findall(r"--format[ =]([a-z][\w-]*)", p.read_text(encoding="utf-8"))}
    used -= {"paddle", "onnx"}  # launch/export.py --format: what the towers are exported as, not a data format
    assert used and used <= set(FORMATS), used - set(FORMATS)


@pytest.mark.parametrize("old,new", [("seed-tsv", "seed_tsv"), ("chinese-clip", "chinese_clip")])
def test_hyphen_spellings_are_refused_with_the_choices(old: str, new: str, tmp_path: Path, capsys):
    cli = load_cli()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--format", old, "--input", str(tmp_path / "x"), "--output", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"invalid choice: '{old}'" in err and all(f"'{name}'" in err for name in FORMATS)
    choices = ", ".join(FORMATS)
    with pytest.raises(FormatError, match=f"unknown format '{old}' \\(format names use underscores: '{new}'\\); "
                                          f"choose one of: {choices}"):
        open_source(SourceSpec(old, tmp_path / "x"))
    with pytest.raises(PackError, match=f"unknown format '{old}'"):
        pack(SourceSpec(old, tmp_path / "x"), tmp_path / "o", PackOptions(progress=False))
    assert not (tmp_path / "o").exists()
    with pytest.raises(ValueError,
                       match=f"evaluation set 'e': unknown format '{old}' .*choose one of: {choices}"):
        eval_set_spec(EvalSetSchema(name="e", format=old, path="x"))
    with pytest.raises(ValueError, match=f"unknown format '{old}'"):
        read_items(EvalSetSpec("e", old, "x"))


# --------------------------------------------------------------------------------------------
# the rules callers share
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", sorted(MAKERS))
def test_evaluation_reads_the_keys_and_captions_the_packer_writes(fmt: str, tmp_path: Path):
    """An evaluation set in any format names its images by the packer's keys and keeps every caption
    (repeats too); the first record its reader rejects stops it, naming the file."""
    spec, _ = MAKERS[fmt](tmp_path)
    good = [r for r in open_source(spec).records if isinstance(r, Item)]
    pack(spec, tmp_path / "o", PackOptions(progress=False))
    packed = list(open_source(SourceSpec("shards", tmp_path / "o")).records)
    assert [i.key for i in read_items(EvalSetSpec("s", "shards", str(tmp_path / "o")))] == [p.key for p in packed]
    eval_spec = EvalSetSpec("e", fmt, str(spec.input), image_root=str(spec.images) if spec.images else None,
                            split="test" if fmt == "karpathy" else "train", caption_key="captions_en", max_images=1)
    (first,) = read_items(eval_spec)  # stops after one image, before the first rejected record
    assert first.key == packed[0].key == good[0].key
    assert first.captions == good[0].captions == [c.strip() for c in IMAGES[0][1]]  # the repeat kept
    assert first.load_image() == packed[0].load_image() == jpeg(0)
    with pytest.raises(EvalDataError) as info:
        read_items(dataclasses.replace(eval_spec, max_images=None))  # every made-up input holds a bad record
    assert str(spec.input if fmt != "chinese_clip" else spec.input / "train_imgs.tsv") in str(info.value)


def test_evaluation_keeps_repeated_captions_the_packer_drops(tmp_path: Path):
    images = write_files(tmp_path)
    row = {"image": f"sub/{file_name(0)}", "captions_en": IMAGES[0][1]}
    path = write_lines(tmp_path / "c.jsonl", [json.dumps(row)])
    (item,) = read_items(EvalSetSpec("e", "jsonl", str(path), image_root=str(images), caption_key="captions_en"))
    assert item.key == "pic_0" and item.captions == ["a red car", "a red car", "a car on a road"]
    assert item.deduplicated().captions == ["a red car", "a car on a road"]


def test_mixed_language_captions_keep_their_languages_when_deduplicated():
    item = Item("k", ["a", "b", "a", "甲", "b"], ImageSource(data=b""), "here", "mul",
                meta={"languages": ["en", "en", "en", "zh", "de"]})
    once = item.deduplicated()
    assert once.captions == ["a", "b", "甲"] and once.meta["languages"] == ["en", "en", "zh"]
    assert item.captions == ["a", "b", "a", "甲", "b"]  # the original is left alone
    assert once.deduplicated() is once


def test_seed_line_checks_are_shared_with_inference():
    good = f" a caption \t id1 \t{b64(jpeg(1))}\n"
    assert formats.parse_seed_line(good.encode(), 3) == SeedLine(3, "a caption", "id1", b64(jpeg(1)))
    cases = {"encoding": b"\xff\tx\ty\n", "columns": "only\ttwo\n", "text": "  \tid\tAAAA\r\n"}
    for check, raw in cases.items():
        problem = formats.parse_seed_line(raw, 7)
        assert isinstance(problem, LineProblem) and problem.check == check and problem.lineno == 7
        with pytest.raises(inference.BadLineError) as info:
            inference.parse_seed_line(raw, 7)
        assert info.value.reason == check and str(info.value).startswith("line 7")
    assert formats.parse_seed_line("only\ttwo", 1).image_id == "two"
    bad = formats.check_seed_image(SeedLine(9, "t", "i", "@@@"))
    assert bad is not None and bad.check == "base64" and "(image id 'i')" in bad.message
    assert formats.check_seed_image(SeedLine(9, "t", "i", b64(jpeg(1)))) is None
    assert list(inference.REASONS) == [*formats.SEED_LINE_CHECKS, "image"]
    assert set(formats.SEED_LINE_REASONS) == set(formats.SEED_LINE_CHECKS)


def test_seed_image_comes_from_the_first_good_line(tmp_path: Path):
    lines = ["first\tA\t@@bad@@", f"second\tA\t{b64(jpeg(50))}", f"third\tA\t{b64(jpeg(90))}", "",
             f"x\tB\t{b64(jpeg(7))}"]
    source = open_source(SourceSpec("seed_tsv", write_lines(tmp_path / "s.tsv", lines)))
    assert source.total == 2
    records = list(source.records)
    assert [type(r).__name__ for r in records] == ["Problem", "Item", "Item"]
    assert records[0].reason == "bad_base64" and records[0].where == f"{tmp_path / 's.tsv'}:1"
    a, b = records[1], records[2]
    assert (a.key, a.captions, a.where, a.language) == ("A", ["second", "third"], f"{tmp_path / 's.tsv'}:2", "zh")
    assert a.load_image() == jpeg(50) and b.where.endswith(":5") and b.meta == {"image_id": "B"}


def test_image_sources_and_their_failures(tmp_path: Path):
    (tmp_path / "a.jpg").write_bytes(jpeg(3))
    assert ImageSource(path=str(tmp_path / "a.jpg")).load() == jpeg(3)
    assert ImageSource(b64=b64(jpeg(3), urlsafe=True)).load() == jpeg(3)
    assert ImageSource(data=b"raw").load() == b"raw"
    for source, reason in [(ImageSource(path=str(tmp_path / "no.jpg")), "missing_image"),
                           (ImageSource(path=str(tmp_path)), "unreadable_image"),
                           (ImageSource(b64="@@"), "bad_base64"), (ImageSource(), "missing_image")]:
        with pytest.raises(ImageLoadError) as info:
            source.load()
        assert info.value.reason == reason


def test_structural_errors_name_the_file(tmp_path: Path):
    with pytest.raises(FormatError, match="does not exist"):
        open_source(SourceSpec("jsonl", tmp_path / "none.jsonl"))
    write_json(tmp_path / "k.json", {"dataset": "x"})
    with pytest.raises(FormatError, match=r"k\.json: missing list field\(s\) \['images'\] \(Karpathy split layout\)"):
        open_source(SourceSpec("karpathy", tmp_path / "k.json"))
    (tmp_path / "broken.json").write_text('{"images": [\n')
    with pytest.raises(FormatError, match=r"broken\.json:2: not valid JSON"):
        open_source(SourceSpec("coco", tmp_path / "broken.json"))
    with pytest.raises(FormatError, match="no shards found"):
        open_source(SourceSpec("shards", str(tmp_path / "*.tar")))
    with pytest.raises(EvalDataError, match=r"evaluation set 'e': .*k\.json: missing list field"):
        read_items(EvalSetSpec("e", "karpathy", str(tmp_path / "k.json")))


def test_jsonl_caption_selection(tmp_path: Path):
    images = write_files(tmp_path)
    row = {"image": f"sub/{file_name(0)}", "captions_en": ["en one", "en two"], "captions_zh": ["中文"],
           "language": "de"}
    path = write_lines(tmp_path / "c.jsonl", [json.dumps(row), json.dumps({**row, "captions": "generic"})])

    def first(**kw) -> list:
        records = open_source(SourceSpec("jsonl", path, images=images, **kw)).records
        return [(r.captions, r.language, r.meta.get("languages")) if isinstance(r, Item) else r.reason for r in records]

    assert first() == [(["en one", "en two", "中文"], "mul", ["en", "en", "zh"]), (["generic"], "de", None)]
    assert first(language="zh") == [(["中文"], "zh", None), (["中文"], "zh", None)]
    assert first(language="fr") == ["no_captions", (["generic"], "fr", None)]
    assert first(caption_key="captions_en")[0] == (["en one", "en two"], "en", None)
    assert first(caption_key="captions") == ["no_captions", (["generic"], "de", None)]
    (bad,) = [r for r in open_source(SourceSpec("jsonl", path, images=images, caption_key="captions")).records
              if isinstance(r, Problem)]
    assert bad.reason == "no_captions" and str(bad) == f"{path}:1: no caption in 'captions' (key pic_0)"
