"""Object tags from detector output in the COCO results format (``launch/pack.py --detections``).

COCO-mini (../shared/data/coco-mini-train) is rebuilt as a COCO captions json + instances json; each
instance box becomes one detection with a seeded random score, so the tags every packed image must
carry can be computed here independently: the categories with a detection scoring at least the
threshold, best score first, capped. Skipped without ../shared.
"""
from __future__ import annotations

import json
import random
import re
import shlex
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from ernievil2.data.formats import SourceSpec
from ernievil2.data.packers.detections import (
    DetectionOptions,
    detection_key,
    load_categories,
    load_detections,
    load_translation,
)
from ernievil2.data.packers.errors import PackError
from ernievil2.data.packers.pipeline import SUMMARY_FILE, PackOptions, combine_tags, pack
from ernievil2.data.sample import RawSample
from ernievil2.data.shard_reader import iter_samples

REPO = Path(__file__).resolve().parents[1]
SEED = 2024
THRESHOLD = 0.5


def read_back(out: Path) -> dict[str, RawSample]:
    return {s.key: s for s in iter_samples(out)}


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


def load_cli():
    from ernievil2.data.packers import cli

    return cli


def expected_tags(dets: list[dict], names: dict[int, str], threshold: float, cap: int | None,
                  translate: dict[str, str] | None = None) -> list[tuple[str, float]]:
    """What the packer must write for one image, computed from its detections directly."""
    best: dict[str, float] = {}
    for d in dets:
        name = names[d["category_id"]]
        name = translate.get(name, name) if translate else name
        if d["score"] >= threshold:
            best[name] = max(best.get(name, float("-inf")), d["score"])
    assert len(set(best.values())) == len(best)  # random scores: no ties to order
    ranked = sorted(best.items(), key=lambda kv: kv[1], reverse=True)
    return ranked if cap is None else ranked[:cap]


# --------------------------------------------------------------------------------------------
# COCO-mini as COCO files, with detections made from its boxes
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def coco_mini(coco_mini_dir: Path, tmp_path_factory) -> dict:
    """captions.json, instances.json (COCO-like, non-contiguous category ids), detections.json
    (one per box, score ~ U[0, 1) from random.Random(SEED)) and the source rows."""
    root = tmp_path_factory.mktemp("coco_mini_coco")
    rows = [json.loads(line) for line in (coco_mini_dir / "captions.jsonl").read_text(encoding="utf-8").splitlines()]
    all_names = sorted({b["category"] for r in rows for b in r["boxes"]})
    ids = {name: 1 + i + 2 * (i // 10) for i, name in enumerate(all_names)}  # gaps, as in COCO's 1..90
    captions = {"images": [{"id": r["image_id"], "file_name": Path(r["image"]).name} for r in rows],
                "annotations": [{"id": 10 * r["image_id"] + j, "image_id": r["image_id"], "caption": c}
                                for r in rows for j, c in enumerate(r["captions_en"])]}
    instances = {"images": captions["images"], "categories": [{"id": i, "name": n} for n, i in ids.items()],
                 "annotations": [{"id": 100 * r["image_id"] + j, "image_id": r["image_id"],
                                  "category_id": ids[b["category"]], "bbox": b["bbox"]}
                                 for r in rows for j, b in enumerate(r["boxes"])]}
    rng = random.Random(SEED)
    detections = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
                   "score": rng.random()} for a in instances["annotations"]]
    return {"root": root, "rows": rows, "images": coco_mini_dir / "images", "names": {i: n for n, i in ids.items()},
            "captions": write_json(root / "captions.json", captions),
            "instances": write_json(root / "instances.json", instances),
            "categories": write_json(root / "categories.json", instances["categories"]),
            "detections": write_json(root / "detections.json", detections), "dets": detections}


