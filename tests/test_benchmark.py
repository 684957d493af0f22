"""Evaluation lined up with LAION's clip_benchmark (launch/benchmark.py, ernievil2/benchmark.py): its
WebDataset layout (nshards.txt, KEY.cls, multi-line KEY.txt, dataset_type.txt, {c} templates), its
metrics and result JSON, checked against NumPy computations on embeddings from ernievil2.encode;
skipped samples named in the log; a missing folder one error line; the README's command lines."""
from __future__ import annotations

import io
import json
import math
import os
import re
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

import cv2
import numpy as np
import paddle
import pytest

from ernievil2.benchmark import BenchmarkOptions, clip_benchmark_metrics, resolve_dataset, resolve_sets
from ernievil2.data.formats import FormatError, Item, Problem, SourceSpec, caption_lines, open_source, wds_shards
from ernievil2.data.preprocess import preprocess
from ernievil2.encode import embed_pixels, embed_texts
from ernievil2.evaluators import EvalDataError
from ernievil2.evaluators.zeroshot import load_classnames, load_templates, mean_per_class_recall, topk_accuracy
from ernievil2.models import build_model, model_config
from ernievil2.retrieval import multi_caption_recall
from ernievil2.tokenizer import WordPieceTokenizer
from ernievil2.weights import load_model, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
SIZE = 32
CLASSES = ["red square", "green circle", "blue star", "yellow moon", "black cat", "white dog"]
TEMPLATES = ["a photo of a {c}.", "itap of a {c}", "a blurry photo of the {c}."]
CAPTIONS = [["a red square on grass", "  red box  ", ""], ["a green circle"], ["two blue stars", "night sky stars"],
            ["a yellow moon over the sea", "moonlight", "the moon"], ["a black cat sleeping", "cat on a sofa"]]
RESULT_KEYS = {"dataset", "model", "pretrained", "task", "metrics", "language"}


