"""The demo's texts: captions of a scene in English and Chinese (paraphrase templates) and its
object tags, exact or as a detector gives them (:class:`TagNoise`)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .scenes import COLOURS, COLOURS_ZH, SHAPES, SHAPES_ZH, SIZES_ZH, Scene, SceneObject

# --------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------


def _en_a(o: SceneObject) -> str:
    return f"a {o.tag}"  # sizes come first and are consonant-initial: "a" is always right


def _zh_full(o: SceneObject) -> str:
    return f"一个{SIZES_ZH[o.size]}的{COLOURS_ZH[o.colour]}{SHAPES_ZH[o.shape]}"


def _zh_short(o: SceneObject) -> str:
    return f"{SIZES_ZH[o.size]}{COLOURS_ZH[o.colour][0]}{SHAPES_ZH[o.shape]}"


# Templates: {a0} "a large red circle", {t0} "large red circle"; zh {A0} "一个大的红色圆形", {c0} "大红圆形".
EN_TEMPLATES: dict[int, tuple[str, ...]] = {
    1: (
        "{a0}",
        "a single {t0} on a dark background",
        "one {t0}",
        "a picture of {a0}",
        "{a0} on a black background",
    ),
    2: (
        "{a0} to the left of {a1}",
        "{a1} to the right of {a0}",
        "from left to right: {t0}, {t1}",
        "there is {a0} and, on its right, {a1}",
        "{a0} on the left and {a1} on the right",
    ),
    3: (
        "{a0}, {a1} and {a2} from left to right",
        "from left to right: {t0}, {t1}, {t2}",
        "{a1} between {a0} on the left and {a2} on the right",
        "{a0} on the left, {a1} in the middle and {a2} on the right",
        "{a2} on the right, {a1} in the middle and {a0} on the left",
    ),
}
ZH_TEMPLATES: dict[int, tuple[str, ...]] = {
    1: (
        "{A0}",
        "黑色背景上的{A0}",
        "图中只有{A0}",
        "一张{c0}的图片",
    ),
    2: (
        "{A0}在{A1}的左边",
        "{A1}在{A0}的右边",
        "从左到右：{c0}、{c1}",
        "左边是{A0}，右边是{A1}",
        "{A0}的右边有{A1}",
    ),
    3: (
        "从左到右依次是{A0}、{A1}和{A2}",
        "从左到右：{c0}、{c1}、{c2}",
        "{A1}在{A0}和{A2}之间，{A0}在最左边",
        "左边是{A0}，中间是{A1}，右边是{A2}",
    ),
}


def _fields(scene: Scene) -> dict[str, str]:
    out: dict[str, str] = {}
    for i, o in enumerate(scene):
        out[f"a{i}"] = _en_a(o)
        out[f"t{i}"] = o.tag
        out[f"A{i}"] = _zh_full(o)
        out[f"c{i}"] = _zh_short(o)
    return out


def all_captions(scene: Scene, lang: str = "en") -> list[str]:
    """Every paraphrase of ``scene`` in ``lang`` (``"en"`` or ``"zh"``), one per template."""
    if lang not in ("en", "zh"):
        raise ValueError(f"lang must be 'en' or 'zh', got {lang!r}")
    if not 1 <= len(scene) <= 3:
        raise ValueError(f"a demo scene has 1-3 objects, got {len(scene)}")
    templates = (EN_TEMPLATES if lang == "en" else ZH_TEMPLATES)[len(scene)]
    fields = _fields(scene)
    return [t.format(**fields) for t in templates]


def scene_captions(scene: Scene, rng: np.random.Generator, n_en: int = 2, n_zh: int = 2) -> list[str]:
    """``n_en`` English then ``n_zh`` Chinese captions of ``scene`` from distinct random templates."""
    out: list[str] = []
    for lang, n in (("en", n_en), ("zh", n_zh)):
        options = all_captions(scene, lang)
        if n > len(options):
            raise ValueError(f"asked for {n} {lang} captions, only {len(options)} templates")
        out.extend(options[i] for i in rng.choice(len(options), size=n, replace=False))
    return out



# --------------------------------------------------------------------------------------------
# Object tags
# --------------------------------------------------------------------------------------------


TAG_MODES: tuple[str, ...] = ("exact", "category", "detector")


@dataclass(frozen=True)
class TagNoise:
    """How a sample's object tags are made from its scene (see :mod:`ernievil2.data.demo`)."""

    mode: str = "exact"
    recall: float = 1.0
    false_tags: float = 0.0
    attributes: float = 0.0
    attribute_error: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in TAG_MODES:
            raise ValueError(f"data.demo.tags must be one of {list(TAG_MODES)}, got {self.mode!r}")
        for name, key in (("recall", "tag_recall"), ("false_tags", "false_tags"), ("attributes", "tag_attributes"),
                          ("attribute_error", "attribute_error")):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"data.demo.{key} must be in [0, 1], got {value}")


def _tag(shape: str, colour: str | None, zh: bool) -> str:
    if zh:
        return f"{COLOURS_ZH[colour] if colour else ''}{SHAPES_ZH[shape]}"
    return f"{colour} {shape}" if colour else shape


def _detector_colour(true_colour: str | None, noise: TagNoise, rng: np.random.Generator) -> str | None:
    """The colour attribute a detector gives an object (None: no attribute)."""
    if rng.random() >= noise.attributes:
        return None
    if true_colour is None or rng.random() < noise.attribute_error:
        return str(rng.choice([c for c in COLOURS if c != true_colour]))
    return true_colour


def object_tags(scene: Scene, noise: TagNoise, rng: np.random.Generator) -> tuple[list[str], list[str], list[int], list[str]]:
    """``(tags, tags_zh, detected object indices, false tags)`` of ``scene`` under ``noise``.

    ``exact``: every object's full tag. ``category``: every object's shape. ``detector``: each object
    kept with probability ``recall`` (shape, optionally a colour attribute), then with probability
    ``false_tags`` one shape absent from the scene; the tags in random order, as a detector ranks by
    confidence.
    """
    if noise.mode == "exact":
        return [o.tag for o in scene], [o.tag_zh for o in scene], list(range(len(scene))), []
    if noise.mode == "category":
        return [o.shape for o in scene], [SHAPES_ZH[o.shape] for o in scene], list(range(len(scene))), []
    found = [i for i in range(len(scene)) if rng.random() < noise.recall]
    tags = [(scene[i].shape, _detector_colour(scene[i].colour, noise, rng)) for i in found]
    false: list[tuple[str, str | None]] = []
    if rng.random() < noise.false_tags:
        absent = [h for h in SHAPES if h not in {o.shape for o in scene}]
        false.append((str(rng.choice(absent)), _detector_colour(None, noise, rng)))
    tags += false
    order = rng.permutation(len(tags))
    tags = [tags[i] for i in order]
    return ([_tag(h, c, False) for h, c in tags], [_tag(h, c, True) for h, c in tags], found,
            [_tag(h, c, False) for h, c in false])
