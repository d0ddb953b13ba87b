"""Dual encoders: open_clip architectures by name or our JSON configs, random init or local weights."""

from clipforge.models.attention import enable_packed_attention
from clipforge.models.builder import (
    BuiltModel,
    ModelConfig,
    build_model,
    enable_text_trimming,
    load_weights,
    resolve_architecture,
    trims_text_padding,
)

__all__ = [
    "BuiltModel",
    "ModelConfig",
    "build_model",
    "enable_packed_attention",
    "enable_text_trimming",
    "load_weights",
    "resolve_architecture",
    "trims_text_padding",
]