def _jpeg(seed: int, rgb: tuple[int, int, int]) -> bytes:
    rng = np.random.default_rng(seed)
    img = np.clip(np.asarray(rgb, dtype=np.int16)[::-1] + rng.integers(-40, 40, (36, 44, 3)), 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", img)
    assert ok
    return buf.tobytes()


def _tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _colour(k: int) -> tuple[int, int, int]:
    return [(220, 30, 30), (30, 200, 40), (40, 40, 220), (230, 220, 40), (10, 10, 10), (245, 245, 245)][k % 6]


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """clip_benchmark folders under one root: imagenet1k (classification, 2 shards, 12 good samples,
    one without KEY.cls, one undecodable) and flickr30k (retrieval, multi-line KEY.txt, 5 good
    samples, one with an empty KEY.txt, one undecodable). Returns the root and the good samples."""
    root = tmp_path_factory.mktemp("clip_benchmark")
    cls = root / "imagenet1k"
    good_cls = [(f"s{shard}_{k}", _jpeg(10 * shard + k, _colour(k)), k) for shard in range(2) for k in range(6)]
    for shard in range(2):
        samples = [(key, {"jpg": img, "cls": str(label).encode()}) for key, img, label in good_cls if key[1] == str(shard)]
        if shard == 1:
            samples += [("nocls", {"jpg": _jpeg(99, _colour(0))}), ("broken", {"jpg": b"\xff\xd8 not a jpeg", "cls": b"2"})]
        _tar(cls / "test" / f"{shard}.tar", samples)
    (cls / "test" / "nshards.txt").write_text("2\n")
    (cls / "classnames.txt").write_text("\n".join(CLASSES) + "\n", encoding="utf-8")
    (cls / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n", encoding="utf-8")
    ret = root / "flickr30k"
    good_ret = [(f"r{i}", _jpeg(50 + i, _colour(i)), lines) for i, lines in enumerate(CAPTIONS)]
    samples = [(key, {"jpg": img, "txt": "\n".join(lines).encode()}) for key, img, lines in good_ret]
    samples.insert(2, ("emptytxt", {"jpg": _jpeg(77, _colour(1)), "txt": b" \n\n"}))
    samples.append(("badimg", {"jpg": b"garbage", "txt": b"a caption of nothing"}))
    _tar(ret / "test" / "0.tar", samples)
    (ret / "test" / "nshards.txt").write_text("1")
    (ret / "dataset_type.txt").write_text("retrieval\n")
    return root, good_cls, good_ret


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A random tiny model at 32 px with its vocab, saved as our checkpoint folder."""
    folder = tmp_path_factory.mktemp("ckpt")
    texts = [t.replace("{c}", c) for c in CLASSES for t in TEMPLATES] + [c for lines in CAPTIONS for c in lines]
    vocab = WordPieceTokenizer.build_vocab(texts * 3, folder / "built_vocab.txt", vocab_size=300)
    paddle.set_device("cpu")
    paddle.seed(3)
    model = build_model(model_config("tiny", vision={"image_size": SIZE}, text={"vocab_size": 300}))
    return save_checkpoint(model, folder / "step_0000010", files={"vocab.txt": Path(vocab)})


# --------------------------------------------------------------------------- readers and metrics
def test_wds_layout_readers(sets, tmp_path):
    root, _, good_ret = sets
    assert wds_shards(str(root / "imagenet1k")) == f"{root}/imagenet1k/test/{{0..1}}.tar"
    assert wds_shards(str(root / "imagenet1k" / "test")) == f"{root}/imagenet1k/test/{{0..1}}.tar"
    assert wds_shards("https://host/shards/{0..3}.tar") == "https://host/shards/{0..3}.tar"  # a pattern: as it is
    (tmp_path / "plain" / "test").mkdir(parents=True)
    (tmp_path / "plain" / "test" / "a.tar").write_bytes(b"")
    assert wds_shards(str(tmp_path / "plain")) == f"{tmp_path}/plain/test"  # no nshards.txt: the split's *.tar
    assert wds_shards(str(tmp_path / "plain" / "test")) == str(tmp_path / "plain" / "test")
    assert caption_lines(b"one\r\n  two  \n\n three\n") == ["one", "two", "three"]
    records = list(open_source(SourceSpec("wds_retrieval", str(root / "flickr30k"))).records)
    items = [r for r in records if isinstance(r, Item)]
    problems = [r for r in records if isinstance(r, Problem)]
    assert [i.captions for i in items] == [[c.strip() for c in lines if c.strip()] for _, _, lines in good_ret] + \
        [["a caption of nothing"]]
    assert [(p.reason, p.where, p.detail) for p in problems] == \
        [("no_captions", f"{root}/flickr30k/test/0.tar: sample emptytxt", "empty KEY.txt (no caption line)")]
    with pytest.raises(FormatError, match="dataset folder not found: .*missing"):
        open_source(SourceSpec("wds_retrieval", str(tmp_path / "missing")))
    (tmp_path / "bad" / "test").mkdir(parents=True)
    (tmp_path / "bad" / "test" / "nshards.txt").write_text("zero")
    with pytest.raises(FormatError, match=r"nshards\.txt: expected a number of shards >= 1, got 'zero'"):
        wds_shards(str(tmp_path / "bad"))


def test_templates_with_c_or_braces_text_and_json(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("a photo of a {c}.\n\nitap of a {}\n", encoding="utf-8")
    assert load_templates(str(text)) == ["a photo of a {}.", "itap of a {}"]
    for bad, line in (("a {c} and a {}", 2), ("no slot", 2), ("{c} {c}", 2)):
        text.write_text(f"a {{c}}\n{bad}\n", encoding="utf-8")
        with pytest.raises(EvalDataError, match=rf"t\.txt: line {line}: a template holds '{{}}' or '{{c}}' exactly once"):
            load_templates(str(text))
    keyed = tmp_path / "templates.json"
    keyed.write_text(json.dumps({"cifar10": ["a {c}."], "imagenet1k": ["an {c}!", "the {}"]}), encoding="utf-8")
    assert load_templates(str(keyed), dataset="wds/vtab/cifar10") == ["a {}."]
    assert load_templates(str(keyed), dataset="wds/cars") == ["an {}!", "the {}"]  # clip_benchmark's default
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps(["x {c}", "y {c} {c}"]), encoding="utf-8")
    with pytest.raises(EvalDataError, match=r"list\.json: entry \[1\]: a template holds"):
        load_templates(str(listed))
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"cifar10": ["cat", "dog"]}), encoding="utf-8")
    assert load_classnames(str(names), dataset="wds/cifar10") == ["cat", "dog"]
    with pytest.raises(EvalDataError, match="no class names for dataset 'cars'"):
        load_classnames(str(names), dataset="wds/cars")
    (tmp_path / "list_names.json").write_text(json.dumps(["cat", "dog"]), encoding="utf-8")
    assert load_classnames(str(tmp_path / "list_names.json")) == ["cat", "dog"]


def test_mean_per_class_recall_keeps_the_tie_rule():
    scores = np.array([[0.9, 0.1, 0.0], [0.5, 0.5, 0.0], [0.2, 0.2, 0.2], [0.3, 0.2, 0.1], [0.0, 0.1, 0.9]])
    labels = np.array([0, 0, 1, 1, 2])
    # class 0: 1 and 1/2 (tied with one); class 1: 1/3 (three-way tie) and 0; class 2: 1
    assert mean_per_class_recall(scores, labels) == pytest.approx(100 * ((1 + 0.5) / 2 + (1 / 3 + 0) / 2 + 1) / 3)
    assert topk_accuracy(scores, labels, ks=(1,))[1] == pytest.approx(100 * (1 + 0.5 + 1 / 3 + 0 + 1) / 5)
    # without ties it is sklearn's balanced accuracy: the mean over present classes of their recall
    rng = np.random.default_rng(0)
    scores, labels = rng.normal(size=(40, 7)), rng.integers(0, 5, 40)
    pred = scores.argmax(axis=1)
    want = np.mean([(pred[labels == c] == c).mean() for c in np.unique(labels)])
    assert mean_per_class_recall(scores, labels) == pytest.approx(100 * want)


def _clip_benchmark_recalls(img: np.ndarray, txt: np.ndarray, owner: np.ndarray, ks) -> dict[str, float]:
    """clip_benchmark's zeroshot_retrieval definition, with sorting: each caption a text→image query;
    an image counts for image→text when any of its captions is among its top K texts."""
    scores = txt @ img.T
    t2i = np.argsort(-scores, axis=1, kind="stable")
    i2t = np.argsort(-scores.T, axis=1, kind="stable")
    out = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = float(np.mean([owner[t] in t2i[t, :k] for t in range(len(txt))]))
        out[f"text_retrieval_recall@{k}"] = float(np.mean([np.any(owner[i2t[i, :k]] == i) for i in range(len(img))]))
    return out


def _clip_benchmark_classification(img: np.ndarray, classes: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    scores = img @ classes.T
    top = np.argsort(-scores, axis=1, kind="stable")
    pred = top[:, 0]
    return {"acc1": float(np.mean(pred == labels)),
            "acc5": float(np.mean([labels[i] in top[i, :5] for i in range(len(labels))])),
            "mean_per_class_recall": float(np.mean([(pred[labels == c] == c).mean() for c in np.unique(labels)]))}


def test_multi_caption_recall_is_clip_benchmarks_definition():
    rng = np.random.default_rng(1)
    img, txt = rng.normal(size=(9, 16)), rng.normal(size=(23, 16))
    owner = np.concatenate([np.arange(9), rng.integers(0, 9, 14)])
    ours = multi_caption_recall(img, txt, owner, ks=(1, 2, 5, 7, 10))
    want = _clip_benchmark_recalls(img.astype(np.float32), txt.astype(np.float32), owner, (1, 2, 5, 7, 10))
    for k in (1, 2, 5, 7, 10):
        assert ours[f"t2i_r{k}"] / 100 == pytest.approx(want[f"image_retrieval_recall@{k}"])
        assert ours[f"i2t_r{k}"] / 100 == pytest.approx(want[f"text_retrieval_recall@{k}"])
    # extra Ks leave the R@1/5/10 means as they are
    assert ours["mean_recall"] == pytest.approx(np.mean([ours[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)]))
    assert multi_caption_recall(img, txt, owner)["mean_recall"] == ours["mean_recall"]


def test_metric_names_and_nan_acc5_under_five_classes():
    record = {"top1": 50.0, "top5": 100.0, "mean_per_class_recall": 40.0, "n_classes": 4}
    metrics = clip_benchmark_metrics("zeroshot_classification", record)
    assert list(metrics) == ["acc1", "acc5", "mean_per_class_recall"] and math.isnan(metrics["acc5"])
    assert clip_benchmark_metrics("zeroshot_classification", {**record, "n_classes": 5})["acc5"] == 1.0
    retrieval = clip_benchmark_metrics("zeroshot_retrieval", {"t2i_r5": 60.0, "i2t_r5": 80.0}, [5])
    assert retrieval == {"image_retrieval_recall@5": 0.6, "text_retrieval_recall@5": 0.8}


def test_resolving_datasets(sets, tmp_path):
    root, _, _ = sets
    opts = BenchmarkOptions(dataset=[], ckpt="c", dataset_root=f"{root}/{{dataset_cleaned}}")
    cls = resolve_dataset("wds/imagenet1k", opts)
    assert (cls.task, cls.slug, cls.entry["format"], cls.entry["path"]) == \
        ("zeroshot_classification", "imagenet1k", "shards", f"{root}/imagenet1k/test")
    assert cls.entry["templates"].endswith("zeroshot_classification_templates.txt") and cls.entry["skip_bad_samples"]
    ret = resolve_dataset(str(root / "flickr30k"), opts, "zh")  # a local folder; no *_zh files: the plain ones
    assert (ret.task, ret.slug, ret.entry["format"], ret.language) == ("zeroshot_retrieval", "flickr30k",
                                                                      "wds_retrieval", "zh")
    (root / "imagenet1k" / "classnames_zh.txt").write_text("\n".join(f"类{k}" for k in range(6)), encoding="utf-8")
    try:
        assert resolve_dataset("wds/imagenet1k", opts, "zh").entry["classnames"].endswith("classnames_zh.txt")
    finally:
        (root / "imagenet1k" / "classnames_zh.txt").unlink()
    listing = tmp_path / "datasets.txt"  # a file of dataset names, as clip_benchmark takes one
    listing.write_text("wds/imagenet1k\n\nwds/flickr30k\n", encoding="utf-8")
    listed = resolve_sets(BenchmarkOptions(dataset=[str(listing)], ckpt="c", dataset_root=f"{root}/{{dataset}}",
                                           language=["en", "zh"]))
    assert [(b.dataset, b.language) for b in listed] == [("wds/imagenet1k", "en"), ("wds/imagenet1k", "zh"),
                                                         ("wds/flickr30k", "en"), ("wds/flickr30k", "zh")]
    folder = resolve_dataset(f"imagefolder:{tmp_path}", opts, "zh")
    assert (folder.task, folder.entry["templates"]) == ("zeroshot_classification", "zh")
    # the entries are eval config entries: the training schema takes them as they are
    from ernievil2.train.config import ClassificationSetSchema, EvalSetSchema

    ClassificationSetSchema(**cls.entry)
    EvalSetSchema(**ret.entry)


# --------------------------------------------------------------------------- the command line
def _readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Evaluate a checkpoint", 1)[1].split("\n## ", 1)[0]
    lines = [ln for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", section, flags=re.S)
             for ln in block.replace("\\\n", " ").splitlines()]
    return [ln for ln in lines if "launch/" in ln and not ln.lstrip().startswith("#")]


def _run(words: list[str], cwd: Path = REPO, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}  # a light neighbour on a shared machine
    return subprocess.run([sys.executable, *words], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _reference(ckpt: Path, good_cls, good_ret) -> dict[str, dict[str, float]]:
    """clip_benchmark's metrics, computed here from embeddings of ernievil2.encode."""
    loaded = load_model(ckpt)
    model, tok = loaded.model, loaded.tokenizer(48)
    pixels = lambda images: np.stack([preprocess(b, size=SIZE) for b in images])  # noqa: E731
    img = embed_pixels(model, pixels([b for _, b, _ in good_cls]))
    prompts = embed_texts(model, tok, [t.replace("{c}", c) for c in CLASSES for t in TEMPLATES], 48)
    prompts = prompts.reshape(len(CLASSES), len(TEMPLATES), -1).mean(axis=1)
    classes = prompts / np.linalg.norm(prompts, axis=1, keepdims=True)
    cls = _clip_benchmark_classification(img, classes, np.array([label for _, _, label in good_cls]))
    captions = [[c.strip() for c in lines if c.strip()] for _, _, lines in good_ret]
    owner = np.array([i for i, lines in enumerate(captions) for _ in lines])
    txt = embed_texts(model, tok, [c for lines in captions for c in lines], 48)
    ret = _clip_benchmark_recalls(embed_pixels(model, pixels([b for _, b, _ in good_ret])), txt, owner, (1, 5, 10))
    return {"imagenet1k": cls, "flickr30k": ret}


@pytest.mark.slow
def test_readme_benchmark_command_matches_numpy(sets, ckpt, tmp_path):
    root, good_cls, good_ret = sets
    [line] = [c for c in _readme_commands() if "launch/benchmark.py" in c]
    out = tmp_path / "results"
    subst = {"/data/clip_benchmark/{dataset}": f"{root}/{{dataset}}", "outputs/demo/RUN": str(ckpt),
             "results/{dataset}_{model}_{task}.json": f"{out}/{{dataset}}_{{model}}_{{task}}.json"}
    words = [subst.get(w, w) for w in shlex.split(line)]
    assert words[:3] == ["python", "launch/benchmark.py", "eval"] and str(ckpt) in words and str(out) in words[-1]
    proc = _run(words[1:])
    assert proc.returncode == 0, proc.stderr[-4000:]
    want = _reference(ckpt, good_cls, good_ret)
    for name, task in (("imagenet1k", "zeroshot_classification"), ("flickr30k", "zeroshot_retrieval")):
        result = json.loads((out / f"{name}_ernievil2_{task}.json").read_text(encoding="utf-8"))
        assert set(result) == RESULT_KEYS
        assert (result["dataset"], result["model"], result["pretrained"], result["task"], result["language"]) == \
            (f"wds/{name}", "ernievil2", str(ckpt), task, "en")
        assert list(result["metrics"]) == list(want[name])
        for key, value in want[name].items():
            assert 0.0 <= result["metrics"][key] <= 1.0
            assert result["metrics"][key] == pytest.approx(value, abs=1e-9), (name, key)
    # each malformed sample is skipped, counted and named with shard and key
    err = proc.stderr
    assert f"{root}/imagenet1k/test/1.tar: sample nocls: no label" in err
    assert f"{root}/imagenet1k/test/1.tar: sample broken: cannot decode image" in err
    assert f"{root}/flickr30k/test/0.tar: sample emptytxt: empty KEY.txt" in err
    assert f"{root}/flickr30k/test/0.tar: sample badimg: cannot decode image" in err
    assert "evaluation set wds/imagenet1k: skipped 2 malformed sample(s) (no_label 1, undecodable_image 1)" in err
    assert "evaluation set wds/flickr30k: skipped 2 malformed sample(s) (no_captions 1, undecodable_image 1)" in err


@pytest.mark.slow
def test_readme_mode_eval_command_gives_the_same_records(sets, ckpt, tmp_path):
    """``mode=eval eval=clip_benchmark`` runs the evaluators the benchmark command runs: same numbers."""
    root, good_cls, good_ret = sets
    [line] = [c for c in _readme_commands() if "launch/train.py" in c and "eval=clip_benchmark" in c]
    words = shlex.split(line)
    assert words[0] == "CLIP_BENCHMARK_ROOT=/data/clip_benchmark" and words[1:3] == ["python", "launch/train.py"]
    args = [str(REPO / "launch" / "train.py")] + [w.replace("outputs/demo/RUN", str(ckpt)) for w in words[3:]]
    proc = _run(args, cwd=tmp_path, env={"CLIP_BENCHMARK_ROOT": str(root)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    [results] = list((tmp_path / "outputs").rglob("eval_results.json"))
    records = {r["dataset"]: r for r in json.loads(results.read_text(encoding="utf-8"))["records"]}
    want = _reference(ckpt, good_cls, good_ret)
    for name, task in (("imagenet1k", "zeroshot_classification"), ("flickr30k", "zeroshot_retrieval")):
        got = clip_benchmark_metrics(task, records[f"wds/{name}"], (1, 5, 10))
        assert got == pytest.approx(want[name], abs=1e-9), name
        # mode=eval also writes clip_benchmark's result JSON, one per set
        doc = json.loads((results.parent / "clip_benchmark" / f"wds-{name}_{task}.json").read_text(encoding="utf-8"))
        assert set(doc) == RESULT_KEYS and (doc["dataset"], doc["task"], doc["language"]) == (f"wds/{name}", task, "en")
        assert doc["metrics"] == pytest.approx(want[name], abs=1e-9), name


def test_user_errors_are_one_line(sets, tmp_path):
    proc = _run(["launch/benchmark.py", "eval", "--dataset", "wds/cifar10", "--dataset_root",
                 f"{tmp_path}/{{dataset}}", "--ckpt", str(tmp_path / "none")])
    assert proc.returncode == 2 and proc.stdout == ""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines == [f"benchmark.py: error: wds/cifar10: dataset folder not found: {tmp_path}/cifar10 "
                     f"(--dataset_root {tmp_path}/{{dataset}})"], proc.stderr
    (tmp_path / "cifar10" / "test").mkdir(parents=True)
    proc = _run(["launch/benchmark.py", "eval", "--dataset", "wds/cifar10", "--dataset_root",
                 f"{tmp_path}/{{dataset}}", "--ckpt", str(tmp_path / "none")])
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and lines == [
        f"benchmark.py: error: wds/cifar10: no classnames.txt in {tmp_path}/cifar10 (zeroshot_classification "
        "needs the class names; or give --custom_classname_file)"], proc.stderr
    root, _, _ = sets
    proc = _run(["launch/benchmark.py", "eval", "--dataset", "wds/flickr30k", "--dataset_root", f"{root}/{{dataset}}",
                 "--ckpt", str(tmp_path / "none"), "--language", "en", "zh", "--output", f"{tmp_path}/{{dataset}}.json"])
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and lines == [
        f"benchmark.py: error: --output {tmp_path}/{{dataset}}.json names one file for wds/flickr30k (en) and "
        "wds/flickr30k (zh); put {dataset} and {language} in it"], proc.stderr


def test_readme_zero_shot_command_runs_on_an_imagenet_folder(ckpt, tmp_path):
    """README's zero-shot line (eval-only, classification alone) on an ImageNet-style folder."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    [line] = [ln for ln in text.splitlines() if "eval=imagenet" in ln and ln.startswith("python launch/train.py")]
    folder, names = tmp_path / "val", tmp_path / "imagenet_zh.txt"
    for k, synset in enumerate(["n01", "n02", "n03"]):
        (folder / synset).mkdir(parents=True)
        for i in range(2):
            (folder / synset / f"{i}.jpg").write_bytes(_jpeg(20 * k + i, _colour(k)))
    names.write_text("红色方块\n绿色圆形\n蓝色星星\n", encoding="utf-8")
    words = [w.replace("outputs/demo/RUN", str(ckpt)).replace("/data/imagenet/val", str(folder))
             .replace("=imagenet_zh.txt", f"={names}") for w in shlex.split(line)[1:]]
    proc = _run([str(REPO / words[0]), *words[1:]], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    [results] = list((tmp_path / "outputs").rglob("eval_results.json"))
    [record] = json.loads(results.read_text(encoding="utf-8"))["records"]
    assert (record["dataset"], record["n_images"], record["n_classes"]) == ("imagenet", 6, 3)
    assert 0 <= record["top1"] <= record["top5"] == 100.0  # 3 classes: every image's class is in the top 5
