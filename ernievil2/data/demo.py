"""The embedded demo dataset: procedural scenes of coloured shapes with English and Chinese captions.

Every scene is 1-3 objects on a dark, slightly noisy background. An object is a (size, colour,
shape) triple from 2 x 6 x 4 = 48 kinds; objects sit left to right without horizontal overlap and
that order is the relation every caption describes. A scene's *description* is the canonical tuple
of its objects in left-to-right order.

Splits: ``train`` (``n_train`` images) and ``val`` (``n_val`` images). Every val description is
unique within val and never appears in train, so val retrieval measures generalisation to unseen
compositions (mostly 2-3 object scenes; at most 6 one-object kinds are held out).

Each sample stores ``n_en`` + ``n_zh`` (2 + 2) distinct paraphrases in ``captions`` (English first),
``lang = "mul"`` with ``meta["languages"]`` giving the language of each caption, ``objects`` (the
object tags, English) and ``meta`` fields ``split``, ``scene`` (``[[size, colour, shape], ...]``),
``description`` and ``objects_zh``.

Training data can be made to look like web data (:class:`DemoDataSpec`; the val split always stays
clean, with exact tags):

* ``tags``: ``exact`` gives one tag per object naming its size, colour and shape ("large red
  circle"), complete and true; ``category`` the shape names only ("circle"), as an object detector
  gives categories; ``detector`` category names as a detector finds them: each object found with
  probability ``tag_recall``, and with probability ``false_tags`` a sample gets one tag of a shape
  that is not in the picture. ``tag_attributes`` > 0 prefixes that share of the detector's tags with
  a colour ("red circle"), as attribute detectors do, wrong with probability ``attribute_error``.
  ``meta["detected"]`` lists the indices of the scene objects that were found, ``meta["false_tags"]``
  the false ones.
* ``mismatch``: exactly ``round(mismatch · n_train)`` training samples carry the captions of another
  training scene (``meta["caption_scene"]``); their image and tags stay their own.

Images and true captions do not depend on these knobs: each knob draws from a random stream of its own.

Generation is deterministic (per-sample RNG seeded by ``(seed, split, index)``) and cached under
``root/demo-v{version}-{hash of the spec}/`` with a ``manifest.json`` written last; the whole
folder is generated in a temporary sibling and renamed into place. Bump ``DemoDataSpec.version``
whenever the generator changes its output.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple, Sequence, Union

import cv2
import numpy as np

from .sample import RawSample
from .shard_writer import ShardWriter

logger = logging.getLogger(__name__)

SIZES: tuple[str, ...] = ("small", "large")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "white")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")

SIZES_ZH = {"small": "小", "large": "大"}
COLOURS_ZH = {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色", "purple": "紫色", "white": "白色"}
SHAPES_ZH = {"circle": "圆形", "square": "正方形", "triangle": "三角形", "star": "星形"}

COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (35, 200, 50),
    "blue": (45, 80, 240),
    "yellow": (235, 220, 35),
    "purple": (190, 50, 225),
    "white": (235, 235, 235),
}
"""Nominal RGB of each colour (each rendered object jitters it by at most ``_COLOUR_JITTER``)."""

_COLOUR_JITTER = 12
_LARGE_R = 0.14  # half-extent of a large object, as a fraction of the image size
_SMALL_R = 0.08
_MARGIN = 0.02
_GAP = 0.03  # minimum horizontal gap between neighbouring objects
_SPLIT_CODE = {"train": 0, "val": 1}
_TRAIN_N_OBJECTS_P = (0.2, 0.4, 0.4)
_VAL_MAX_SINGLE = 6


class SceneObject(NamedTuple):
    """One object of a scene: size, colour and shape names (English)."""

    size: str
    colour: str
    shape: str

    @property
    def tag(self) -> str:
        """English tag, e.g. ``"large red circle"``."""
        return f"{self.size} {self.colour} {self.shape}"

    @property
    def tag_zh(self) -> str:
        """Chinese tag, e.g. ``"大红色圆形"``."""
        return f"{SIZES_ZH[self.size]}{COLOURS_ZH[self.colour]}{SHAPES_ZH[self.shape]}"


Scene = tuple[SceneObject, ...]
"""A scene description: its objects in left-to-right order."""

OBJECT_KINDS: tuple[SceneObject, ...] = tuple(
    SceneObject(s, c, h) for s in SIZES for c in COLOURS for h in SHAPES
)
"""All 48 object kinds, in a fixed order."""


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


def describe(scene: Scene) -> str:
    """Canonical one-line description, e.g. ``"large red circle | small blue square"``."""
    return " | ".join(o.tag for o in scene)


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _shape_points(shape: str, cx: float, cy: float, r: float) -> np.ndarray:
    if shape == "square":
        h = 0.85 * r
        pts = [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    elif shape == "triangle":
        # equilateral, pointing up, spanning the full [-r, r] box vertically
        pts = [(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)]
    elif shape == "star":
        pts = []
        for k in range(10):
            ang = -np.pi / 2 + k * np.pi / 5
            rad = r if k % 2 == 0 else r * 0.45
            pts.append((cx + rad * np.cos(ang), cy + 0.05 * r + rad * np.sin(ang)))
    else:
        raise ValueError(f"no polygon for shape {shape!r}")
    return np.round(np.asarray(pts) * 16).astype(np.int32)


def _draw(img: np.ndarray, o: SceneObject, cx: float, cy: float, r: float, colour: tuple[int, int, int]) -> None:
    if o.shape == "circle":
        cv2.circle(img, (int(round(cx * 16)), int(round(cy * 16))), int(round(r * 16)), colour, -1, cv2.LINE_AA, 4)
    else:
        cv2.fillPoly(img, [_shape_points(o.shape, cx, cy, r)], colour, cv2.LINE_AA, 4)


def object_radius(size: str, image_size: int) -> float:
    """Half-extent in pixels of an object of ``size`` in an ``image_size`` image."""
    return (_LARGE_R if size == "large" else _SMALL_R) * image_size


def layout(scene: Scene, rng: np.random.Generator, image_size: int) -> list[tuple[float, float, float]]:
    """Random ``(cx, cy, r)`` per object: left to right, horizontally disjoint with a gap, inside the image."""
    radii = [object_radius(o.size, image_size) for o in scene]
    margin, gap = _MARGIN * image_size, _GAP * image_size
    free = image_size - 2 * margin - 2 * sum(radii) - gap * (len(scene) - 1)
    if free < 0:
        raise ValueError(f"{len(scene)} objects do not fit side by side in {image_size} px")
    spaces = rng.dirichlet(np.ones(len(scene) + 1)) * free
    out = []
    x = margin
    for i, r in enumerate(radii):
        x += spaces[i] + (gap if i else 0.0)
        cy = rng.uniform(margin + r, image_size - margin - r)
        out.append((x + r, cy, r))
        x += 2 * r
    return out


def render_scene(scene: Scene, rng: np.random.Generator, image_size: int = 64) -> np.ndarray:
    """Render ``scene`` as an ``(image_size, image_size, 3)`` uint8 RGB image (anti-aliased)."""
    base = rng.uniform(0, 25)
    img = base + rng.normal(0.0, 3.0, size=(image_size, image_size, 1))
    img = np.clip(np.repeat(img, 3, axis=2), 0, 255).astype(np.uint8)
    for o, (cx, cy, r) in zip(scene, layout(scene, rng, image_size)):
        nominal = np.asarray(COLOUR_RGB[o.colour])
        colour = np.clip(nominal + rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1, size=3), 0, 255)
        _draw(img, o, cx, cy, r, tuple(int(c) for c in colour))
    return img


def encode_jpeg(rgb: np.ndarray, quality: int = 95) -> bytes:
    """JPEG bytes of an RGB uint8 image."""
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------


def _random_scene(rng: np.random.Generator, n_objects: int) -> Scene:
    idx = rng.choice(len(OBJECT_KINDS), size=n_objects, replace=False)
    return tuple(OBJECT_KINDS[i] for i in idx)


def val_scenes(n_val: int, seed: int) -> list[Scene]:
    """The ``n_val`` distinct held-out descriptions: at most 6 one-object ones, the rest half 2, half 3 objects."""
    rng = np.random.default_rng([seed, _SPLIT_CODE["val"], 10**6])
    n1 = min(_VAL_MAX_SINGLE, n_val // 50)
    n_pairs_max = len(OBJECT_KINDS) * (len(OBJECT_KINDS) - 1) // 4  # hold out at most a quarter of pairs
    n2 = min((n_val - n1) // 2, n_pairs_max)
    n3 = n_val - n1 - n2
    chosen: list[Scene] = []
    seen: set[Scene] = set()
    for n_obj, count in ((1, n1), (2, n2), (3, n3)):
        got = 0
        while got < count:
            scene = _random_scene(rng, n_obj)
            if scene not in seen:
                seen.add(scene)
                chosen.append(scene)
                got += 1
    order = rng.permutation(len(chosen))
    return [chosen[i] for i in order]


def train_scene(rng: np.random.Generator, held_out: set[Scene]) -> Scene:
    """A random training description (1-3 objects, 20/40/40 %) that is not held out for val."""
    while True:
        n_obj = int(rng.choice(3, p=_TRAIN_N_OBJECTS_P)) + 1
        scene = _random_scene(rng, n_obj)
        if scene not in held_out:
            return scene


TAG_MODES: tuple[str, ...] = ("exact", "category", "detector")


@dataclass(frozen=True)
class TagNoise:
    """How a sample's object tags are made from its scene (see the module docstring)."""

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


