"""Architecture configuration of the ERNIE-ViL 2.0 dual encoder and its named presets."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Mapping, Optional

INIT_TEMPERATURE = math.log(1 / 0.07)  # 2.65926: logit scale exp(t) starts at 1/0.07

#: ``normal``: every linear weight N(0, 0.02²) (BERT / ViT; made for 768-wide towers, where it gives
#: a block an output of order one). ``fan_in``: N(0, 1/fan_in) (LeCun; the width⁻⁰·⁵ of open_clip's
#: attention init), which keeps a narrow tower's blocks from being near-identities, so that
#: different inputs get different embeddings from the first step (docs/BENCHMARKS.md).
INIT_SCHEMES = ("normal", "fan_in")


def check_init_scheme(scheme: str, where: str) -> None:
    """Raise ``ValueError`` naming ``where`` unless ``scheme`` is one of :data:`INIT_SCHEMES`."""
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"{where} must be one of {', '.join(INIT_SCHEMES)}; got {scheme!r}")


@dataclass(frozen=True)
class VisionConfig:
    """ViT image tower: class token, ln_pre/ln_post, QuickGELU, pre-LN blocks."""

    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    ln_eps: float = 1e-6
    init: str = "normal"  # linear weights from scratch: normal (std 0.02) | fan_in (std fan_in^-0.5)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class TextConfig:
    """ERNIE 3.0 text tower: post-LN blocks, padding mask, tanh pooler."""

    vocab_size: int = 40000
    width: int = 768
    layers: int = 12
    heads: int = 12
    ffn_dim: int = 3072
    max_positions: int = 2048
    ln_eps: float = 1e-5
    dropout: float = 0.1
    attention_dropout: float = 0.1
    pad_id: int = 0
    initializer_range: float = 0.02
    init: str = "normal"  # linear weights from scratch: normal (initializer_range) | fan_in (std fan_in^-0.5)


@dataclass(frozen=True)
class DualEncoderConfig:
    """Both towers plus the contrastive temperature and the attention backend."""

    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()
    init_temperature: float = INIT_TEMPERATURE
    # "auto": Paddle's fused scaled-dot-product / flash attention on GPU, the exact math on CPU.
    attention: str = "auto"

    def __post_init__(self) -> None:
        if self.vision.width != self.text.width:
            raise ValueError(
                f"vision.width ({self.vision.width}) must equal text.width ({self.text.width}): "
                "ERNIE-ViL 2.0 compares the two towers' outputs without a projection"
            )
        if self.vision.image_size % self.vision.patch_size:
            raise ValueError(
                f"vision.image_size ({self.vision.image_size}) is not a multiple of "
                f"vision.patch_size ({self.vision.patch_size})"
            )
        for name, tower in (("vision", self.vision), ("text", self.text)):
            if tower.width % tower.heads:
                raise ValueError(f"{name}.width ({tower.width}) is not divisible by {name}.heads ({tower.heads})")
            check_init_scheme(tower.init, f"{name}.init")
        if self.attention not in ("auto", "sdpa", "math"):
            raise ValueError(f"attention must be one of auto, sdpa, math; got {self.attention!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PRESETS: dict[str, DualEncoderConfig] = {
    # Released ernie_vil-2.0-base-zh: ViT-B/16 + ERNIE 3.0 base.
    "base": DualEncoderConfig(),
    # Paper's Large-ViT: ViT-L/14 + ERNIE 3.0 large (1024 wide, 24 layers, 16 heads).
    "large": DualEncoderConfig(
        vision=VisionConfig(image_size=224, patch_size=14, width=1024, layers=24, heads=16, mlp_dim=4096),
        text=TextConfig(width=1024, layers=24, heads=16, ffn_dim=4096),
    ),
    # CPU demo and tests: 64 px, 16 px patches (17 tokens), 64 wide; fits minutes on 2 cores.
    "tiny": DualEncoderConfig(
        vision=VisionConfig(image_size=64, patch_size=16, width=64, layers=4, heads=4, mlp_dim=256),
        text=TextConfig(vocab_size=8000, width=64, layers=2, heads=4, ffn_dim=256, max_positions=64,
                        dropout=0.0, attention_dropout=0.0),
    ),
}


def _override(base: Any, overrides: Optional[Mapping[str, Any]], where: str) -> Any:
    if not overrides:
        return base
    known = {f.name for f in fields(base)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise KeyError(f"unknown key(s) {unknown} in {where}; valid keys: {sorted(known)}")
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})


def model_config(
    preset: str,
    vision: Optional[Mapping[str, Any]] = None,
    text: Optional[Mapping[str, Any]] = None,
    **top: Any,
) -> DualEncoderConfig:
    """The named preset with field overrides applied (``None`` values keep the preset's value)."""
    if preset not in PRESETS:
        raise KeyError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    cfg = PRESETS[preset]
    cfg = replace(
        cfg,
        vision=_override(cfg.vision, vision, "model.vision"),
        text=_override(cfg.text, text, "model.text"),
    )
    return _override(cfg, {k: v for k, v in top.items()}, "model")
