"""Dual encoders: open_clip architectures by name or our JSON configs, random init or local weights."""

from clipforge.models.builder import BuiltModel, ModelConfig, build_model, load_weights, resolve_architecture

__all__ = ["BuiltModel", "ModelConfig", "build_model", "load_weights", "resolve_architecture"]
