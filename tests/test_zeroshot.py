"""Zero-shot classification: exact top-k on a hand-built model, ties, readers, config and a demo run."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import paddle
import pytest
from PIL import Image

from ernievil2.data.demo import DemoDataSpec, demo_object_images, object_class_names
from ernievil2.data.preprocess import IMAGENET_MEAN, IMAGENET_STD
from ernievil2.data.sample import RawSample
from ernievil2.data.shard_writer import ShardWriter
from ernievil2.evaluators.base import EvalDataError
from ernievil2.evaluators.zeroshot import (
    TEMPLATE_SETS,
    ClassificationSet,
    ClassificationSetSpec,
    ZeroShotEvaluator,
    class_embeddings,
    load_classification_set,
    load_templates,
    topk_accuracy,
)
from ernievil2.tokenizer import WordPieceTokenizer

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["cat", "dog", "fox", "owl", "bee", "ant"]
DIM = 8


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> WordPieceTokenizer:
    vocab = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *CLASSES, "x", "photo"]) + "\n")
    return WordPieceTokenizer(vocab, max_length=8)


class HandBuiltModel:
    """Known embeddings. Text: the sum over tokens of a table row (class word k -> e_k, "x" -> e_6,
    everything else 0), normalised. Image: a solid image whose red value is 10·i embeds as row i of
    ``image_rows``, normalised."""

    def __init__(self, tokenizer: WordPieceTokenizer, image_rows: np.ndarray):
        self.training = True
        self.cfg = SimpleNamespace(text=SimpleNamespace(pad_id=tokenizer.pad_id, width=DIM))
        self.table = np.zeros((tokenizer.vocab_size, DIM), dtype=np.float32)
        for k, word in enumerate(CLASSES):
            self.table[tokenizer.token_to_id(word), k] = 1.0
        self.table[tokenizer.token_to_id("x"), 6] = 1.0
        self.image_rows = image_rows

    def eval(self):
        self.training = False

    def train(self, mode: bool = True):
        self.training = mode

    def encode_text(self, ids: paddle.Tensor) -> paddle.Tensor:
        emb = self.table[ids.numpy()].sum(axis=1)
        return paddle.to_tensor(emb / np.linalg.norm(emb, axis=1, keepdims=True))

    def encode_image(self, pixels: paddle.Tensor) -> paddle.Tensor:
        red = pixels.numpy()[:, 0].mean(axis=(1, 2)) * IMAGENET_STD[0] + IMAGENET_MEAN[0]
        emb = self.image_rows[np.rint(red * 255 / 10).astype(int)]
        return paddle.to_tensor(emb / np.linalg.norm(emb, axis=1, keepdims=True))


def _solid(i: int, size: int = 16) -> np.ndarray:
    img = np.zeros((size, size, 3), dtype=np.uint8)
    img[..., 0] = 10 * i
    return img


def _e(*weights: tuple[int, float]) -> np.ndarray:
    v = np.zeros(DIM, dtype=np.float32)
    for k, w in weights:
        v[k] = w
    return v


def test_topk_accuracy_counts_ties_in_expectation():
    scores = np.array([[0.9, 0.1, 0.1], [0.5, 0.5, 0.1], [0.2, 0.2, 0.2], [0.3, 0.2, 0.1]])
    labels = np.array([0, 1, 2, 2])
    # image 0: top-1; image 1: tied with one class -> 1/2 at k=1; image 2: all three tied -> 1/3 at
    # k=1, 2/3 at k=2; image 3: last -> 0 at k<3
    acc = topk_accuracy(scores, labels, ks=(1, 2, 3))
    assert acc[1] == pytest.approx(100 * (1 + 0.5 + 1 / 3 + 0) / 4)
    assert acc[2] == pytest.approx(100 * (1 + 1 + 2 / 3 + 0) / 4)
    assert acc[3] == pytest.approx(100.0)
    # a model that scores every class alike gets chance, not 100 %
    assert topk_accuracy(np.zeros((4, 8)), np.arange(4), ks=(1, 5)) == {1: 12.5, 5: 62.5}


def test_hand_built_model_exact_top1_top5(tokenizer):
    rows = np.stack([
        _e((0, 1.0)),                                               # label 0: top-1
        _e((1, 1.0), (2, 0.5)),                                     # label 1: top-1
        _e((3, 1.0), (4, 1.0)),                                     # label 3: tied with class 4 -> 1/2, top-5
        _e((0, 1.0), (1, 1.0), (2, 1.0), (3, 1.0), (4, 1.0), (5, 0.1)),  # label 5: 6th -> 0, 0
        _e((0, 1.0), (1, 1.0), (2, 0.9)),                           # label 2: 3rd -> 0, top-5
    ])
    model = HandBuiltModel(tokenizer, rows)
    templates = ["{}", "{} x"]
    classes = class_embeddings(model, tokenizer, CLASSES, templates, max_length=8)
    # the normalised mean of the normalised template embeddings: e_k and (e_k + e_6) / sqrt 2
    for k in range(len(CLASSES)):
        want = _e((k, 1 + 2 ** -0.5), (6, 2 ** -0.5))
        np.testing.assert_allclose(classes[k], want / np.linalg.norm(want), atol=1e-6)
    crops = np.stack([_solid(i) for i in range(len(rows))])
    data = ClassificationSet(crops, np.array([0, 1, 3, 5, 2]), CLASSES, templates)
    [record] = ZeroShotEvaluator("hand", data, tokenizer, 8)(model, step=7)
    assert record["top1"] == pytest.approx(100 * (1 + 1 + 0.5 + 0 + 0) / 5)
    assert record["top5"] == pytest.approx(100 * (1 + 1 + 1 + 0 + 1) / 5)
    assert (record["step"], record["dataset"], record["protocol"], record["n_images"], record["n_classes"]) == \
        (7, "hand", "zeroshot", 5, 6)
    assert record["chance_top1"] == pytest.approx(100 / 6)
    assert model.training  # restored


def test_templates_builtin_and_file(tmp_path):
    assert load_templates("zh") == list(TEMPLATE_SETS["zh"])
    good = tmp_path / "t.txt"
    good.write_text("a photo of a {}.\n\nitap of a {}.\n", encoding="utf-8")
    assert load_templates(str(good)) == ["a photo of a {}.", "itap of a {}."]
    bad = tmp_path / "bad.txt"
    bad.write_text("a photo of a {}.\nno slot here\n", encoding="utf-8")
    with pytest.raises(EvalDataError, match=r"bad\.txt: line 2: a template holds"):
        load_templates(str(bad))
    with pytest.raises(EvalDataError, match="neither a built-in set"):
        load_templates("klingon")


def _png(rgb: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 24), rgb).save(buf, format="PNG")
    return buf.getvalue()


def test_imagefolder_reader_labels_names_and_errors(tmp_path):
    root = tmp_path / "val"
    for folder, n in (("n02_dog", 2), ("n01_cat", 3)):
        (root / folder / "sub").mkdir(parents=True)
        for j in range(n):
            (root / folder / "sub" / f"{j}.png").write_bytes(_png((10 * j, 0, 0)))
    (root / "n01_cat" / "notes.txt").write_text("not an image")
    spec = ClassificationSetSpec(name="f", format="imagefolder", path=str(root))
    data = load_classification_set(spec, image_size=16)
    assert data.classnames == ["n01 cat", "n02 dog"] and data.labels.tolist() == [0, 0, 0, 1, 1]
    assert data.images.shape == (5, 16, 16, 3) and data.images.dtype == np.uint8
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"n01_cat": "猫", "n02_dog": "狗"}), encoding="utf-8")
    named = load_classification_set(ClassificationSetSpec(name="f", format="imagefolder", path=str(root),
                                                          classnames=str(names)), image_size=16)
    assert named.classnames == ["猫", "狗"]
    short = tmp_path / "short.txt"
    short.write_text("cat\n", encoding="utf-8")
    with pytest.raises(EvalDataError, match=r"short\.txt: 1 class names for 2 class folders"):
        load_classification_set(ClassificationSetSpec(name="f", format="imagefolder", path=str(root),
                                                      classnames=str(short)), image_size=16)
    (root / "n02_dog" / "sub" / "broken.jpg").write_bytes(b"garbage")
    with pytest.raises(EvalDataError, match=r"broken\.jpg: cannot decode image"):
        load_classification_set(spec, image_size=16)


def test_shards_reader_takes_cls_or_json_label(tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\n", encoding="utf-8")
    with ShardWriter(tmp_path / "shards", prefix="cls") as writer:
        writer.write(RawSample(key="a", image=_png((0, 0, 0)), captions=["x"], meta={"label": 1}))
        writer.write(RawSample(key="b", image=_png((9, 0, 0)), captions=["x"], meta={"label": "cat"}))
    spec = ClassificationSetSpec(name="s", format="shards", path=str(tmp_path / "shards"), classnames=str(names))
    assert load_classification_set(spec, image_size=16).labels.tolist() == [1, 0]
    with ShardWriter(tmp_path / "bad", prefix="cls") as writer:
        writer.write(RawSample(key="c", image=_png((0, 0, 0)), captions=["x"], meta={"label": "cow"}))
    with pytest.raises(EvalDataError, match="sample c: label 'cow' is neither a class index nor a class name"):
        load_classification_set(ClassificationSetSpec(name="s", format="shards", path=str(tmp_path / "bad"),
                                                      classnames=str(names)), image_size=16)


def test_demo_classification_set_is_the_held_out_objects():
    spec = DemoDataSpec(n_val=100)
    images, labels, names = demo_object_images(spec, "zh")
    assert len(images) == 100 and len(names) == 24 and names[0] == "红色圆形"
    assert object_class_names("en")[:2] == ["red circle", "red square"]
    again, labels_again, _ = demo_object_images(spec, "en")
    assert again == images and labels_again == labels  # deterministic
    assert len(set(labels)) > 12  # many classes represented


@pytest.mark.slow
def test_demo_run_logs_zero_shot_records(tmp_path):
    """A short demo run evaluates the two zero-shot sets in the loop, logs them and plots them."""
    run = tmp_path / "run"
    cmd = [sys.executable, "launch/train.py", "trainer.max_steps=4", "eval.every_n_steps=2", "data.batch_size=16",
           "data.demo.n_train=64", "data.demo.n_val=40", "data.num_workers=0", "trainer.save_checkpoint=false",
           f"hydra.run.dir={run}", f"data.demo.cache_dir={tmp_path / 'cache'}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    zs = [r for r in records if r["protocol"] == "zeroshot"]
    assert [(r["step"], r["dataset"]) for r in zs] == [(2, "demo_objects_en"), (2, "demo_objects_zh"),
                                                      (4, "demo_objects_en"), (4, "demo_objects_zh")]
    assert all(r["n_images"] == 40 and r["n_classes"] == 24 and 0 <= r["top1"] <= r["top5"] <= 100 for r in zs)
    assert "zero-shot, 40 images, 24 classes" in proc.stderr + proc.stdout


def test_demo_objects_are_ordinary_class_shards(tmp_path):
    """The demo generator writes its classification set as class shards with class names and
    templates beside them; read by the ordinary shards reader, it is the held-out objects."""
    from ernievil2.data.demo import OBJECT_TEMPLATES, demo_path, ensure_demo_data

    spec = DemoDataSpec(n_train=8, n_val=30, samples_per_shard=8)
    demo = ensure_demo_data(tmp_path, spec)
    assert demo_path(tmp_path, spec, "objects") == str(demo.objects_dir)
    assert demo_path(tmp_path, spec, "val") == str(demo.val_dir)
    images, labels, _ = demo_object_images(spec)
    for language in ("en", "zh"):
        data = load_classification_set(ClassificationSetSpec(
            name="objects", format="shards", path=str(demo.objects_dir),
            classnames=str(demo.objects_dir / f"classnames_{language}.txt"),
            templates=str(demo.objects_dir / f"templates_{language}.txt")), image_size=32)
        assert data.labels.tolist() == labels and data.classnames == object_class_names(language)
        assert data.templates == list(OBJECT_TEMPLATES[language])
    with pytest.raises(ValueError, match="unknown demo data part 'test'"):
        demo_path(tmp_path, spec, "test")


@pytest.mark.slow
def test_eval_only_classifies_alone_and_never_generates_the_demo(tmp_path):
    """mode=eval runs classification sets without any retrieval set; pointed at demo data that
    was never generated it stops naming the folder, and generates nothing."""
    run, cache = tmp_path / "run", tmp_path / "cache"
    common = ["data.demo.n_train=32", "data.demo.n_val=20", "data.demo.samples_per_shard=16", "data.num_workers=0"]
    train = [sys.executable, "launch/train.py", "trainer.max_steps=2", "data.batch_size=8", "eval=none",
             f"hydra.run.dir={run}", f"data.demo.cache_dir={cache}", *common]
    proc = subprocess.run(train, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "eval"
    evaluate = [sys.executable, "launch/train.py", "mode=eval", f"ckpt={run}", "eval=demo", "eval.datasets=[]",
                f"hydra.run.dir={out}", *common]
    proc = subprocess.run([*evaluate, f"data.demo.cache_dir={cache}"], cwd=REPO, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = json.loads((out / "eval_results.json").read_text(encoding="utf-8"))["records"]
    assert [(r["dataset"], r["protocol"], r["n_images"]) for r in records] == [
        ("demo_objects_en", "zeroshot", 20), ("demo_objects_zh", "zeroshot", 20)]
    empty = tmp_path / "never"
    proc = subprocess.run([*evaluate, f"data.demo.cache_dir={empty}"], cwd=REPO, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode != 0
    assert f"{empty}/demo-v1-" in proc.stderr and "/objects" in proc.stderr
    assert not empty.exists()