def make_sample(key: str, scene: Scene, rng: np.random.Generator, image_size: int, split: str,
                noise: TagNoise = TagNoise(), tag_rng: np.random.Generator | None = None,
                caption_scene: Scene | None = None, caption_rng: np.random.Generator | None = None) -> RawSample:
    """Render and caption one scene into a RawSample (2 en + 2 zh captions, English object tags).

    ``noise`` and ``tag_rng`` make the tags; ``caption_scene`` (with ``caption_rng``) captions the
    sample with another scene's captions. ``rng`` draws the image and the true captions only, so
    neither knob changes them.
    """
    captions = scene_captions(scene, rng)
    image = encode_jpeg(render_scene(scene, rng, image_size))
    tags, tags_zh, found, false = object_tags(scene, noise, tag_rng if tag_rng is not None else rng)
    meta: dict = {
        "split": split,
        "languages": ["en", "en", "zh", "zh"],
        "scene": [list(o) for o in scene],
        "description": describe(scene),
        "objects_zh": tags_zh,
    }
    if noise.mode == "detector":
        meta.update(detected=found, false_tags=false)
    if caption_scene is not None:
        captions = scene_captions(caption_scene, caption_rng if caption_rng is not None else rng)
        meta["caption_scene"] = [list(o) for o in caption_scene]
    return RawSample(key=key, image=image, captions=captions, objects=tags, lang="mul", meta=meta)


