"""Build a dual encoder: any open_clip architecture by name, or a JSON config of ours.

``build_model(cfg)`` returns the open_clip model (``encode_image``/``encode_text`` give
L2-normalised embeddings with ``normalize=True``; ``logit_scale`` is the learnable log inverse
temperature, initialised to log(1/0.07) by open_clip), its train and eval image transforms and
its tokenizer. Model code here knows nothing of distribution, optimizers or losses.

``model.init_from`` is not loaded here: weights from a path (a checkpoint, an open_clip file or folder, a
transformers folder through ``clipforge.export``'s converter) are ``clipforge.model_loading``'s, which sits above
both packages; the caller applies them right after the build (``model_loading.load_init_weights``).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch

from clipforge.models.config import ModelConfig

# JSON architectures shipped inside the package (``clipforge/models/configs/NAME.json``, linked from the
# checkout's ``configs/models/``), so an installed wheel builds them too; a config may also name a JSON file
# anywhere by path.
MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@dataclass
class BuiltModel:
    model: torch.nn.Module
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
    elif name not in open_clip.list_models() and (MODEL_CONFIG_DIR / f"{name}.json").is_file():
        path = MODEL_CONFIG_DIR / f"{name}.json"
    else:
        path = None
    if path is not None:
        open_clip.add_model_config(path)
        return path.stem
    if name not in open_clip.list_models():
        raise ValueError(
            f"model.name: unknown architecture {name!r}; it is neither an open_clip model "
            f"(see open_clip.list_models()) nor a JSON file in {MODEL_CONFIG_DIR}"
        )
    return name


def unreadable_weights(path: Path, exn: BaseException) -> ValueError:
    """The one-line error for a file that ``torch.load(weights_only=True)`` refused (a pickle that could run code
    when loaded) or could not read (not a torch file, cut short)."""
    text = str(exn)
    if "Weights only load failed" in text:
        reason = re.search(r"WeightsUnpickler error:\s*(.*?)(?: was not an allowed global|\.\s|\n\n|$)", text, re.S)
        refused = f" ({' '.join(reason.group(1).split())})" if reason and reason.group(1).strip() else ""
        return ValueError(
            f"{path} is not a weights-only file: torch.load(weights_only=True) refused it{refused}, since unpickling "
            "it could run code; nothing was loaded. Save the model's state_dict or safetensors where it was made"
        )
    message = " ".join(text.split())
    return ValueError(f"{path} is not a weights file torch.load can read ({type(exn).__name__}: {message[:160]})")


def _check_patch_dropout(model: torch.nn.Module, cfg: ModelConfig) -> None:
    if cfg.patch_dropout and not hasattr(model.visual, "patch_dropout"):
        raise ValueError(
            f"model.patch_dropout: {type(model.visual).__name__} image towers have no patches to drop "
            "(FLIP patch dropout needs a ViT)"
        )


@contextlib.contextmanager
def _random_init_intended():
    """Hide open_clip's "No pretrained weights loaded ... initialized randomly" (logged on the root logger):
    ``build_model`` never asks open_clip for weights; it initialises randomly on purpose, and the caller loads weights
    right after (``model.init_from``, a checkpoint to evaluate or export). On an export it reads as if the weights
    were lost."""

    def drop(record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def build_model(cfg: ModelConfig, device: torch.device | str = "cpu") -> BuiltModel:
    architecture = resolve_architecture(cfg.name)
    model_kwargs: dict[str, Any] = {}
    if cfg.init_logit_scale is not None:
        model_kwargs["init_logit_scale"] = cfg.init_logit_scale
    if cfg.init_logit_bias is not None:
        model_kwargs["init_logit_bias"] = cfg.init_logit_bias
    if cfg.patch_dropout:
        model_kwargs["force_patch_dropout"] = cfg.patch_dropout
    with _random_init_intended():
        model, _, eval_transform = open_clip.create_model_and_transforms(  # training crops: clipforge.data.images
            architecture,
            pretrained=None,
            device=device,
            force_quick_gelu=cfg.force_quick_gelu,
            pretrained_text=False,
            output_dict=True,
            **model_kwargs,
        )
    _check_patch_dropout(model, cfg)  # training-only options (locks, checkpointing): clipforge.train.parallel
    tokenizer = open_clip.get_tokenizer(architecture)
    model_cfg = open_clip.get_model_config(architecture)
    preprocess_cfg = open_clip.get_model_preprocess_cfg(model)
    return BuiltModel(model, eval_transform, preprocess_cfg, tokenizer, architecture, model_cfg)
