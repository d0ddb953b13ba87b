"""Writing a built model as a transformers folder and as an open_clip folder.

transformers (``write_transformers``): ``config.json`` + ``model.safetensors`` of a ``CLIPModel``
(or ``SiglipModel``), plus ``CLIPProcessor`` files (tokenizer, image processor) so that
``CLIPModel.from_pretrained``, ``CLIPProcessor.from_pretrained`` and
``pipeline("zero-shot-image-classification", model=DIR)`` work offline.

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

from clipforge.export.convert import Converted, to_transformers
from clipforge.export.processor import clip_tokenizer, image_processor, unmasked_tokenizer
from clipforge.export.towers import CannotConvert
from clipforge.models import BuiltModel

OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS = "open_clip_config.json", "open_clip_model.safetensors"


def _model_class(name: str):
    import transformers

    return getattr(transformers, name)


def write_transformers(built: BuiltModel, out: str | Path) -> dict[str, Any]:
    """Write the transformers folder; ``CannotConvert`` (before writing anything) if there is none."""
    out = Path(out)
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
    hf_model = _model_class(converted.model_class)(converted.config)
    hf_model.load_state_dict(converted.state_dict, strict=True)
    out.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(out)
    notes = list(converted.notes)
    if converted.family == "clip":
        from transformers import CLIPProcessor

        CLIPProcessor(image_processor=processor_image, tokenizer=tokenizer).save_pretrained(out)
    elif tokenizer is not None:
        tokenizer.save_pretrained(out)
        processor_image.save_pretrained(out)
        notes.append(
            f"tokenizer: open_clip's transformers tokenizer, padding to {context_length} tokens without an "
            f"attention mask; open_clip's text cleaning ({built.tokenizer.clean_fn.__name__}) runs outside "
            "it and is not carried"
        )
        if context_length != 64:
            notes.append(
                f"transformers' zero-shot-image-classification pipeline pads SigLIP text to 64 tokens (5.x "
                f"drops its tokenizer_kwargs); this model's context is {context_length}, so use SiglipModel "
                "with the tokenizer directly"
            )
    else:
        processor_image.save_pretrained(out)
        notes.append(
            f"no tokenizer written: the model tokenizes with open_clip's {type(built.tokenizer).__name__} "
            "and pads with id 0, which its bidirectional text tower attends to; transformers' SigLIP "
            "path expects a SigLIP tokenizer (pass input_ids made by open_clip's tokenizer instead)"
        )
    return {"format": "transformers", "class": converted.model_class, "family": converted.family, "notes": notes}


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
