"""The demo's zero-shot classification set: every held-out (val) scene's leftmost object drawn alone,
labelled with its (colour, shape) class, and written as ordinary class shards with class names
and prompt templates in English and Chinese."""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import numpy as np

from .scenes import COLOURS, COLOURS_ZH, SHAPES, SHAPES_ZH, encode_jpeg, render_scene, val_scenes
from .spec import DemoDataSpec

OBJECTS_DIR = "objects"
OBJECT_CLASSES: tuple[tuple[str, str], ...] = tuple((c, h) for c in COLOURS for h in SHAPES)
"""The 24 classes of the demo classification set: (colour, shape), the size left open."""

_CLASSIFICATION_CODE = 2  # RNG stream of the classification images (train 0, val 1, tags 3, mismatch 4)


#: Zero-shot prompts in the captions' styles, the object's size left open.
OBJECT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "en": ("a large {}", "a small {}", "a picture of a large {}", "a picture of a small {}", "one large {}",
           "one small {}"),
    "zh": ("一个大的{}", "一个小的{}", "黑色背景上的一个大的{}", "黑色背景上的一个小的{}"),
}


def object_class_names(language: str = "en") -> list[str]:
    """The names of :data:`OBJECT_CLASSES`: ``"red circle"`` (en) or ``"红色圆形"`` (zh)."""
    if language == "en":
        return [f"{c} {h}" for c, h in OBJECT_CLASSES]
    if language == "zh":
        return [f"{COLOURS_ZH[c]}{SHAPES_ZH[h]}" for c, h in OBJECT_CLASSES]
    raise ValueError(f"language must be 'en' or 'zh', got {language!r}")


def demo_object_images(spec: DemoDataSpec = DemoDataSpec(), language: str = "en") -> tuple[list[bytes], list[int], list[str]]:
    """The demo classification set: for every held-out (val) scene, its leftmost object drawn alone
    (deterministic, JPEG bytes); the label is the object's (colour, shape) class. Returns
    ``(images, labels, class names in language)``."""
    names = object_class_names(language)
    images, labels = [], []
    for i, scene in enumerate(val_scenes(spec.n_val, spec.seed)):
        obj = scene[0]
        rng = np.random.default_rng([spec.seed, _CLASSIFICATION_CODE, i])
        images.append(encode_jpeg(render_scene((obj,), rng, spec.image_size)))
        labels.append(OBJECT_CLASSES.index((obj.colour, obj.shape)))
    return images, labels, names


def _write_objects(out_dir: Path, spec: DemoDataSpec) -> None:
    """The classification set as ordinary class shards: one tar of ``KEY.jpg`` + ``KEY.cls`` (the
    class index), in held-out scene order, and the class names and prompt templates in English and
    Chinese (``classnames_{en,zh}.txt``, ``templates_{en,zh}.txt``)."""
    from webdataset import TarWriter

    images, labels, _ = demo_object_images(spec)
    out_dir.mkdir(parents=True)
    with TarWriter(str(out_dir / "demo-objects-000000.tar"), encoder=False) as tar:
        for i, (image, label) in enumerate(zip(images, labels)):
            tar.write({"__key__": f"object-{i:05d}", "jpg": image, "cls": str(label).encode("ascii")})
    for language in ("en", "zh"):
        (out_dir / f"classnames_{language}.txt").write_text("\n".join(object_class_names(language)) + "\n",
                                                            encoding="utf-8")
        (out_dir / f"templates_{language}.txt").write_text("\n".join(OBJECT_TEMPLATES[language]) + "\n",
                                                           encoding="utf-8")


def _ensure_objects(folder: Path, spec: DemoDataSpec) -> None:
    """Add the classification set to a dataset generated before it was part of one (atomically)."""
    if (folder / OBJECTS_DIR).is_dir():
        return
    tmp = folder / f".{OBJECTS_DIR}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _write_objects(tmp, spec)
        try:
            os.rename(tmp, folder / OBJECTS_DIR)
        except OSError:
            if not (folder / OBJECTS_DIR).is_dir():  # not a concurrent writer winning the race
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