def by_image(dets: list[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for d in dets:
        out.setdefault(d["image_id"], []).append(d)
    return out


def test_coco_mini_detections_give_exactly_the_expected_tags(coco_mini: dict, tmp_path: Path):
    out = tmp_path / "o"
    cli = load_cli()
    assert cli.main(["--format", "coco", "--input", str(coco_mini["captions"]), "--images", str(coco_mini["images"]),
                     "--detections", str(coco_mini["detections"]), "--det-categories", str(coco_mini["instances"]),
                     "--det-min-score", str(THRESHOLD), "--det-max", "4", "--limit", "20", "--output", str(out),
                     "--no-progress"]) == 0
    got = read_back(out)
    rows, dets = coco_mini["rows"][:20], by_image(coco_mini["dets"])
    assert len(coco_mini["dets"]) == 739 and len(dets) == 80
    # COCO keys are the file stems; the detections name images by COCO id
    assert list(got) == [Path(r["image"]).stem for r in rows]
    tagged = 0
    for row in rows:
        sample = got[Path(row["image"]).stem]
        want = expected_tags(dets[row["image_id"]], coco_mini["names"], THRESHOLD, 4)
        if want:
            tagged += 1
            assert sample.objects == [n for n, _ in want]
            assert sample.meta["object_scores"] == dict(want)
        else:
            assert sample.objects is None and "object_scores" not in sample.meta
        assert "object_counts" not in sample.meta  # no --instances: no annotation tags
    assert tagged == 17

    below = sum(d["score"] < THRESHOLD for d in coco_mini["dets"])
    with_tags = sum(bool(expected_tags(v, coco_mini["names"], THRESHOLD, 4)) for v in dets.values())
    summary = json.loads((out / SUMMARY_FILE).read_text(encoding="utf-8"))
    assert summary["with_objects"] == tagged
    assert summary["detections"] == {
        "file": str(coco_mini["detections"]), "categories": str(coco_mini["instances"]), "translate": None,
        "min_score": THRESHOLD, "max_count": 4, "entries": 739, "valid": 739, "below_min_score": below,
        "malformed_total": 0, "malformed": {}, "malformed_examples": {}, "images": 80,
        "images_with_tags": with_tags, "untranslated_total": 0, "untranslated": {},
        "samples_tagged": 17, "images_without_sample": 60}  # 60: the images past --limit 20
    assert (below, with_tags) == (370, 70)


def test_instances_tags_come_first_and_lend_their_categories(coco_mini: dict, tmp_path: Path):
    """With --instances, the annotation tags stay first (by count) and the detector's new names
    follow; without --det-categories the instances json names the categories."""
    dets = [dict(d) for d in coco_mini["dets"]]
    first = coco_mini["rows"][0]
    names = coco_mini["names"]
    own = {b["category"] for b in first["boxes"]}
    extra_id = next(i for i, n in sorted(names.items()) if n not in own)
    dets.append({"image_id": first["image_id"], "category_id": extra_id, "bbox": [0, 0, 1, 1], "score": 0.999})
    det_file = write_json(tmp_path / "dets.json", dets)
    spec = SourceSpec("coco", coco_mini["captions"], images=coco_mini["images"], instances=coco_mini["instances"])
    summary = pack(spec, tmp_path / "o", PackOptions(progress=False, limit=3,
                                                     detections=DetectionOptions(det_file, min_score=THRESHOLD)))
    got = read_back(tmp_path / "o")
    for row in coco_mini["rows"][:3]:
        sample = got[Path(row["image"]).stem]
        counts = Counter(b["category"] for b in row["boxes"])
        annotated = [n for n, _ in counts.most_common()]
        want = expected_tags(by_image(dets)[row["image_id"]], names, THRESHOLD, None)
        assert sample.objects == annotated + [n for n, _ in want if n not in annotated]
        assert sample.meta["object_counts"] == dict(counts)
        assert sample.meta["object_scores"] == dict(want)
    assert got[Path(first["image"]).stem].objects[-1] == names[extra_id]
    assert summary.detections["categories"] == f"--instances {coco_mini['instances']}"
    assert summary.detections["entries"] == 740 and summary.detections["samples_tagged"] == 3


# --------------------------------------------------------------------------------------------
# malformed entries, keys, errors
# --------------------------------------------------------------------------------------------


def test_malformed_entries_are_counted_not_fatal(coco_mini: dict, tmp_path: Path):
    first, second = coco_mini["rows"][0], coco_mini["rows"][1]
    cat = next(iter(coco_mini["names"]))
    good = {"image_id": first["image_id"], "category_id": cat, "bbox": [1, 2, 3, 4], "score": 0.9}
    entries = [
        good,
        [1, 2, 3],                                                           # not_an_object
        {"image_id": first["image_id"], "bbox": [0, 0, 1, 1], "score": 0.9},  # missing_field
        {"category_id": cat, "score": 0.9},                                   # missing_field
        {"image_id": None, "category_id": cat, "score": 0.9},                 # bad_image_id
        {"image_id": 1.5, "category_id": cat, "score": 0.9},                  # bad_image_id
        {"image_id": first["image_id"], "category_id": 9999, "score": 0.9},   # unknown_category
        {"image_id": first["image_id"], "category_id": True, "score": 0.9},   # unknown_category
        {"image_id": first["image_id"], "category_id": cat, "score": "0.9"},  # bad_score
        {"image_id": first["image_id"], "category_id": cat, "score": None},   # bad_score
        {"image_id": 123456789, "category_id": cat, "score": 0.95},          # an image not in the input
        {"image_id": Path(second["image"]).name, "category_id": cat, "score": 0.8},  # a file name: its stem
        {"image_id": str(second["image_id"]), "category_id": cat, "score": 0.1},     # the id as a string
    ]
    det_file = write_json(tmp_path / "dets.json", entries)
    spec = SourceSpec("coco", coco_mini["captions"], images=coco_mini["images"])
    summary = pack(spec, tmp_path / "o", PackOptions(progress=False, limit=4, detections=DetectionOptions(
        det_file, categories_file=coco_mini["categories"], min_score=0.5)))
    got = read_back(tmp_path / "o")
    name = coco_mini["names"][cat]
    assert got[Path(first["image"]).stem].objects == [name]
    assert got[Path(second["image"]).stem].objects == [name]
    assert got[Path(second["image"]).stem].meta["object_scores"] == {name: 0.8}
    d = summary.detections
    assert (d["entries"], d["valid"], d["malformed_total"], d["below_min_score"]) == (13, 4, 9, 1)
    assert d["malformed"] == {"bad_image_id": 2, "bad_score": 2, "missing_field": 2, "not_an_object": 1,
                              "unknown_category": 2}
    assert d["malformed_examples"]["missing_field"] == [f"{det_file}[2]: no category_id", f"{det_file}[3]: no image_id"]
    assert d["malformed_examples"]["unknown_category"][0] == f"{det_file}[6]: category_id 9999 is not in the categories"
    assert d["malformed_examples"]["bad_score"][0] == f"{det_file}[8]: score '0.9' is not a finite number"
    assert (d["images"], d["images_with_tags"], d["samples_tagged"], d["images_without_sample"]) == (3, 3, 2, 1)
    assert summary.written == 4 and summary.with_objects == 2
    assert "malformed bad_score: 2" in summary.report()


def test_unusable_files_are_fatal_and_named(coco_mini: dict, tmp_path: Path, capsys):
    cats = coco_mini["categories"]
    write_json(tmp_path / "dict.json", {"annotations": []})
    with pytest.raises(PackError, match=rf"--detections {re.escape(str(tmp_path / 'dict.json'))}: top level is a dict"):
        load_detections(tmp_path / "dict.json", {1: "cat"})
    (tmp_path / "broken.json").write_text("[{", encoding="utf-8")
    with pytest.raises(PackError, match=r"broken\.json: cannot read JSON"):
        load_detections(tmp_path / "broken.json", {1: "cat"})
    write_json(tmp_path / "cats.json", {"images": []})
    with pytest.raises(PackError, match=r"cats\.json: a JSON object without a 'categories' list"):
        load_categories(tmp_path / "cats.json")
    write_json(tmp_path / "twice.json", [{"id": 1, "name": "cat"}, {"id": 1, "name": "dog"}])
    with pytest.raises(PackError, match=r"twice\.json: category id 1 is named both 'cat' and 'dog'"):
        load_categories(tmp_path / "twice.json")
    cli = load_cli()
    base = ["--format", "coco", "--input", str(coco_mini["captions"]), "--images", str(coco_mini["images"]),
            "--no-progress", "--limit", "2"]
    # a bad file stops the pack before the output folder is made
    assert cli.main(base + ["--output", str(tmp_path / "o1"), "--detections", str(tmp_path / "dict.json"),
                            "--det-categories", str(cats)]) == 2
    assert "dict.json: top level is a dict, expected a list" in capsys.readouterr().err
    assert not (tmp_path / "o1").exists()
    # categories must come from somewhere
    assert cli.main(base + ["--output", str(tmp_path / "o2"), "--detections", str(coco_mini["detections"])]) == 2
    assert "--detections needs --det-categories" in capsys.readouterr().err
    assert cli.main(base + ["--output", str(tmp_path / "o3"), "--det-max", "3"]) == 2
    assert "--det-max only apply with --detections" in capsys.readouterr().err
    assert cli.main(base + ["--output", str(tmp_path / "o4"), "--detections", str(coco_mini["detections"]),
                            "--det-categories", str(cats), "--det-max", "0"]) == 2
    assert "--det-max must be >= 1, got 0" in capsys.readouterr().err


def test_detection_keys():
    coco = {"42": "000000000042"}
    assert detection_key(42, coco) == "000000000042" and detection_key("42", coco) == "000000000042"
    assert detection_key(7, coco) == "7"
    assert detection_key("train2017/000000000009.JPG", {}) == "000000000009"
    assert detection_key("1000268201_693b08cb0e.jpg", {}) == "1000268201_693b08cb0e"
    assert detection_key("a.0", {}) == "a_0"  # not an image file: the id in sample-key form
    assert detection_key(" x/y ", {}) == "x_y"


def test_objects_and_detections_combine_by_score():
    tagger = {"a": [("dog", 0.7), ("grass", 0.6)], "b": [("sky", 0.9)]}
    detector = {"a": [("dog", 0.95), ("ball", 0.65)], "c": [("car", 0.5)]}
    assert combine_tags(tagger, detector) == {"a": [("dog", 0.95), ("ball", 0.65), ("grass", 0.6)],
                                              "b": [("sky", 0.9)], "c": [("car", 0.5)]}
    assert combine_tags(tagger) is tagger


# --------------------------------------------------------------------------------------------
# translation
# --------------------------------------------------------------------------------------------


def test_translation_tables(tmp_path: Path):
    (tmp_path / "t.tsv").write_text("# COCO -> zh\ndog\t狗\n\ncat\t 猫 \n", encoding="utf-8")
    assert load_translation(tmp_path / "t.tsv") == {"dog": "狗", "cat": "猫"}
    write_json(tmp_path / "t.json", {"dog": "狗", "couch": "沙发"})
    assert load_translation(tmp_path / "t.json") == {"dog": "狗", "couch": "沙发"}
    (tmp_path / "bad.tsv").write_text("dog\t狗\ncat 猫\n", encoding="utf-8")
    with pytest.raises(PackError, match=r"bad\.tsv:2: 1 tab-separated field\(s\), expected 2"):
        load_translation(tmp_path / "bad.tsv")
    (tmp_path / "twice.tsv").write_text("dog\t狗\ndog\t犬\n", encoding="utf-8")
    with pytest.raises(PackError, match=r"twice\.tsv:2: 'dog' is translated twice"):
        load_translation(tmp_path / "twice.tsv")
    write_json(tmp_path / "empty.json", {"dog": ""})
    with pytest.raises(PackError, match="needs a non-empty name and translation"):
        load_translation(tmp_path / "empty.json")


def test_translation_applied_and_missing_names_counted(tmp_path: Path):
    cats = {1: "dog", 2: "couch", 3: "sofa", 4: "zebra"}
    table = {"dog": "狗", "couch": "沙发", "sofa": "沙发"}
    entries = [{"image_id": "p", "category_id": 1, "score": 0.6}, {"image_id": "p", "category_id": 2, "score": 0.7},
               {"image_id": "p", "category_id": 3, "score": 0.9}, {"image_id": "p", "category_id": 4, "score": 0.8},
               {"image_id": "q", "category_id": 4, "score": 0.2}, {"image_id": "q", "category_id": 4, "score": 0.3}]
    got = load_detections(write_json(tmp_path / "d.json", entries), cats, min_score=0.25, translation=table)
    # couch and sofa both become 沙发: one tag, its best score
    assert got.tags == {"p": [("沙发", 0.9), ("zebra", 0.8), ("狗", 0.6)], "q": [("zebra", 0.3)]}
    assert got.untranslated == {"zebra": 3} and got.report()["untranslated_total"] == 3
    assert got.below_min_score == 1


def test_translation_in_a_pack(coco_mini: dict, tmp_path: Path):
    names = sorted(set(coco_mini["names"].values()))
    table = {n: f"zh-{n}" for n in names[::2]}  # every other category translated
    tsv = tmp_path / "zh.tsv"
    tsv.write_text("".join(f"{en}\t{zh}\n" for en, zh in table.items()), encoding="utf-8")
    summary = pack(SourceSpec("coco", coco_mini["captions"], images=coco_mini["images"]), tmp_path / "o",
                   PackOptions(progress=False, limit=10, detections=DetectionOptions(
                       coco_mini["detections"], categories_file=coco_mini["categories"], min_score=0.3,
                       translate_file=tsv)))
    got = read_back(tmp_path / "o")
    dets = by_image(coco_mini["dets"])
    for row in coco_mini["rows"][:10]:
        want = expected_tags(dets[row["image_id"]], coco_mini["names"], 0.3, None, table)
        assert got[Path(row["image"]).stem].objects == ([n for n, _ in want] or None)
    assert sum(s.objects is None for s in got.values()) == 1
    missing = Counter(coco_mini["names"][d["category_id"]] for d in coco_mini["dets"]
                      if coco_mini["names"][d["category_id"]] not in table)
    assert summary.detections["untranslated"] == dict(sorted(missing.items()))
    assert summary.detections["untranslated_total"] == sum(missing.values()) == 382
    assert summary.detections["translate"] == str(tsv)


# --------------------------------------------------------------------------------------------
# the pack.py command lines shown in the docs
# --------------------------------------------------------------------------------------------


def documented_pack_commands() -> list[tuple[str, list[str]]]:
    """``(where, argv)`` of every ``python launch/pack.py ...`` line in README.md, docs/*.md, the
    headers of conf/experiment/*.yaml and launch/pack.py's docstring (continuations joined)."""
    found = []
    files = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")),
             *sorted((REPO / "conf" / "experiment").glob("*.yaml")), REPO / "launch" / "pack.py"]
    for path in files:
        lines = path.read_text(encoding="utf-8").splitlines()
        if path.suffix == ".yaml":
            lines = [ln.lstrip("#") for ln in lines if ln.startswith("#")]
        text = "\n".join(lines).replace("\\\\\n", " ").replace("\\\n", " ")
        for line in re.findall(r"python launch/pack\.py[^\n`]*", text):
            found.append((path.name, shlex.split(line, comments=True)[2:]))
    return found


def test_every_documented_pack_command_parses():
    commands = documented_pack_commands()
    assert {"README.md", "DATA.md", "pack.py", "real_mix.yaml"} <= {w for w, _ in commands}
    assert sum("--detections" in argv for _, argv in commands) >= 3
    parser = load_cli().build_parser()
    for _, argv in commands:
        parser.parse_args(argv)  # SystemExit on an unknown flag or a missing required one


def _localised(argv: list[str], coco_mini: dict, shared_dir: Path, out: Path, det_files: dict) -> list[str]:
    """A documented command with its paths replaced by local files of the same kind: ``../shared``
    paths by the shared folder's, COCO files by COCO-mini's, any other jsonl by Flickr8k-CN's, the
    detector's files by ``det_files`` (an instances json for ``--det-categories`` when the command
    names one, else the plain category list)."""
    fmt = argv[argv.index("--format") + 1]
    local = {"--input": coco_mini["captions"], "--images": coco_mini["images"], "--instances": coco_mini["instances"]} \
        if fmt == "coco" else {"--input": shared_dir / "data" / "flickr8k-cn-train" / "captions.jsonl"}
    local.update({"--output": out, **det_files})
    args = list(argv)
    for i, flag in enumerate(args[:-1]):
        value = args[i + 1]
        if value.startswith("../shared/"):
            args[i + 1] = str(shared_dir / value[len("../shared/"):])
        elif flag == "--det-categories":
            args[i + 1] = str(coco_mini["instances"] if "instances" in value else coco_mini["categories"])
        elif flag in local:
            args[i + 1] = str(local[flag])
    return args


def test_documented_detection_commands_run(coco_mini: dict, shared_dir: Path, tmp_path: Path):
    """Each documented --detections command, with local files in place of its paths: COCO-mini's
    detections, and for the Flickr8k-CN (jsonl) one detections naming images by file name."""
    flickr_jsonl = shared_dir / "data" / "flickr8k-cn-train" / "captions.jsonl"
    flickr = [json.loads(line) for line in flickr_jsonl.read_text(encoding="utf-8").splitlines()[:8]]
    rng = random.Random(SEED)
    cat_ids = sorted(coco_mini["names"])
    flickr_dets = [{"image_id": Path(r["image"]).name, "category_id": rng.choice(cat_ids), "bbox": [0, 0, 9, 9],
                    "score": rng.random()} for r in flickr for _ in range(6)]
    zh = tmp_path / "zh.tsv"
    zh.write_text("".join(f"{n}\t中文{n}\n" for n in coco_mini["names"].values()), encoding="utf-8")
    commands = [(w, a) for w, a in documented_pack_commands() if "--detections" in a]
    cli = load_cli()
    for n, (where, argv) in enumerate(commands):
        fmt = argv[argv.index("--format") + 1]
        dets = coco_mini["detections"] if fmt == "coco" else write_json(tmp_path / f"flickr{n}.json", flickr_dets)
        out = tmp_path / f"out{n}"
        args = _localised(argv, coco_mini, shared_dir, out, {"--detections": dets, "--det-translate": zh})
        assert cli.main(args + ["--limit", "8", "--no-progress", "--workers", "1"]) == 0, (where, argv)
        summary = json.loads((out / SUMMARY_FILE).read_text(encoding="utf-8"))
        assert summary["written"] == 8 and summary["detections"]["malformed_total"] == 0, (where, argv)
        assert summary["detections"]["samples_tagged"] == summary["with_objects"] > 0, (where, argv)
        if "--det-translate" in argv:
            assert all(t.startswith("中文") for s in read_back(out).values() for t in s.objects or [])


# --------------------------------------------------------------------------------------------
# training on detector-tagged shards
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_tiny_run_on_detection_shards_uses_the_objects_term(coco_mini: dict, tmp_path: Path):
    """COCO-mini packed without annotation tags: the detector's tags alone feed the objects term."""
    shards = tmp_path / "shards"
    summary = pack(SourceSpec("coco", coco_mini["captions"], images=coco_mini["images"]), shards,
                   PackOptions(progress=False, limit=16, samples_per_shard=8, detections=DetectionOptions(
                       coco_mini["detections"], categories_file=coco_mini["categories"], min_score=0.3)))
    assert summary.written == 16 and summary.with_objects == 15  # one image has no detection >= 0.3
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "launch/train.py", "data=shards", f"data.train_shards={shards}", "data.batch_size=8",
         "data.num_workers=0", "data.shuffle_buffer=16", "trainer.max_steps=4", "trainer.device=cpu",
         "trainer.save_checkpoint=false", "logger.log_every=2", "eval=none", "loss.aux_fraction=1.0",
         "model.text_max_length=24", f"hydra.run.dir={run}"],
        cwd=REPO, capture_output=True, text=True, timeout=540, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["step"] for r in log] == [2, 4]
    # each 2-step window is one epoch of the 16 samples (2 batches of 8); the objects term runs on
    # every row (aux_fraction 1) and counts exactly the 15 samples with detector tags
    assert [(r["epoch"], r["objects_frac"]) for r in log] == [(0, 15 / 16), (1, 15 / 16)]
    assert all(r["image_objects"] > 0 for r in log)
