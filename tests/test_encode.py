"""One encode path: retrieval evaluation, zero-shot classification, inference (``launch/infer.py``)
and the photo search give the same vectors for the same images and texts."""
from __future__ import annotations

import base64
from pathlib import Path

import cv2
import numpy as np
import paddle
import pytest
from hydra import compose, initialize_config_dir

from ernievil2.data.formats import ImageSource, Item
from ernievil2.encode import embed_crops, embed_image_files, embed_pixels, embed_texts, embed_token_ids, trim_padding
from ernievil2.evaluators.retrieval import embed, items_to_set
from ernievil2.evaluators.zeroshot import ClassificationSetSpec, class_embeddings, load_classification_set
from ernievil2.inference import build_inference_model, infer_main, sidecar_paths
from ernievil2.search import Encoder
from ernievil2.tokenizer import WordPieceTokenizer
from ernievil2.train.infer_config import register_infer_schema

REPO = Path(__file__).resolve().parents[1]
TEXTS = ["a red circle", "两只猫在沙发上睡觉", "a boat on the lake", "城市夜景"]
SIZE = 64


def infer_cfg(**overrides):
    register_infer_schema()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("infer", overrides=[f"{k}={v}" for k, v in overrides.items()])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model, its tokenizer, and four JPEG files in one class folder each."""
    root = tmp_path_factory.mktemp("encode")
    vocab = WordPieceTokenizer.build_vocab(TEXTS * 3, root / "vocab.txt", vocab_size=200)
    paddle.set_device("cpu")
    model, tokenizer = build_inference_model(infer_cfg(model="tiny", vocab_file=vocab, seed=0, test_file="-",
                                                       output_file="-"))
    files = []
    for k, text in enumerate(TEXTS):
        img = np.random.default_rng(k).integers(0, 256, (70 + 7 * k, 90 - 5 * k, 3), dtype=np.uint8)
        folder = root / "classes" / f"c{k}"
        folder.mkdir(parents=True)
        path = folder / "image.jpg"
        assert cv2.imwrite(str(path), img)
        files.append(path)
    return root, vocab, model, tokenizer, files


def test_every_path_gives_the_same_vectors(setup):
    root, vocab, model, tokenizer, files = setup
    want_img = embed_image_files(model, files)
    want_txt = embed_texts(model, tokenizer, TEXTS, 48)
    assert want_img.shape == want_txt.shape == (4, model.cfg.text.width)
    np.testing.assert_allclose(np.linalg.norm(want_img, axis=1), 1.0, atol=1e-5)

    # retrieval evaluation: items read by the format readers, prepared, embedded (held as uint8 crops)
    items = [Item(f"k{k}", [t], ImageSource(data=f.read_bytes()), str(f)) for k, (f, t) in enumerate(zip(files, TEXTS))]
    img, txt = embed(model, items_to_set(items, SIZE, tokenizer, 48), batch_size=3)
    np.testing.assert_allclose(img, want_img, atol=1e-6)
    np.testing.assert_allclose(txt, want_txt, atol=1e-6)

    # zero-shot: the class folders' images, and class names with the one template "{}"
    spec = ClassificationSetSpec(name="four", format="imagefolder", path=str(root / "classes"))
    data = load_classification_set(spec, SIZE)
    np.testing.assert_allclose(embed_crops(model, data.images), want_img, atol=1e-6)
    np.testing.assert_allclose(class_embeddings(model, tokenizer, TEXTS, ["{}"], 48), want_txt, atol=1e-6)

    # inference: an upstream-format TSV (text, image id, base64 image) -> embeddings file
    tsv = root / "pairs.tsv"
    tsv.write_text("".join(f"{t}\ti{k}\t{base64.b64encode(f.read_bytes()).decode()}\n"
                           for k, (f, t) in enumerate(zip(files, TEXTS))), encoding="utf-8")
    out = root / "emb.out"
    infer_main(infer_cfg(model="tiny", test_file=tsv, output_file=out, vocab_file=vocab, seed=0, batch_size=3,
                         write_npy="true", device="cpu"))
    text_npy, image_npy = np.load(sidecar_paths(out)["text_npy"]), np.load(sidecar_paths(out)["image_npy"])
    np.testing.assert_allclose(image_npy, want_img, atol=1e-6)
    np.testing.assert_allclose(text_npy, want_txt, atol=1e-6)

    # search: the encoder of the photo index and its queries
    encoder = Encoder.from_model(model, tokenizer)
    np.testing.assert_allclose(encoder.encode_image_files(files), want_img, atol=1e-6)
    np.testing.assert_allclose(encoder.encode_texts(TEXTS), want_txt, atol=1e-6)


def test_batching_and_padding_do_not_change_a_vector(setup):
    _, _, model, tokenizer, files = setup
    ids = tokenizer(TEXTS, 48)
    assert trim_padding(ids, model.cfg.text.pad_id).shape[1] < ids.shape[1]
    np.testing.assert_allclose(embed_token_ids(model, ids, batch_size=1), embed_token_ids(model, ids, batch_size=4),
                               atol=1e-6)
    from ernievil2.data import preprocess

    pixels = np.stack([preprocess.preprocess(f.read_bytes(), size=SIZE) for f in files])
    np.testing.assert_allclose(embed_pixels(model, pixels, batch_size=1), embed_pixels(model, pixels), atol=1e-6)
    # the model's mode is restored after embedding
    model.train()
    embed_pixels(model, pixels[:1])
    assert model.training
    model.eval()
    assert embed_texts(model, tokenizer, [], 48).shape == (0, model.cfg.text.width)