def scene_from_meta(meta: dict) -> Scene:
    """The Scene stored in a demo sample's ``meta["scene"]``."""
    return tuple(SceneObject(*o) for o in meta["scene"])


# --------------------------------------------------------------------------------------------
# Cached generation
# --------------------------------------------------------------------------------------------


@dataclass
class DemoDataSpec:
    """Everything that determines the demo data's bytes (its hash names the cache folder)."""

    n_train: int = 20000
    n_val: int = 500
    image_size: int = 64
    seed: int = 0
    samples_per_shard: int = 2000
    # What the training split's object tags and captions look like (module docstring): tags
    # exact | category | detector, the detector's recall and false-tag rate, the share of its tags
    # with a colour attribute and how often that colour is wrong; the share of training samples
    # captioned with another scene's captions.
    tags: str = "exact"
    tag_recall: float = 0.6
    false_tags: float = 0.3
    tag_attributes: float = 0.0
    attribute_error: float = 0.2
    mismatch: float = 0.0
    version: int = 1

    def __post_init__(self) -> None:
        self.tag_noise()
        if not 0.0 <= self.mismatch <= 1.0:
            raise ValueError(f"data.demo.mismatch must be in [0, 1], got {self.mismatch}")

    def tag_noise(self) -> TagNoise:
        """The training split's :class:`TagNoise`."""
        return TagNoise(self.tags, self.tag_recall, self.false_tags, self.tag_attributes, self.attribute_error)

    def n_mismatched(self) -> int:
        """How many training samples carry another scene's captions."""
        return int(round(self.mismatch * self.n_train))

    def digest(self) -> str:
        """Short stable hash of the fields that shape the data: a knob left at its clean value
        (exact tags, no mismatch) is left out, so the clean demo keeps its hash."""
        fields = asdict(self)
        if self.tags != "detector":
            for name in ("tag_recall", "false_tags", "tag_attributes", "attribute_error"):
                fields.pop(name)
        if self.tags == "exact":
            fields.pop("tags")
        if self.mismatch == 0.0:
            fields.pop("mismatch")
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class DemoData:
    """Paths of a generated demo dataset."""

    root: Path
    train_dir: Path
    val_dir: Path
    train_shards: list[str]
    val_shards: list[str]
    spec: DemoDataSpec = field(default_factory=DemoDataSpec)

    @property
    def objects_dir(self) -> Path:
        """The zero-shot classification set: class shards (``KEY.jpg`` + ``KEY.cls``) and
        ``classnames_{en,zh}.txt`` (:func:`demo_object_images`)."""
        return self.root / OBJECTS_DIR


