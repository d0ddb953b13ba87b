"""open_clip model ⇄ transformers ``CLIPModel``/``SiglipModel``: one entry point each way.

``to_transformers(model, tokenizer)`` gives the transformers config and state dict equal to an
open_clip model (CLIP family: ViT + causal text tower; SigLIP family: timm ViT with a MAP head +
bidirectional text tower) or raises ``CannotConvert`` naming why the architecture has no
counterpart. ``load_transformers_folder(model, folder)`` is the inverse, used by
``model.init_from``: it checks that the folder's architecture is the model's (sizes,
activations, norms) and loads the weights through the same tensor pairs, so open_clip →
transformers → open_clip returns the very same tensors.
"""

from __future__ import annotations

import json
import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from open_clip.tokenizer import HFTokenizer
from torch import nn
from transformers import PreTrainedConfig

from clipforge.export import clip, siglip
from clipforge.export.mapping import convert
from clipforge.export.towers import CannotConvert
from clipforge.models.builder import unreadable_weights

log = logging.getLogger(__name__)

FAMILIES = {"clip": (clip, "CLIPModel"), "siglip": (siglip, "SiglipModel")}
# The transformers class of each tower alone, whose weights are the combined model's under the same keys.
TOWER_CLASSES = {
    "clip": {"text": "CLIPTextModelWithProjection", "image": "CLIPVisionModelWithProjection"},
    "siglip": {"text": "SiglipTextModel", "image": "SiglipVisionModel"},
}


@dataclass
class Converted:
    family: str  # "clip" or "siglip"
    model_class: str  # "CLIPModel" or "SiglipModel"
    config: PreTrainedConfig
    state_dict: dict[str, torch.Tensor]
    notes: list[str] = field(default_factory=list)


def token_ids(tokenizer: Any) -> dict[str, int]:
    """pad/bos/eos ids of an open_clip tokenizer (SimpleTokenizer pads with 0)."""
    if isinstance(tokenizer, HFTokenizer):
        inner = tokenizer.tokenizer
        return {
            "pad_token_id": inner.pad_token_id,
            "bos_token_id": inner.bos_token_id,
            "eos_token_id": inner.eos_token_id,
        }
    return {"pad_token_id": 0, "bos_token_id": clip.START_OF_TEXT, "eos_token_id": clip.END_OF_TEXT}


def _describe(model: nn.Module, tokenizer: Any) -> tuple[str, PreTrainedConfig, list, list[str]]:
    if type(getattr(model, "visual", None)).__name__ == "TimmModel":
        try:
            return ("siglip", *siglip.describe(model, token_ids(tokenizer)))
        except CannotConvert as exc:
            raise CannotConvert(f"not a CLIPModel (its image tower is a timm model) nor a SiglipModel: {exc}") from None
    try:
        return ("clip", *clip.describe(model))
    except CannotConvert as exc:
        raise CannotConvert(f"no CLIPModel equivalent: {exc}") from None


def to_transformers(model: nn.Module, tokenizer: Any = None) -> Converted:
    """The transformers config and weights computing what ``model`` computes (fp32 tensors as stored)."""
    family, config, pairs, notes = _describe(model, tokenizer)
    state_dict = dict(model.state_dict())
    if family == "clip":
        state_dict.pop("logit_bias", None)
    hf_state = convert(pairs, state_dict, to_hf=True)
    if family == "siglip" and "logit_bias" not in hf_state:
        hf_state["logit_bias"] = torch.zeros(1, dtype=hf_state["logit_scale"].dtype)
    return Converted(family, FAMILIES[family][1], config, hf_state, notes)


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").is_file():
        weights = load_file(str(folder / "model.safetensors"))
    elif index.is_file():
        weights = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            weights.update(load_file(str(folder / shard)))
    elif (folder / "pytorch_model.bin").is_file():
        try:
            weights = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, EOFError) as exn:
            raise unreadable_weights(folder / "pytorch_model.bin", exn) from None
    else:
        raise FileNotFoundError(f"{folder}: transformers folder without model.safetensors or pytorch_model.bin")
    # Older transformers saved the position_ids buffers; they are derived, not weights.
    return {key: value for key, value in weights.items() if not key.endswith("position_ids")}


def architecture_mismatches(expected: PreTrainedConfig, found: PreTrainedConfig, family: str) -> list[str]:
    expected_dict, found_dict = expected.to_dict(), found.to_dict()
    problems = []
    for section, names in FAMILIES[family][0].ARCHITECTURE_FIELDS.items():
        want, have = (expected_dict[section], found_dict[section]) if section else (expected_dict, found_dict)
        for name in names:
            if want.get(name) != have.get(name):
                problems.append(
                    f"{section + '.' if section else ''}{name} is {have.get(name)!r} in the folder, "
                    f"{want.get(name)!r} in the model"
                )
    if family == "clip" and found.text_config.eos_token_id not in (2, clip.END_OF_TEXT):
        # 2 is transformers' legacy marker for "pool at the argmax id", which is what open_clip does.
        problems.append(
            f"text_config.eos_token_id is {found.text_config.eos_token_id}, the model pools at the "
            f"argmax token ({clip.END_OF_TEXT})"
        )
    return problems


def load_transformers_folder(model: nn.Module, folder: str | Path, tokenizer: Any = None) -> list[str]:
    """Load a saved ``CLIPModel``/``SiglipModel`` folder into the open_clip ``model``; returns notes."""
    from transformers import AutoConfig

    folder = Path(folder)
    found = AutoConfig.from_pretrained(folder, local_files_only=True)
    if found.model_type not in FAMILIES:
        raise ValueError(f"{folder}: a {found.model_type!r} model; only CLIPModel and SiglipModel folders load")
    family, expected, pairs, _ = _describe(model, tokenizer)
    if family != found.model_type:
        raise ValueError(
            f"{folder} holds a {FAMILIES[found.model_type][1]}, the model is a {FAMILIES[family][1]} architecture"
        )
    problems = architecture_mismatches(expected, found, family)
    if problems:
        hint = ""
        if any("hidden_act is 'quick_gelu'" in problem for problem in problems):
            hint = " (weights trained with QuickGELU need model.force_quick_gelu: true)"
        raise ValueError(f"{folder} does not match the model architecture: {'; '.join(problems)}{hint}")
    weights = _read_weights(folder)
    notes, current = [], model.state_dict()
    if family == "siglip" and "logit_bias" not in current:
        weights.pop("logit_bias", None)
        notes.append("the folder's logit_bias was not loaded: the model has none")
    state = convert(pairs, weights, to_hf=False)
    for key in set(current) - set(state):
        if key != "logit_bias":
            raise KeyError(f"{folder} gave no value for {key}")
        state[key] = current[key]
        notes.append("the model's logit_bias keeps its initial value: CLIPModel has none")
    model.load_state_dict(state, strict=True)
    for note in notes:
        log.info("%s: %s", folder, note)
    return notes
