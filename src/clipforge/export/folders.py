"""Writing a built model as a transformers folder and as an open_clip folder.

transformers (``write_transformers``): ``config.json`` + ``model.safetensors`` of a ``CLIPModel``
(or ``SiglipModel``), plus ``CLIPProcessor`` files (tokenizer, image processor) so that
``CLIPModel.from_pretrained``, ``CLIPProcessor.from_pretrained`` and
``pipeline("zero-shot-image-classification", model=DIR)`` work offline. With ``towers``, only the
encoders asked for, each a model of its own in the subfolders diffusers pipelines read:
``text_encoder/`` (``CLIPTextModelWithProjection`` or ``SiglipTextModel``) with ``tokenizer/``, and
``image_encoder/`` (``CLIPVisionModelWithProjection`` or ``SiglipVisionModel``) with
``feature_extractor/`` (the image processor). Each holds exactly its tower's tensors, so transformers
loads it without unexpected or missing keys.

open_clip (``write_open_clip``): ``open_clip_config.json`` (``model_cfg`` + ``preprocess_cfg``) and
``open_clip_model.safetensors``, the layout ``open_clip.create_model_and_transforms("local-dir:DIR")``
and ``"hf-hub:org/name"`` read. The config records what the modules really use (QuickGELU, a
logit bias) even when the architecture's JSON does not say it, since open_clip rebuilds the
model from this config alone.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from open_clip.tokenizer import HFTokenizer
from open_clip.transformer import QuickGELU
from safetensors.torch import save_file
from transformers import CLIPImageProcessor, PreTrainedTokenizerBase

from clipforge.export.convert import TOWER_CLASSES, Converted, to_transformers
from clipforge.export.processor import clip_tokenizer, image_processor, unmasked_tokenizer
from clipforge.export.towers import CannotConvert
from clipforge.models import BuiltModel

OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS = "open_clip_config.json", "open_clip_model.safetensors"
# Where each tower and its preprocessing go: the subfolders diffusers pipelines read (text_encoder + tokenizer as in
# Stable Diffusion; image_encoder + feature_extractor as in the unCLIP and IP-Adapter pipelines).
TOWER_FOLDERS = {"text": ("text_encoder", "tokenizer"), "image": ("image_encoder", "feature_extractor")}


def _model_class(name: str):
    import transformers

    return getattr(transformers, name)


def _prepare(built: BuiltModel) -> tuple[Converted, CLIPImageProcessor, PreTrainedTokenizerBase | None]:
    """The converted model, its image processor and its tokenizer (None where transformers has none for it)."""
    try:
        converted: Converted = to_transformers(built.model, built.tokenizer)
        processor_image = image_processor(built.preprocess_cfg)
        context_length = built.model_cfg["text_cfg"].get("context_length", 77)
        if converted.family == "clip":
            tokenizer = clip_tokenizer(built.tokenizer, context_length)
        elif isinstance(built.tokenizer, HFTokenizer):
            tokenizer = unmasked_tokenizer(built.tokenizer, context_length)
        else:
            tokenizer = None
    except CannotConvert as exc:
        raise CannotConvert(f"cannot convert {built.architecture} to transformers: {exc}") from None
    return converted, processor_image, tokenizer


def _tokenizer_notes(built: BuiltModel, family: str, tokenizer: PreTrainedTokenizerBase | None) -> list[str]:
    if family == "clip":
        return []
    if tokenizer is None:
        return [
            f"no tokenizer written: the model tokenizes with open_clip's {type(built.tokenizer).__name__} "
            "and pads with id 0, which its bidirectional text tower attends to; transformers' SigLIP "
            "path expects a SigLIP tokenizer (pass input_ids made by open_clip's tokenizer instead)"
        ]
    return [
        f"tokenizer: open_clip's transformers tokenizer, padding to {tokenizer.model_max_length} tokens without an "
        f"attention mask; open_clip's text cleaning ({built.tokenizer.clean_fn.__name__}) runs outside "
        "it and is not carried"
    ]


def write_transformers(built: BuiltModel, out: str | Path, towers: tuple[str, ...] = ()) -> dict[str, Any]:
    """Write the transformers folder, or with ``towers`` ("text", "image") only those encoders in their
    subfolders (``TOWER_FOLDERS``); ``CannotConvert`` (before writing anything) if there is none."""
    out = Path(out)
    converted, processor_image, tokenizer = _prepare(built)
    hf_model = _model_class(converted.model_class)(converted.config)
    hf_model.load_state_dict(converted.state_dict, strict=True)  # the conversion is whole, whichever part is written
    notes = list(converted.notes) + _tokenizer_notes(built, converted.family, tokenizer)
    summary = {"format": "transformers", "class": converted.model_class, "family": converted.family, "notes": notes}
    out.mkdir(parents=True, exist_ok=True)
    if towers:
        summary["towers"] = _write_towers(converted, processor_image, tokenizer, towers, out)
        summary["class"] = ", ".join(written["class"] for written in summary["towers"].values())
        return summary
    hf_model.save_pretrained(out)
    if converted.family == "clip":
        from transformers import CLIPProcessor

        CLIPProcessor(image_processor=processor_image, tokenizer=tokenizer).save_pretrained(out)
        return summary
    processor_image.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
        if tokenizer.model_max_length != 64:
            notes.append(
                f"transformers' zero-shot-image-classification pipeline pads SigLIP text to 64 tokens (5.x "
                f"drops its tokenizer_kwargs); this model's context is {tokenizer.model_max_length}, so use "
                "SiglipModel with the tokenizer directly"
            )
    return summary


def _write_towers(
    converted: Converted,
    processor_image: CLIPImageProcessor,
    tokenizer: PreTrainedTokenizerBase | None,
    towers: tuple[str, ...],
    out: Path,
) -> dict[str, dict[str, str | None]]:
    """Each tower as its own transformers model, holding exactly its tensors of the combined model (same keys)."""
    written = {}
    for tower in towers:
        model_folder, processor_folder = TOWER_FOLDERS[tower]
        class_name = TOWER_CLASSES[converted.family][tower]
        config = converted.config.text_config if tower == "text" else converted.config.vision_config
        model = _model_class(class_name)(copy.deepcopy(config))
        # A key is the combined model's own ("text_model.encoder..." in CLIPTextModelWithProjection), or that key
        # under the class's base_model_prefix (transformers 5's SiglipTextModel holds "encoder..." directly).
        state = {
            key: converted.state_dict.get(key, converted.state_dict.get(f"{model.base_model_prefix}.{key}"))
            for key in model.state_dict()
        }
        model.load_state_dict({key: value for key, value in state.items() if value is not None}, strict=True)
        model.save_pretrained(out / model_folder)
        processor = tokenizer if tower == "text" else processor_image
        if processor is not None:
            processor.save_pretrained(out / processor_folder)
        written[tower] = {
            "folder": model_folder,
            "class": class_name,
            "processor": processor_folder if processor is not None else None,
        }
    return written


def _uses_quick_gelu(built: BuiltModel) -> bool:
    return any(isinstance(module, QuickGELU) for module in built.model.modules())


def open_clip_config(built: BuiltModel) -> dict[str, Any]:
    model_cfg = copy.deepcopy(built.model_cfg)
    if _uses_quick_gelu(built):
        model_cfg["quick_gelu"] = True
    logit_bias = getattr(built.model, "logit_bias", None)
    if logit_bias is not None:
        model_cfg["init_logit_bias"] = float(logit_bias.detach().reshape(()))  # makes open_clip create the parameter
    preprocess = {
        key: list(value) if isinstance(value, tuple) else value for key, value in built.preprocess_cfg.items()
    }
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess}


def write_open_clip(built: BuiltModel, out: str | Path) -> dict[str, Any]:
    """Write ``open_clip_config.json`` + ``open_clip_model.safetensors`` (+ a transformers tokenizer, if it has one)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = {key: value.detach().cpu().contiguous() for key, value in built.model.state_dict().items()}
    save_file(weights, str(out / OPEN_CLIP_WEIGHTS), metadata={"format": "pt"})
    (out / OPEN_CLIP_CONFIG).write_text(json.dumps(open_clip_config(built), indent=2) + "\n")
    if isinstance(built.tokenizer, HFTokenizer) and not (out / "tokenizer_config.json").is_file():
        # open_clip's local-dir loader reads it from the folder. If the transformers export already wrote it (the
        # same tokenizer, set to return no attention mask), that one stays: open_clip uses only the input ids.
        built.tokenizer.save_pretrained(str(out))
    return {"format": "open_clip", "class": type(built.model).__name__, "notes": []}
