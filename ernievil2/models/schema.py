"""The ``model`` config group's typed schema, shared by training, inference and export.

A named preset (:func:`ernievil2.models.config.model_config`) plus optional overrides of each
tower's fields; :func:`resolve_model` turns it into a :class:`DualEncoderConfig`. Kept apart from
the training schemas so that inference and export need no training code.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass, make_dataclass
from typing import Any, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf

from ernievil2.models.config import (
    DualEncoderConfig,
    TextConfig,
    VisionConfig,
    model_config,
)

#: Training settings of either tower, beside its architecture overrides (never part of the tower
#: config the model is built from). ``locked``: the tower trains not at all, or from
#: ``optim.unlock_at`` on (ernievil2.train.towers). ``init_from``: start this tower from a checkpoint
#: that holds it (ernievil2.weights.towers; wins over ``model.init_from`` for this tower).
TOWER_TRAINING_FIELDS: tuple[tuple[str, type, Any], ...] = (("locked", bool, False),
                                                            ("init_from", Optional[str], None))


def _overrides_of(cls: type, name: str) -> type:
    """A dataclass with the fields of ``cls``, each optional and ``None`` (= keep the preset), and
    the :data:`TOWER_TRAINING_FIELDS`."""
    return make_dataclass(
        name, [(f.name, Optional[f.type if not isinstance(f.type, str) else eval(f.type)], None) for f in fields(cls)]
        + [(n, t, field(default=d)) for n, t, d in TOWER_TRAINING_FIELDS]
    )


VisionOverrides = _overrides_of(VisionConfig, "VisionOverrides")
TextOverrides = _overrides_of(TextConfig, "TextOverrides")


@dataclass
class ModelSchema:
    """A named preset (``tiny``, ``base``, ``large``) plus field overrides of either tower.

    ``init_from``: start from pretrained weights instead of a random init: one of our checkpoint
    folders (or a run folder: its latest checkpoint), a PaddleNLP ``save_pretrained`` folder or an
    official ERNIE-ViL 2.0 ``.pdparams`` (layout detected; see :mod:`ernievil2.weights.find`). The
    preset and overrides must describe the same architecture: loading is strict.
    ``vision.init_from`` / ``text.init_from`` load one tower alone (also from a timm ViT or a
    PaddleNLP ErnieModel: :mod:`ernievil2.weights.towers`), after ``init_from``: they win for their tower.
    """

    preset: str = "tiny"
    vision: Any = field(default_factory=VisionOverrides)
    text: Any = field(default_factory=TextOverrides)
    attention: str = "auto"
    # None: build a WordPiece vocab from the training captions (saved as <run_dir>/vocab.txt);
    # a path: load that vocab.txt (e.g. the released ERNIE 3.0 vocab).
    vocab_file: Optional[str] = None
    vocab_size: int = 8000  # target size of a vocab built from captions
    text_max_length: int = 48
    init_from: Optional[str] = None  # pretrained weights to start from (any supported layout)


def check_keys(node: Any, path: str = "") -> None:
    """Raise ``KeyError`` naming the first key of ``node`` (a structured config) that its dataclass
    schema does not have, e.g. one appended with ``+optim.lrr=0.1``, which Hydra lets through."""
    if isinstance(node, ListConfig):
        for i, item in enumerate(node):
            check_keys(item, f"{path}[{i}]")
        return
    if not isinstance(node, DictConfig):
        return
    schema = OmegaConf.get_type(node)
    known = {f.name for f in fields(schema)} if is_dataclass(schema) else None
    for key in node.keys():
        where = f"{path}.{key}" if path else str(key)
        if known is not None and key not in known and where != "hydra":
            raise KeyError(f"unknown config key '{where}' (valid keys here: {sorted(known)})")
        if known is None or key in known:
            check_keys(node._get_node(key), where)


def resolve_model(
    cfg: ModelSchema | DictConfig, tokenizer_vocab: Optional[int] = None, built_vocab: bool = False
) -> DualEncoderConfig:
    """The preset named in ``cfg`` with its non-null overrides.

    Unless ``model.text.vocab_size`` is set, a vocab built from captions sizes the word embedding
    exactly; a loaded vocab file only enlarges it when it holds more ids than the preset (the
    released vocab's 39,980 ids fit the released 40,000-row embedding).
    """
    training = {n for n, _, _ in TOWER_TRAINING_FIELDS}
    vision, text = ({k: v for k, v in (OmegaConf.to_container(t) if isinstance(t, DictConfig) else vars(t)).items()
                     if k not in training} for t in (cfg.vision, cfg.text))
    if tokenizer_vocab is not None and text.get("vocab_size") is None:
        preset_vocab = model_config(cfg.preset).text.vocab_size
        text["vocab_size"] = tokenizer_vocab if built_vocab else max(tokenizer_vocab, preset_vocab)
    return model_config(cfg.preset, vision=vision, text=text, attention=cfg.attention)
