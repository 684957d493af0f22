"""The shipped evaluation-set configs (conf/eval/) and the readers on the real data beside the repo."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from ernievil2.evaluators.retrieval import EvalSetSpec, eval_set_spec, read_items
from ernievil2.train.config import register_schemas, validate

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

register_schemas()


def _eval_specs(*overrides: str) -> list[EvalSetSpec]:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = validate(compose(config_name="config", overrides=list(overrides)))
    return [eval_set_spec(entry) for entry in cfg.eval.datasets]


def test_every_eval_config_composes_and_validates(monkeypatch):
    for var in ("FLICKR30K_JSON", "FLICKR30K_IMAGES", "COCO_CN_TSV"):
        monkeypatch.delenv(var, raising=False)
    names = sorted(p.stem for p in CONF_DIR.joinpath("eval").glob("*.yaml"))
    assert {"demo", "none", "flickr30k", "coco_cn", "flickr8k_cn"} <= set(names)
    for name in names:
        _eval_specs(f"eval={name}")
    (flickr,) = _eval_specs("eval=flickr30k")
    assert (flickr.format, flickr.split, flickr.path, flickr.image_root) == ("karpathy", "test", None, None)
    with pytest.raises(ValueError, match="'flickr30k' \\(format karpathy\\): 'path' is not set"):
        read_items(flickr)
    (coco,) = _eval_specs("eval=coco_cn")
    assert (coco.format, coco.path) == ("seed_tsv", None)


def test_eval_config_paths_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FLICKR30K_JSON", str(tmp_path / "dataset_flickr30k.json"))
    monkeypatch.setenv("FLICKR30K_IMAGES", str(tmp_path / "images"))
    monkeypatch.setenv("COCO_CN_TSV", str(tmp_path / "coco.tsv"))
    (flickr,) = _eval_specs("eval=flickr30k")
    assert (flickr.path, flickr.image_root) == (str(tmp_path / "dataset_flickr30k.json"), str(tmp_path / "images"))
    (coco,) = _eval_specs("eval=coco_cn", "eval.datasets.0.max_images=10")
    assert (coco.path, coco.max_images) == (str(tmp_path / "coco.tsv"), 10)
    # and on the command line
    (flickr,) = _eval_specs("eval=flickr30k", "eval.datasets.0.path=/x.json", "eval.datasets.0.split=val")
    assert (flickr.path, flickr.split) == ("/x.json", "val")


def test_protocol_of_the_shipped_sets():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        protocols = {name: compose(config_name="config", overrides=[f"eval={name}"]).eval.datasets[0].protocol
                     for name in ("demo", "flickr30k", "coco_cn", "flickr8k_cn")}
    assert protocols == {"demo": "multi", "flickr30k": "multi", "coco_cn": "both", "flickr8k_cn": "both"}


def test_flickr8k_cn_config_reads_the_shared_jsonl(flickr8k_dir, monkeypatch):
    monkeypatch.setenv("ERNIEVIL2_SHARED", str(flickr8k_dir.parents[1]))
    (spec,) = _eval_specs("eval=flickr8k_cn")
    items = read_items(spec)
    first = json.loads((flickr8k_dir / "captions.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert len(items) == spec.max_images == 200
    assert items[0].key == first["image_id"] and items[0].captions == first["captions_zh"]
    assert all(len(item.captions) == 5 for item in items)
    assert items[0].load_image() == (flickr8k_dir / first["image"]).read_bytes()


def test_coco_mini_jsonl_with_english_captions(coco_mini_dir):
    items = read_items(EvalSetSpec("coco_mini", "jsonl", str(coco_mini_dir / "captions.jsonl"), caption_key="captions_en"))
    assert len(items) == 80 and len({i.key for i in items}) == 80
    assert all(len(i.captions) >= 5 for i in items)


def test_seed_format_sample_reads_as_seed_tsv(seed_sample):
    path = seed_sample
    lines = path.read_text(encoding="utf-8").splitlines()
    items = read_items(EvalSetSpec("seed", "seed_tsv", str(path)))
    ids = [line.split("\t")[1] for line in lines]
    assert [i.key for i in items] == list(dict.fromkeys(ids))
    assert sum(len(i.captions) for i in items) == len(lines)
    assert items[0].captions[0] == lines[0].split("\t")[0]