#: The parts of a demo folder an evaluation config may point at (:func:`demo_path`).
DEMO_PARTS: tuple[str, ...] = ("train", "val", "objects")
OBJECTS_DIR = "objects"


def demo_folder(root: Union[str, Path], spec: DemoDataSpec) -> Path:
    """Where :func:`ensure_demo_data` keeps the dataset of ``spec`` under ``root`` (``~`` expanded)."""
    return Path(os.path.expanduser(str(root))) / f"demo-v{spec.version}-{spec.digest()}"


def demo_path(root: Union[str, Path], spec: DemoDataSpec, part: str) -> str:
    """The folder of one part (:data:`DEMO_PARTS`) of the demo dataset of ``spec`` under ``root``:
    what ``conf/eval/demo.yaml`` points its sets at (``${demo_data:val}``). Nothing is generated."""
    if part not in DEMO_PARTS:
        raise ValueError(f"unknown demo data part {part!r}; choose from {list(DEMO_PARTS)}")
    return str(demo_folder(root, spec) / part)


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


_TAG_CODE = 3  # RNG streams of the detector's tags and of the mismatched captions (train 0, val 1, classification 2)
_MISMATCH_CODE = 4


def mismatched_indices(spec: DemoDataSpec) -> list[int]:
    """The training indices that carry another scene's captions (exactly ``spec.n_mismatched()``)."""
    rng = np.random.default_rng([spec.seed, _MISMATCH_CODE])
    return sorted(int(i) for i in rng.permutation(spec.n_train)[: spec.n_mismatched()])


def _train_scene_at(i: int, spec: DemoDataSpec, held_out: set[Scene]) -> Scene:
    return train_scene(np.random.default_rng([spec.seed, _SPLIT_CODE["train"], i]), held_out)


