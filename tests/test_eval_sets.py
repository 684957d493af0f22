"""The shipped evaluation-set configs (conf/eval/) and the readers on the real data beside the repo."""
from __future__ import annotations

import base64
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import paddle
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ernievil2.encode import embed_pixels, embed_texts
from ernievil2.evaluators import EvalContext, build_evaluators
from ernievil2.evaluators.retrieval import EvalSetSpec, eval_set_spec, read_items
from ernievil2.models import build_model, model_config
from ernievil2.train.config import EvalSchema, EvalSetSchema, register_schemas, validate

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
REPO = CONF_DIR.parent

register_schemas()


def _eval_specs(*overrides: str) -> list[EvalSetSpec]:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = validate(compose(config_name="config", overrides=list(overrides)))
    return [eval_set_spec(entry) for entry in cfg.eval.datasets]


def test_every_eval_config_composes_and_validates(monkeypatch):
    for var in ("FLICKR30K_JSON", "FLICKR30K_IMAGES", "COCO_CN_TSV", "FLICKR30K_CN_DIR", "MUGE_DIR"):
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


# --------------------------------------------------------------------------- Chinese-CLIP's layout: Flickr30K-CN, MUGE
CN_WORDS = "红蓝绿狗猫车树房船鸟天路"
SIZE = 32


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    ok, buf = cv2.imencode(".jpg", rng.integers(0, 256, (24 + seed % 5, 30, 3), dtype=np.uint8))
    assert ok
    return buf.tobytes()


def _cn_text(k: int) -> str:
    return "一只" + "".join(CN_WORDS[(k * 7 + j * 5) % len(CN_WORDS)] for j in range(2 + k % 3)) + "的照片"


def _chinese_clip_folder(root: Path, split: str, images: int, texts: list[list[int]]) -> Path:
    """``{split}_imgs.tsv`` (image_id \\t base64 jpeg) and ``{split}_texts.jsonl`` (text_id, text, image_ids)."""
    root.mkdir(parents=True, exist_ok=True)
    ids = [1000 + 37 * k for k in range(images)]
    (root / f"{split}_imgs.tsv").write_text(
        "".join(f"{i}\t{base64.b64encode(_jpeg(k)).decode()}\n" for k, i in enumerate(ids)), encoding="utf-8")
    (root / f"{split}_texts.jsonl").write_text("".join(
        json.dumps({"text_id": 500 + t, "text": _cn_text(t), "image_ids": [ids[k] for k in listed]}, ensure_ascii=False)
        + "\n" for t, listed in enumerate(texts)), encoding="utf-8")
    return root


# Flickr30K-CN's test layout: every text lists one image, every image has several texts (5 there)
FLICKR_TEXTS = [[k] for k in range(6) for _ in range(2 + k % 2)]
# MUGE's: queries list one or more images; far more images than queries
MUGE_TEXTS = [[0, 3, 7], [1], [2, 4, 5, 8, 9], [6, 0]]


def _numpy_recalls(img: np.ndarray, txt: np.ndarray, texts: list[list[int]], ks=(1, 5, 10)) -> dict[str, float]:
    """Chinese-CLIP's recall (``evaluation.py``, ``evaluation_tr.py``): a query scores at K when any of
    its ground truths is among its K best-scoring candidates. Every image is a candidate of every text;
    the image queries are the images some text lists."""
    scores = txt @ img.T
    out = {}
    for k in ks:
        top_images = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        out[f"t2i_r{k}"] = 100.0 * np.mean([bool(set(top_images[t]) & set(g)) for t, g in enumerate(texts)])
        top_texts = np.argsort(-scores.T, axis=1, kind="stable")[:, :k]
        truth = [{t for t, g in enumerate(texts) if i in g} for i in range(len(img))]
        out[f"i2t_r{k}"] = 100.0 * np.mean([bool(set(top_texts[i]) & truth[i]) for i in range(len(img)) if truth[i]])
    out["t2i_mean"] = float(np.mean([out[f"t2i_r{k}"] for k in (1, 5, 10)]))
    out["i2t_mean"] = float(np.mean([out[f"i2t_r{k}"] for k in (1, 5, 10)]))
    out["mean_recall"] = (out["t2i_mean"] + out["i2t_mean"]) / 2
    return out


