"""ERNIE-ViL 2.0 dual encoder: configuration, towers and presets."""
from .config import PRESETS, DualEncoderConfig, TextConfig, VisionConfig, model_config
from .dual_encoder import MAX_LOGIT_SCALE, ErnieViL2, build_model

__all__ = [
    "PRESETS", "DualEncoderConfig", "TextConfig", "VisionConfig", "model_config",
    "MAX_LOGIT_SCALE", "ErnieViL2", "build_model",
]
