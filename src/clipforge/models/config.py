"""The ``model`` section of the run config: which dual encoder to build and where its initial weights come from.

It lives apart from ``builder.py``, which imports open_clip and torch, so that reading and validating a config
(``clipforge train --help``, ``clipforge submit``) imports neither.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ModelConfig:
    """Which dual encoder to build and where its initial weights come from."""

    name: str = "ViT-B-32"
    """open_clip architecture name (e.g. ViT-B-32, see `open_clip.list_models()`), the stem of a JSON file in
    configs/models/, or a path to an open_clip-style JSON model config."""
    init_from: str | None = None
    """Weights to start from, all local (nothing is downloaded): a clipforge checkpoint directory, an open_clip
    weights file (.pt/.bin/.safetensors) or folder (open_clip_config.json + open_clip_model.safetensors), or a
    transformers CLIPModel/SiglipModel folder (config.json + model.safetensors), converted exactly. The weights must
    fit the architecture (model.name, model.force_quick_gelu). None = random init."""
    force_quick_gelu: bool = False
    """Use QuickGELU activations (as OpenAI's original CLIP weights need)."""
    init_logit_scale: float | None = None
    """Initial log inverse temperature (None = the architecture's, log(1/0.07) for CLIP; SigLIP uses log(10))."""
    init_logit_bias: float | None = None
    """Initial logit bias; set it (SigLIP: -10) to give the model the learnable bias the sigmoid loss needs."""
    grad_checkpointing: bool = False
    """Recompute each transformer block's activations in the backward pass: less memory, ~30% more compute."""
    patch_dropout: float = 0.0
    """FLIP patch dropout: the fraction of image patches dropped in training (ViT image towers only)."""
    lock_image: bool = False
    """LiT: freeze the image tower (typically loaded with model.init_from)."""
    lock_image_unlocked_groups: int = 0
    """With lock_image: leave the last N layer groups of the image tower trainable."""
    lock_image_freeze_bn_stats: bool = False
    """With lock_image: also freeze BatchNorm running statistics (ResNet towers)."""
    lock_text: bool = False
    """Freeze the text tower."""
    lock_text_unlocked_layers: int = 0
    """With lock_text: leave the last N layer groups trainable (open_clip's grouping, from the end: the projection,
    then the last transformer block with the final LayerNorm, then one group per earlier block, then the
    embeddings)."""
    lock_text_freeze_layer_norm: bool = True
    """With lock_text: keep the frozen layers' LayerNorms frozen too (open_clip's built-in text tower requires it)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.patch_dropout < 1.0:
            raise ValueError(f"model.patch_dropout: must be in [0, 1), got {self.patch_dropout}")
        for name in ("lock_image_unlocked_groups", "lock_text_unlocked_layers"):
            if getattr(self, name) < 0:
                raise ValueError(f"model.{name}: must be >= 0, got {getattr(self, name)}")
