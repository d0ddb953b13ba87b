"""Build a dual encoder: any open_clip architecture by name, or a JSON config of ours.

``build_model(cfg)`` returns the open_clip model (``encode_image``/``encode_text`` give
L2-normalised embeddings with ``normalize=True``; ``logit_scale`` is the learnable log inverse
temperature, initialised to log(1/0.07) by open_clip), its train and eval image transforms and
its tokenizer. Model code here knows nothing of distribution, optimizers or losses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from safetensors.torch import load_file

# JSON architectures shipped with the project (``configs/models/NAME.json``); a config may also
# name a JSON file anywhere by path.
PROJECT_MODEL_DIR = Path(__file__).resolve().parents[3] / "configs" / "models"


@dataclass
class ModelConfig:
    """Which dual encoder to build and where its initial weights come from."""

    name: str = "ViT-B-32"
    """open_clip architecture name (e.g. ViT-B-32, see `open_clip.list_models()`), the stem of a JSON file in
    configs/models/, or a path to an open_clip-style JSON model config."""
    pretrained: str | None = None
    """Local weights to start from: an open_clip weights file (.pt/.bin/.safetensors) or a clipforge checkpoint
    directory. None = random init. Nothing is downloaded."""
    force_quick_gelu: bool = False
    """Use QuickGELU activations (as OpenAI's original CLIP weights need)."""
    init_logit_scale: float | None = None
    """Initial log inverse temperature (None = the architecture's, log(1/0.07) for CLIP; SigLIP uses log(10))."""
    init_logit_bias: float | None = None
    """Initial logit bias; set it (SigLIP: -10) to give the model the learnable bias the sigmoid loss needs."""


@dataclass
class BuiltModel:
    model: torch.nn.Module
    train_transform: Callable
    eval_transform: Callable
    preprocess_cfg: dict[str, Any]
    tokenizer: Callable[[list[str]], torch.Tensor]
    architecture: str
    model_cfg: dict[str, Any]


def resolve_architecture(name: str) -> str:
    """Register a JSON config with open_clip if ``name`` refers to one; return the open_clip name."""
    path = Path(name)
    if path.suffix == ".json":
        if not path.is_file():
            raise FileNotFoundError(f"model.name: JSON model config {name!r} does not exist")
    elif name not in open_clip.list_models() and (PROJECT_MODEL_DIR / f"{name}.json").is_file():
        path = PROJECT_MODEL_DIR / f"{name}.json"
    else:
        path = None
    if path is not None:
        open_clip.add_model_config(path)
        return path.stem
    if name not in open_clip.list_models():
        raise ValueError(f"model.name: unknown architecture {name!r}; it is neither an open_clip model "
                         f"(see open_clip.list_models()) nor a JSON file in {PROJECT_MODEL_DIR}")
    return name


def load_weights(model: torch.nn.Module, source: str) -> None:
    """Load local weights strictly: a clipforge checkpoint directory or an open_clip weights file."""
    path = Path(source)
    if path.is_dir():
        weights = path / "model.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"model.pretrained: {source} is a directory without model.safetensors")
        model.load_state_dict(load_file(str(weights)), strict=True)
    elif path.is_file():
        open_clip.load_checkpoint(model, str(path), strict=True, weights_only=True)
    else:
        raise FileNotFoundError(f"model.pretrained: {source} does not exist")


def build_model(cfg: ModelConfig, device: torch.device | str = "cpu") -> BuiltModel:
    architecture = resolve_architecture(cfg.name)
    model_kwargs: dict[str, Any] = {}
    if cfg.init_logit_scale is not None:
        model_kwargs["init_logit_scale"] = cfg.init_logit_scale
    if cfg.init_logit_bias is not None:
        model_kwargs["init_logit_bias"] = cfg.init_logit_bias
    model, train_transform, eval_transform = open_clip.create_model_and_transforms(
        architecture, pretrained=None, device=device, force_quick_gelu=cfg.force_quick_gelu,
        pretrained_text=False, output_dict=True, **model_kwargs,
    )
    if cfg.pretrained:
        load_weights(model, cfg.pretrained)
    tokenizer = open_clip.get_tokenizer(architecture)
    model_cfg = open_clip.get_model_config(architecture)
    preprocess_cfg = open_clip.get_model_preprocess_cfg(model)
    return BuiltModel(model, train_transform, eval_transform, preprocess_cfg, tokenizer, architecture, model_cfg)
