"""Model weights in and out, in any of the released ERNIE-ViL 2.0 layouts and ours.

* :mod:`~ernievil2.weights.load`: build the model a checkpoint describes and load it with its vocab
  (:func:`load_model`), or load a checkpoint into an existing model (:func:`load_weights`);
* :mod:`~ernievil2.weights.save`: write ours (:func:`save_checkpoint`) and PaddleNLP's
  (:func:`export_paddlenlp`);
* :mod:`~ernievil2.weights.towers`: load one tower of a model (:func:`load_tower`:
  ``model.vision.init_from`` / ``model.text.init_from``), also from a timm ViT or a PaddleNLP
  ``ErnieModel``, whose layouts are :mod:`~ernievil2.weights.tower_layouts`'s;
* :mod:`~ernievil2.weights.find`: what a path holds (layout, weights, config) and where its vocab is;
* :mod:`~ernievil2.weights.layouts`: the layouts' file and key names and the key maps between them;
* :mod:`~ernievil2.weights.configs`: each layout's configuration, and the architecture read off shapes;
* :mod:`~ernievil2.weights.pdparams`: the restricted ``.pdparams`` reader (no code runs from the file).

Training checkpoints (optimizer, trainer state, resume) are :mod:`ernievil2.train.training_checkpoint`'s.
"""
from ernievil2.weights.find import detect_layout
from ernievil2.weights.load import CheckpointMismatchError, LoadedModel, LoadReport, load_model, load_weights
from ernievil2.weights.save import export_paddlenlp, save_checkpoint
from ernievil2.weights.towers import load_tower

__all__ = [
    "CheckpointMismatchError",
    "LoadReport",
    "LoadedModel",
    "detect_layout",
    "export_paddlenlp",
    "load_model",
    "load_tower",
    "load_weights",
    "save_checkpoint",
]
