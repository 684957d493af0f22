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

The modules, one role each:

* :mod:`~ernievil2.data.demo.scenes`: the object vocabulary, :class:`SceneObject` / ``Scene``,
  rendering (:func:`render_scene`, :func:`encode_jpeg`) and the splits (:func:`val_scenes`,
  :func:`train_scene`);
* :mod:`~ernievil2.data.demo.text`: captions (:func:`all_captions`, :func:`scene_captions`) and
  object tags (:class:`TagNoise`, :func:`object_tags`);
* :mod:`~ernievil2.data.demo.spec`: :class:`DemoDataSpec`, whose :meth:`~DemoDataSpec.digest`
  names the cache folder;
* :mod:`~ernievil2.data.demo.classification`: the zero-shot classification set
  (:data:`OBJECT_CLASSES`, :data:`OBJECT_TEMPLATES`, :func:`demo_object_images`) and its class shards;
* :mod:`~ernievil2.data.demo.dataset`: :func:`make_sample`, the cached generation
  (:func:`ensure_demo_data`, :class:`DemoData`) and the paths of a spec's folder
  (:func:`demo_folder`, :func:`demo_path`).
"""
from __future__ import annotations

from .classification import OBJECT_CLASSES, OBJECT_TEMPLATES, OBJECTS_DIR, demo_object_images, object_class_names
from .dataset import DEMO_PARTS, DemoData, demo_folder, demo_path, ensure_demo_data, make_sample, mismatched_indices
from .scenes import (
    COLOUR_RGB,
    COLOURS,
    COLOURS_ZH,
    OBJECT_KINDS,
    SHAPES,
    SHAPES_ZH,
    SIZES,
    SIZES_ZH,
    Scene,
    SceneObject,
    describe,
    encode_jpeg,
    layout,
    object_radius,
    render_scene,
    scene_from_meta,
    train_scene,
    val_scenes,
)
from .spec import DemoDataSpec
from .text import EN_TEMPLATES, TAG_MODES, ZH_TEMPLATES, TagNoise, all_captions, object_tags, scene_captions

__all__ = [
    "SIZES", "COLOURS", "SHAPES", "SIZES_ZH", "COLOURS_ZH", "SHAPES_ZH", "COLOUR_RGB", "SceneObject", "Scene",
    "OBJECT_KINDS", "describe", "scene_from_meta", "object_radius", "layout", "render_scene", "encode_jpeg",
    "val_scenes", "train_scene", "EN_TEMPLATES", "ZH_TEMPLATES", "all_captions", "scene_captions", "TAG_MODES",
    "TagNoise", "object_tags", "DemoDataSpec", "OBJECT_CLASSES", "OBJECT_TEMPLATES", "OBJECTS_DIR",
    "object_class_names", "demo_object_images", "DEMO_PARTS", "DemoData", "make_sample", "mismatched_indices",
    "demo_folder", "demo_path", "ensure_demo_data",
]
