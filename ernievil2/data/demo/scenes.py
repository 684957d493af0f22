"""The demo's scenes: the object vocabulary (sizes, colours, shapes; English and Chinese names), a
scene as its objects in left-to-right order, rendering a scene to an image, and the train / val
splits of descriptions (every val description held out of train)."""
from __future__ import annotations

from typing import NamedTuple

import cv2
import numpy as np

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


def describe(scene: Scene) -> str:
    """Canonical one-line description, e.g. ``"large red circle | small blue square"``."""
    return " | ".join(o.tag for o in scene)


def scene_from_meta(meta: dict) -> Scene:
    """The Scene stored in a demo sample's ``meta["scene"]``."""
    return tuple(SceneObject(*o) for o in meta["scene"])


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
