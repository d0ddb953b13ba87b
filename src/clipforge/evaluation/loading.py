"""Load a model to evaluate, from local files only: the encoder, its tokenizer and its image transform.

Sources, as ``clipforge eval`` takes them:

- a clipforge checkpoint directory (``config.yaml`` + ``model.safetensors``): the ``model:`` section of
  its config rebuilds the architecture, the weights load strictly;
- an open_clip architecture and a local weights file (``--model ViT-B-32 --weights file.safetensors``,
  also ``.pt``/``.bin`` as open_clip writes them; a JSON config path or a configs/models stem works too);
- an open_clip hub-format folder (``open_clip_config.json`` + weights), as ``local-dir:`` loads it;
- a transformers CLIP folder (``config.json`` + weights + tokenizer files + preprocessor config), as
  ``CLIPModel.from_pretrained`` / ``CLIPProcessor.from_pretrained`` load it.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from clipforge.checkpoints import is_checkpoint
from clipforge.evaluation.encoder import Encoder, HFClipEncoder, OpenClipEncoder, Tokenizer
from clipforge.models import ModelConfig, build_model, load_weights
from clipforge.models.builder import unreadable_weights

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth")  # what open_clip's local-dir: loader looks for
INIT_KEYS = ("pretrained", "init_from")  # model.* keys naming initial weights, in older and newer configs


@dataclass
class EvalModel:
    encoder: Encoder
    tokenizer: Tokenizer
    transform: Callable  # PIL image → (3, H, W) tensor
    name: str  # for result file names
    kind: str  # "clipforge", "open_clip", "open_clip_dir", "transformers"


def model_kind(source: str | None = None, architecture: str | None = None, weights: str | None = None) -> str:
    """Which loader applies ("clipforge", "open_clip", "open_clip_dir", "transformers"): a cheap check of the
    files, so a wrong path fails before anything is built."""
    if architecture is not None:
        if source is not None:
            raise ValueError("give either a model folder or --model with --weights, not both")
        if weights is None:
            raise ValueError(
                f"--model {architecture} needs --weights FILE (local open_clip weights); nothing is downloaded"
            )
        if not Path(weights).exists():
            raise FileNotFoundError(f"--weights {weights} does not exist")
        return "open_clip"
    if source is None:
        raise ValueError("nothing to evaluate: give a checkpoint or model folder, or --model with --weights")
    path = Path(source)
    latest = _latest_below(path)
    if latest is not None:
        what = "checkpoints folder" if latest.parent == path else "run directory"
        written = "" if latest.exists() else " (no checkpoint is written there yet)"
        raise FileNotFoundError(f"{path} is a {what}, not a checkpoint: did you mean {latest}?{written}")
    for marker, kind in (
        ("config.yaml", "clipforge"),
        ("open_clip_config.json", "open_clip_dir"),
        ("config.json", "transformers"),
    ):
        if (path / marker).is_file():
            return kind
    raise FileNotFoundError(
        f"{path}: not a clipforge checkpoint directory (no config.yaml), an open_clip folder "
        "(no open_clip_config.json) nor a transformers CLIP folder (no config.json)"
    )


def _latest_below(path: Path) -> Path | None:
    """``RUN/checkpoints/latest`` when ``path`` is a run directory (RUN) or its checkpoints folder rather than a
    checkpoint (a run directory holds a config.yaml too, so that file alone does not make a checkpoint)."""
    if not path.is_dir() or is_checkpoint(path):
        return None
    if (path / "checkpoints").is_dir():
        return path / "checkpoints" / "latest"
    if path.name == "checkpoints" or (path / "latest").exists():
        return path / "latest"
    return None


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
    if kind == "open_clip":
        built = build_model(ModelConfig(name=architecture), device)
        load_weights(built.model, weights)
        return EvalModel(
            OpenClipEncoder(built.model.eval(), device, dtype),
            built.tokenizer,
            built.eval_transform,
            Path(weights).stem,
            kind,
        )
    loader = {
        "clipforge": _clipforge_checkpoint,
        "open_clip_dir": _open_clip_folder,
        "transformers": _transformers_folder,
    }[kind]
    return loader(Path(source), device, dtype)


def _clipforge_checkpoint(path: Path, device, dtype) -> EvalModel:
    raw = (yaml.safe_load((path / "config.yaml").read_text()) or {}).get("model")
    if not isinstance(raw, dict):
        raise ValueError(f"{path / 'config.yaml'}: no model section")
    # Where the run's initial weights came from does not matter: the checkpoint's weights replace them.
    raw = {key: value for key, value in raw.items() if key not in INIT_KEYS}
    unknown = set(raw) - {field.name for field in dataclasses.fields(ModelConfig)}
    if unknown:
        raise ValueError(f"{path / 'config.yaml'}: unknown model keys {sorted(unknown)}")
    built = build_model(ModelConfig(**raw), device)
    load_weights(built.model, str(path))
    name = path.resolve().name
    return EvalModel(
        OpenClipEncoder(built.model.eval(), device, dtype), built.tokenizer, built.eval_transform, name, "clipforge"
    )


def _open_clip_folder(path: Path, device, dtype) -> EvalModel:
    import open_clip

    # open_clip random-initialises (with only a warning) when the folder has no weights it recognises.
    if not any(file.suffix in WEIGHT_SUFFIXES for file in path.iterdir()):
        raise FileNotFoundError(f"{path}: open_clip folder without weights ({', '.join(WEIGHT_SUFFIXES)})")
    try:
        model, _, transform = open_clip.create_model_and_transforms(f"local-dir:{path}", device=device)
    except (pickle.UnpicklingError, EOFError) as exn:  # open_clip loads with weights_only=True: refused, not run
        weights = next(file for file in sorted(path.iterdir()) if file.suffix in WEIGHT_SUFFIXES)
        raise unreadable_weights(weights, exn) from None
    tokenizer = open_clip.get_tokenizer(f"local-dir:{path}")
    return EvalModel(
        OpenClipEncoder(model.eval(), device, dtype), tokenizer, transform, path.resolve().name, "open_clip_dir"
    )


def _transformers_folder(path: Path, device, dtype) -> EvalModel:
    from transformers import AutoProcessor, CLIPModel

    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type != "clip":
        raise ValueError(
            f"{path}: transformers model_type {model_type!r}; only CLIP folders (model_type clip) are supported"
        )
    # Without tokenizer files transformers does not fail: it maps every word to the unknown token.
    if not any((path / name).is_file() for name in ("tokenizer.json", "vocab.json")):
        raise FileNotFoundError(
            f"{path}: transformers CLIP folder without tokenizer files (tokenizer.json or vocab.json + merges.txt)"
        )
    model = CLIPModel.from_pretrained(str(path)).to(device).eval()
    processor = AutoProcessor.from_pretrained(str(path))
    context_length = model.config.text_config.max_position_embeddings
    return EvalModel(
        HFClipEncoder(model, device, dtype),
        HFTokenizer(processor.tokenizer, context_length),
        HFImageTransform(processor.image_processor),
        path.resolve().name,
        "transformers",
    )


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
