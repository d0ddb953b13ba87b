"""Dual encoders: open_clip architectures by name or our JSON configs, randomly initialised (weights from a path,
``model.init_from`` among them, are ``clipforge.model_loading``'s); how their towers train (``adapt.py``: full,
frozen, the last k blocks, LoRA from ``lora.py``; the towers' layers for layer-wise learning-rate decay).

The names below are imported on first use (PEP 562), not with the package, so that ``clipforge.models.config``
(read by every command) imports no open_clip or torch.
"""

import importlib

_EXPORTS = {
    "BuiltModel": "clipforge.models.builder",
    "apply_adaptation": "clipforge.models.adapt",
    "enable_packed_attention": "clipforge.models.attention",
    "ModelConfig": "clipforge.models.config",
    "build_model": "clipforge.models.builder",
    "enable_pooled_last_block": "clipforge.models.shortcuts",
    "enable_text_trimming": "clipforge.models.shortcuts",
    "layer_depths": "clipforge.models.adapt",
    "merge_lora": "clipforge.models.lora",
    "merged_state_dict": "clipforge.models.lora",
    "resolve_architecture": "clipforge.models.builder",
    "trims_text_padding": "clipforge.models.shortcuts",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
