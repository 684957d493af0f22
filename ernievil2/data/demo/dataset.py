"""Generating the demo data into cached WebDataset shards: one sample per scene, the train and val
splits (tag noise and mismatched captions in train only), the folder of a spec and its parts, and
:func:`ensure_demo_data`, which generates a spec's folder once (atomically) and loads it."""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence, Union

import numpy as np

from ..sample import RawSample
from ..shard_writer import ShardWriter
from .classification import OBJECTS_DIR, _ensure_objects, _write_objects
from .scenes import _SPLIT_CODE, Scene, describe, encode_jpeg, render_scene, train_scene, val_scenes
from .spec import DemoDataSpec
from .text import TagNoise, object_tags, scene_captions

logger = logging.getLogger(__name__)


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


def demo_folder(root: Union[str, Path], spec: DemoDataSpec) -> Path:
    """Where :func:`ensure_demo_data` keeps the dataset of ``spec`` under ``root`` (``~`` expanded)."""
    return Path(os.path.expanduser(str(root))) / f"demo-v{spec.version}-{spec.digest()}"


def demo_path(root: Union[str, Path], spec: DemoDataSpec, part: str) -> str:
    """The folder of one part (:data:`DEMO_PARTS`) of the demo dataset of ``spec`` under ``root``:
    what ``conf/eval/demo.yaml`` points its sets at (``${demo_data:val}``). Nothing is generated."""
    if part not in DEMO_PARTS:
        raise ValueError(f"unknown demo data part {part!r}; choose from {list(DEMO_PARTS)}")
    return str(demo_folder(root, spec) / part)


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