def _embeddings(model, tokenizer, folder: Path, split: str, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings of the stand-in's images (file order) and texts (line order), one image at a time."""
    from ernievil2.data.preprocess import preprocess

    lines = (folder / f"{split}_imgs.tsv").read_text(encoding="utf-8").splitlines()
    pixels = np.stack([preprocess(base64.b64decode(line.split("\t")[1]), size=SIZE) for line in lines])
    captions = [json.loads(line)["text"] for line in (folder / f"{split}_texts.jsonl").read_text("utf-8").splitlines()]
    return embed_pixels(model, pixels), embed_texts(model, tokenizer, captions, max_length)


def _reference(model, tokenizer, folder: Path, split: str, texts: list[list[int]], max_length: int):
    return _numpy_recalls(*_embeddings(model, tokenizer, folder, split, max_length), texts)


@pytest.fixture(scope="module")
def cn_ckpt(tmp_path_factory) -> Path:
    """A random tiny model at 32 px with a vocab of the stand-ins' characters, saved as our checkpoint."""
    from ernievil2.tokenizer import WordPieceTokenizer
    from ernievil2.weights import save_checkpoint

    folder = tmp_path_factory.mktemp("cn_ckpt")
    vocab = WordPieceTokenizer.build_vocab([_cn_text(k) for k in range(30)] * 3, folder / "vocab.txt", vocab_size=200)
    paddle.set_device("cpu")
    paddle.seed(11)
    model = build_model(model_config("tiny", vision={"image_size": SIZE}, text={"vocab_size": 200}))
    return save_checkpoint(model, folder / "step_0000001", files={"vocab.txt": Path(vocab)})


def test_chinese_sets_configs(monkeypatch, tmp_path):
    for var in ("FLICKR30K_CN_DIR", "MUGE_DIR"):
        monkeypatch.delenv(var, raising=False)
    (flickr,) = _eval_specs("eval=flickr30k_cn")
    (muge,) = _eval_specs("eval=muge")
    assert (flickr.format, flickr.split, flickr.path) == ("chinese_clip", "test", None)
    assert (muge.format, muge.split, muge.path) == ("chinese_clip", "valid", None)
    with pytest.raises(ValueError, match="'muge' \\(format chinese_clip\\): 'path' is not set"):
        read_items(muge)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        entries = {name: compose(config_name="config", overrides=[f"eval={name}"]).eval.datasets[0]
                   for name in ("flickr30k_cn", "muge")}
    assert {n: (e.protocol, e.directions, e.language) for n, e in entries.items()} == {
        "flickr30k_cn": ("multi", "both", "zh"), "muge": ("multi", "t2i", "zh")}
    monkeypatch.setenv("FLICKR30K_CN_DIR", str(tmp_path / "f"))
    monkeypatch.setenv("MUGE_DIR", str(tmp_path / "m"))
    assert [s.path for s in (*_eval_specs("eval=flickr30k_cn"), *_eval_specs("eval=muge"))] == [
        str(tmp_path / "f"), str(tmp_path / "m")]
    (muge,) = _eval_specs("eval=muge", "eval.datasets.0.path=/x/MUGE")
    assert muge.path == "/x/MUGE"
    with pytest.raises(ValueError, match="unknown directions 'i2t'"):
        _eval_specs("eval=muge", "eval.datasets.0.directions=i2t")


@pytest.mark.parametrize("hold_mb", [512, 0], ids=["held", "streamed"])
def test_texts_with_several_images_count_once(tmp_path, cn_ckpt, hold_mb):
    """MUGE-like: 10 images, 4 queries listing 1-5 of them: the evaluator's recall is Chinese-CLIP's."""
    from ernievil2.weights import load_model

    folder = _chinese_clip_folder(tmp_path / "MUGE", "valid", 10, MUGE_TEXTS)
    loaded = load_model(cn_ckpt)
    tokenizer = loaded.tokenizer(48)
    entries = [EvalSetSchema(name=n, format="chinese_clip", path=str(folder), split="valid", directions=d)
               for n, d in (("both", "both"), ("t2i", "t2i"))]
    cfg = OmegaConf.structured(EvalSchema(batch_size=3, hold_images_mb=hold_mb, datasets=entries))
    both, t2i = build_evaluators(cfg, EvalContext(SIZE, tokenizer, 48))
    [record] = both(loaded.model, 1)
    assert both.data.text_ids.shape[0] == len(MUGE_TEXTS) and both.data.n_images == 10  # each query once
    want = _reference(loaded.model, tokenizer, folder, "valid", MUGE_TEXTS, 48)
    assert set(record) == {"step", "dataset", "protocol", *want}
    for key, value in want.items():
        assert record[key] == pytest.approx(value, abs=1e-6), key
    [only] = t2i(loaded.model, 1)
    assert {k: v for k, v in only.items() if k not in ("dataset",)} == {
        "step": 1, "protocol": "multi", **{k: record[k] for k in record if k.startswith("t2i_")},
        "mean_recall": record["t2i_mean"]}


# images no text lists (Chinese-CLIP ranks every image of imgs.tsv): MUGE-like, 14 images, 6 of them
# listed; Flickr30K-CN-like (one image per text), 8 images, 4 listed
DISTRACTED_MUGE = (14, [[0, 3], [1], [3, 6, 9], [7, 0], [1], [9]])
DISTRACTED_FLICKR = (8, [[0], [0], [2], [5], [5], [5], [6]])


def _without_distractors(folder: Path, dest: Path, split: str, texts: list[list[int]]) -> list[list[int]]:
    """A copy of ``folder`` without the images no text lists; the texts' lists renumbered."""
    listed = sorted({k for g in texts for k in g})
    dest.mkdir()
    lines = (folder / f"{split}_imgs.tsv").read_text(encoding="utf-8").splitlines()
    (dest / f"{split}_imgs.tsv").write_text("".join(lines[k] + "\n" for k in listed), encoding="utf-8")
    (dest / f"{split}_texts.jsonl").write_bytes((folder / f"{split}_texts.jsonl").read_bytes())
    return [[listed.index(k) for k in g] for g in texts]


@pytest.mark.parametrize("hold_mb", [512, 0], ids=["held", "streamed"])
def test_images_no_text_lists_are_text_to_image_distractors(tmp_path, cn_ckpt, hold_mb):
    """Text->image ranks every image, listed or not; image->text queries only the listed ones; the 1:1
    protocol pairs each listed image with its first text. Without the distractors t2i recall can only rise."""
    from ernievil2.weights import load_model

    loaded = load_model(cn_ckpt)
    tokenizer = loaded.tokenizer(48)
    changed = False
    for name, (n_images, texts) in (("muge", DISTRACTED_MUGE), ("flickr", DISTRACTED_FLICKR)):
        folder = _chinese_clip_folder(tmp_path / name, "valid", n_images, texts)
        plain_texts = _without_distractors(folder, tmp_path / f"{name}_listed", "valid", texts)
        entries = [EvalSetSchema(name=n, format="chinese_clip", path=str(path), split="valid", protocol="both")
                   for n, path in ((name, folder), (f"{name}_listed", tmp_path / f"{name}_listed"))]
        cfg = OmegaConf.structured(EvalSchema(batch_size=3, hold_images_mb=hold_mb, datasets=entries))
        distracted, plain = build_evaluators(cfg, EvalContext(SIZE, tokenizer, 48))
        listed = sorted({k for g in texts for k in g})
        assert (distracted.data.n_images, plain.data.n_images) == (n_images, len(listed))
        assert distracted.data.text_ids.shape[0] == plain.data.text_ids.shape[0] == len(texts)
        multi, official = distracted(loaded.model, 1)
        img, txt = _embeddings(loaded.model, tokenizer, folder, "valid", 48)
        assert multi == pytest.approx({"step": 1, "dataset": name, "protocol": "multi",
                                       **_numpy_recalls(img, txt, texts)}, abs=1e-6)
        if name == "flickr":  # one image per text: the 1:1 pairs are each listed image and its first line
            first = [min(t for t, g in enumerate(texts) if g == [k]) for k in listed]
            assert official == pytest.approx({"step": 1, "dataset": name, "protocol": "official",
                                              **_numpy_recalls(img, txt[first], [[k] for k in listed])}, abs=1e-6)
        # the same set less its distractors: the same image queries and text candidates, fewer images to beat
        plain_multi, plain_official = plain(loaded.model, 1)
        assert plain_multi == pytest.approx({"step": 1, "dataset": f"{name}_listed", "protocol": "multi",
                                             **_numpy_recalls(img[listed], txt, plain_texts)}, abs=1e-6)
        for ours, theirs in ((multi, plain_multi), (official, plain_official)):
            assert all(ours[f"t2i_r{k}"] <= theirs[f"t2i_r{k}"] for k in (1, 5, 10))
            assert {k: v for k, v in ours.items() if k.startswith("i2t_")} == pytest.approx(
                {k: v for k, v in theirs.items() if k.startswith("i2t_")}, abs=1e-6)
            changed |= any(ours[f"t2i_r{k}"] < theirs[f"t2i_r{k}"] for k in (1, 5, 10))
    assert changed, "no distractor outranked a ground truth: the test shows nothing"


def _header_commands(name: str) -> list[str]:
    return [line[1:].strip() for line in (CONF_DIR / "eval" / f"{name}.yaml").read_text(encoding="utf-8").splitlines()
            if line.startswith("#   ") and "launch/train.py" in line]


def _run_header_command(line: str, subst: dict[str, str], cwd: Path) -> dict:
    """Run one header command line (``VAR=value`` prefixes as the environment) and return its records."""
    words = shlex.split(line)
    for old, new in subst.items():
        words = [w.replace(old, new) for w in words]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **dict(w.split("=", 1) for w in words[: words.index("python")])}
    args = words[words.index("python") + 1:]
    assert args[0] == "launch/train.py"
    cwd.mkdir(parents=True)
    proc = subprocess.run([sys.executable, str(REPO / args[0]), *args[1:]], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    [results] = list(cwd.rglob("eval_results.json"))
    return json.loads(results.read_text(encoding="utf-8"))


@pytest.mark.slow
@pytest.mark.parametrize("name, split, data_dir, texts, images", [
    ("flickr30k_cn", "test", "/data/Flickr30k-CN", FLICKR_TEXTS, 6),
    ("muge", "valid", "/data/MUGE", MUGE_TEXTS, 10)])
def test_chinese_set_header_commands_match_numpy(tmp_path, cn_ckpt, name, split, data_dir, texts, images):
    from ernievil2.weights import load_model

    folder = _chinese_clip_folder(tmp_path / "data", split, images, texts)
    loaded = load_model(cn_ckpt)
    want = _reference(loaded.model, loaded.tokenizer(48), folder, split, texts, 48)
    if name == "muge":  # text->image only; its mean recall is text->image's
        want = {**{k: v for k, v in want.items() if k.startswith("t2i_")}, "mean_recall": want["t2i_mean"]}
    commands = _header_commands(name)
    assert len(commands) == 2 and any("eval.datasets.0.path=" in c for c in commands)
    for n, line in enumerate(commands):
        out = _run_header_command(line, {"CKPT": str(cn_ckpt), data_dir: str(folder)}, tmp_path / f"run{n}")
        [record] = out["records"]
        assert (record["dataset"], record["protocol"]) == (name, "multi")
        assert set(record) == {"step", "dataset", "protocol", *want}, line
        for key, value in want.items():
            assert record[key] == pytest.approx(value, abs=1e-6), (line, key)
        [doc] = [json.loads(p.read_text(encoding="utf-8")) for p in (tmp_path / f"run{n}").rglob("clip_benchmark/*.json")]
        assert doc["language"] == "zh" and any(k.startswith("image_retrieval_recall@") for k in doc["metrics"])
        assert any(k.startswith("text_retrieval_recall@") for k in doc["metrics"]) == (name != "muge")