def _caption_donor(i: int, scene: Scene, spec: DemoDataSpec, held_out: set[Scene]) -> tuple[Scene, np.random.Generator]:
    """Another training scene (a different description) whose captions sample ``i`` carries."""
    rng = np.random.default_rng([spec.seed, _MISMATCH_CODE, i])
    while True:
        donor = _train_scene_at(int(rng.integers(spec.n_train)), spec, held_out)
        if donor != scene:
            return donor, rng


def _write_split(out_dir: Path, split: str, scenes_or_n: Union[Sequence[Scene], int], spec: DemoDataSpec, held_out: set[Scene]) -> list[str]:
    n = scenes_or_n if isinstance(scenes_or_n, int) else len(scenes_or_n)
    train = split == "train"
    noise = spec.tag_noise() if train else TagNoise()
    mismatched = set(mismatched_indices(spec)) if train else set()
    with ShardWriter(out_dir, prefix=f"demo-{split}", max_samples=spec.samples_per_shard) as writer:
        for i in range(n):
            rng = np.random.default_rng([spec.seed, _SPLIT_CODE[split], i])
            scene = train_scene(rng, held_out) if isinstance(scenes_or_n, int) else scenes_or_n[i]
            donor, donor_rng = _caption_donor(i, scene, spec, held_out) if i in mismatched else (None, None)
            tag_rng = np.random.default_rng([spec.seed, _TAG_CODE, _SPLIT_CODE[split], i])
            writer.write(make_sample(f"{split}-{i:07d}", scene, rng, spec.image_size, split, noise, tag_rng,
                                     donor, donor_rng))
    return [os.path.basename(p) for p in writer.shards]


def _load(folder: Path, spec: DemoDataSpec) -> DemoData:
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    return DemoData(
        root=folder,
        train_dir=folder / "train",
        val_dir=folder / "val",
        train_shards=[str(folder / "train" / s) for s in manifest["train"]["shards"]],
        val_shards=[str(folder / "val" / s) for s in manifest["val"]["shards"]],
        spec=spec,
    )


def ensure_demo_data(root: Union[str, Path], spec: DemoDataSpec = DemoDataSpec()) -> DemoData:
    """Return the demo dataset for ``spec`` under ``root``, generating it first if it is not cached.

    The dataset lives in ``root/demo-v{version}-{spec.digest()}/{train,val,objects}/`` (:func:`demo_path`;
    ``objects``: the zero-shot classification set as class shards) and is valid once its
    ``manifest.json`` exists; generation happens in a temporary sibling folder renamed into place,
    so concurrent callers and interrupted runs never see a partial dataset.
    """
    if spec.n_train < 1 or spec.n_val < 1:
        raise ValueError(f"n_train and n_val must be >= 1, got {spec.n_train}, {spec.n_val}")
    if spec.image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {spec.image_size}")
    final = demo_folder(root, spec)
    root = final.parent
    if (final / "manifest.json").exists():
        _ensure_objects(final, spec)
        return _load(final, spec)
    if final.exists():
        raise RuntimeError(f"{final} exists without manifest.json (not written by ensure_demo_data?); delete it")
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    start = time.perf_counter()
    try:
        held = val_scenes(spec.n_val, spec.seed)
        held_set = set(held)
        train = _write_split(tmp / "train", "train", spec.n_train, spec, held_set)
        val = _write_split(tmp / "val", "val", held, spec, held_set)
        _write_objects(tmp / OBJECTS_DIR, spec)
        manifest = {
            "generator": "ernievil2.data.demo",
            "spec": asdict(spec),
            "digest": spec.digest(),
            "train": {"n": spec.n_train, "shards": train},
            "val": {"n": spec.n_val, "shards": val},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "manifest.json").exists():  # not a concurrent writer winning the race
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("generated demo data %s in %.1f s", final, time.perf_counter() - start)
    return _load(final, spec)


# --------------------------------------------------------------------------------------------
# Zero-shot classification set
# --------------------------------------------------------------------------------------------

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
