"""A model to evaluate as ``clipforge eval`` takes it: the encoder, its tokenizer and its image transform.

The files are read by ``clipforge.model_loading`` (the one place that turns a path into a model, shared with
``model.init_from`` and ``clipforge export``); this module wraps what it loads behind the evaluators' interfaces.
Sources, as ``clipforge eval`` takes them:

- a clipforge checkpoint directory (``config.yaml`` + weights): the ``model:`` section of its config rebuilds the
  architecture, the weights load strictly;
- an open_clip architecture and local weights (``--model ViT-B-32 --weights file.safetensors``, also ``.pt``/``.bin``
  as open_clip writes them, or anything ``model.init_from`` takes; a JSON config path or a configs/models stem works
  for the architecture too);
- an open_clip hub-format folder (``open_clip_config.json`` + weights), as ``local-dir:`` loads it;
- a transformers CLIP folder (``config.json`` + weights + tokenizer files + preprocessor config), as
  ``CLIPModel.from_pretrained`` / ``CLIPProcessor.from_pretrained`` load it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from clipforge.evaluation.encoder import Encoder, HFClipEncoder, OpenClipEncoder, Tokenizer
from clipforge.model_loading import (
    load_architecture,
    load_checkpoint_model,
    load_open_clip_folder,
    load_transformers_clip,
    model_kind,
)

__all__ = ["EvalModel", "HFImageTransform", "HFTokenizer", "load_eval_model", "model_kind"]


@dataclass
class EvalModel:
    encoder: Encoder
    tokenizer: Tokenizer
    transform: Callable  # PIL image → (3, H, W) tensor
    name: str  # for result file names
    kind: str  # "clipforge", "open_clip", "open_clip_dir", "transformers" (clipforge.model_loading.model_kind)


def load_eval_model(
    source: str | None = None,
    architecture: str | None = None,
    weights: str | None = None,
    device: torch.device | str = "cpu",
    amp: bool = False,
) -> EvalModel:
    """``source`` (a checkpoint, open_clip or transformers folder) or ``architecture`` + ``weights``."""
    dtype = torch.bfloat16 if amp else None
    kind = model_kind(source, architecture, weights)
    if kind == "transformers":
        model, processor = load_transformers_clip(source, device)
        return EvalModel(
            HFClipEncoder(model, device, dtype),
            HFTokenizer(processor.tokenizer, model.config.text_config.max_position_embeddings),
            HFImageTransform(processor.image_processor),
            Path(source).resolve().name,
            kind,
        )
    if kind == "open_clip":
        built, name = load_architecture(architecture, weights, device), Path(weights).stem
    else:
        load = load_checkpoint_model if kind == "clipforge" else load_open_clip_folder
        built, name = load(source, device), Path(source).resolve().name
    return EvalModel(OpenClipEncoder(built.model, device, dtype), built.tokenizer, built.eval_transform, name, kind)


class HFTokenizer:
    """A transformers tokenizer as a ``Tokenizer``: texts → (N, L) ids, padded to the longest, truncated."""

    def __init__(self, tokenizer, context_length: int) -> None:
        self.tokenizer, self.context_length = tokenizer, context_length

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.context_length, return_tensors="pt"
        )["input_ids"]


class HFImageTransform:
    """A transformers image processor as a per-image transform (picklable for DataLoader workers)."""

    def __init__(self, image_processor) -> None:
        self.image_processor = image_processor

    def __call__(self, image) -> torch.Tensor:
        return self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]
