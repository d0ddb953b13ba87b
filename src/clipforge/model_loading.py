"""A model from a path: the one place that turns local files into a model, for ``model.init_from``, ``clipforge eval``
and ``clipforge export``.

    built = load_checkpoint_model("runs/demo/checkpoints/latest")  # its architecture, its weights, in eval mode
    load_init_weights(built.model, cfg.model.init_from)            # model.init_from, right after build_model

What a path can be (``model_kind`` tells which from the files alone, so a wrong path fails before anything is built):

- a clipforge checkpoint directory (``config.yaml`` + ``manifest.json`` + weights or shards). ``read_checkpoint_config``
  is the one reading of its saved config's ``model:`` section into a ``ModelConfig``; ``load_checkpoint_model``
  builds that architecture and loads the weights strictly, after ``clipforge.checkpoints`` has verified the
  manifest. A LoRA run's weights (base weights and adapters) are merged first (``clipforge.models.lora``), so the
  model is the plain architecture: what ``clipforge export`` writes and ``model.init_from`` starts from. A run
  directory, or its ``checkpoints`` folder, is refused with the path of its latest checkpoint: results or an export
  must say which step they are of.
- an open_clip weights file (.safetensors, or .pt/.bin unpickled weights-only), into an architecture given by name
  (``load_weights``; ``load_architecture`` builds it first);
- an open_clip folder (``open_clip_config.json`` + weights): into a given architecture (``load_weights``), or as the
  architecture its config describes, through open_clip's own ``local-dir:`` loader (``load_open_clip_folder``);
- a transformers ``CLIPModel``/``SiglipModel`` folder (``config.json``): into a given open_clip architecture through
  ``clipforge.export.convert``'s exact converter, once the two architectures are found equal (``load_weights``), or
  as the transformers model itself, CLIP only, as ``clipforge eval`` runs it (``load_transformers_clip``).

Where it stands: above ``models`` and ``export``, below ``evaluation``, ``train`` and the CLI. ``models`` builds
architectures and imports nothing above itself, so it cannot reach the converter, which ``export`` owns with the
transformers formats; ``export`` writes folders and loads nothing from a path, so it needs nothing here. Neither
imports this module, so no import cycle runs through it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import pickle
from pathlib import Path
from typing import Any

import open_clip
import torch
import yaml

from clipforge.checkpoints import is_checkpoint, read_model_weights
from clipforge.models import BuiltModel, ModelConfig, build_model
from clipforge.models.builder import unreadable_weights
from clipforge.models.lora import has_lora, merged_state_dict

OPEN_CLIP_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # what init_from looks for
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth")  # what open_clip's local-dir: loader looks for
INIT_KEYS = ("init_from", "pretrained")  # model.* keys naming a run's initial weights (pretrained: earlier configs')


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


def read_checkpoint_config(checkpoint: str | Path) -> tuple[ModelConfig, dict[str, Any]]:
    """The architecture a checkpoint's weights fit (the ``model:`` section of its saved config.yaml), and the whole
    config as saved (``yaml.safe_load`` resolves no ``${...}``, so no environment value is read)."""
    path = Path(checkpoint)
    if model_kind(str(path)) != "clipforge":  # a run directory is refused with its latest checkpoint's path
        raise FileNotFoundError(f"{path}: not a clipforge checkpoint directory (no config.yaml)")
    file = path / "config.yaml"
    try:
        saved = yaml.safe_load(file.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"{file}: not YAML ({' '.join(str(exc).split())})") from None
    section = saved.get("model") if isinstance(saved, dict) else None
    if not isinstance(section, dict):
        raise ValueError(f"{file}: no model section")
    # The run's initial weights are not read: the checkpoint's own replace them, and where they came from may not
    # exist on the machine that reads the checkpoint.
    keys = {key: value for key, value in section.items() if key not in INIT_KEYS}
    unknown = sorted(set(keys) - {field.name for field in dataclasses.fields(ModelConfig)})
    if unknown:
        raise ValueError(f"{file}: unknown model keys {unknown}")
    try:
        return ModelConfig(**keys), saved
    except ValueError as exc:  # a value ModelConfig refuses, e.g. model.patch_dropout
        raise ValueError(f"{file}: {exc}") from None


def load_checkpoint_model(checkpoint: str | Path, device: torch.device | str = "cpu") -> BuiltModel:
    """A clipforge checkpoint's model: its saved architecture with its weights (loaded strictly), in eval mode."""
    model_cfg, _ = read_checkpoint_config(checkpoint)
    built = build_model(model_cfg, device)
    load_weights(built.model, str(checkpoint))
    built.model.eval()
    return built


def load_architecture(architecture: str, weights: str, device: torch.device | str = "cpu") -> BuiltModel:
    """An architecture by name (open_clip's, or our JSON config) with the local ``weights`` (anything ``load_weights``
    takes), in eval mode."""
    built = build_model(ModelConfig(name=architecture), device)
    load_weights(built.model, weights)
    built.model.eval()
    return built


def load_init_weights(model: torch.nn.Module, init_from: str | None) -> list[str]:
    """``model.init_from``'s weights into ``model`` as ``build_model`` made it (nothing when it is None); returns notes
    on anything not loaded as is. An error names the key."""
    if not init_from:
        return []
    try:
        return load_weights(model, init_from)
    except (FileNotFoundError, ValueError) as exc:  # CorruptCheckpoint is a ValueError and keeps its type
        raise type(exc)(f"model.init_from: {exc}") from exc


def load_weights(model: torch.nn.Module, source: str) -> list[str]:
    """Load local weights strictly into ``model``; returns notes on anything not loaded as is.

    ``source`` is a clipforge checkpoint directory, an open_clip weights file or folder (open_clip_config.json beside
    its weights), or a transformers CLIPModel/SiglipModel folder (config.json), which goes through
    ``clipforge.export``'s exact converter after its architecture is checked against the model's.
    """
    path = Path(source)
    if path.is_file():
        with _weights_only(path):
            open_clip.load_checkpoint(model, str(path), strict=True, weights_only=True)  # with its key conversions
        return []
    if not path.is_dir():
        raise FileNotFoundError(f"{source} does not exist")
    if (path / "open_clip_config.json").is_file():
        weights = [path / name for name in OPEN_CLIP_WEIGHT_FILES if (path / name).is_file()]
        if not weights:
            raise FileNotFoundError(f"{source}: open_clip folder without {' or '.join(OPEN_CLIP_WEIGHT_FILES)}")
        with _weights_only(weights[0]):
            open_clip.load_checkpoint(model, str(weights[0]), strict=True, weights_only=True)
        return []
    if (path / "config.json").is_file():
        from clipforge.export.convert import load_transformers_folder  # imported when needed: ~0.7 s of transformers

        return load_transformers_folder(model, path)
    if is_checkpoint(path):  # a clipforge checkpoint: its manifest is verified before anything loads
        weights = read_model_weights(path)
        if has_lora(weights) and not has_lora(model.state_dict()):  # a LoRA run's: its adapters folded in
            weights = merged_state_dict(weights)
        model.load_state_dict(weights, strict=True)
        return []
    raise FileNotFoundError(
        f"{source}: a directory with neither manifest.json (clipforge checkpoint), "
        "open_clip_config.json (open_clip folder) nor config.json (transformers folder)"
    )


@contextlib.contextmanager
def _weights_only(path: Path):
    """A pickle that ``torch.load(weights_only=True)`` refused (it could run code), or a file it could not read, as
    one line naming ``path``; nothing in it ran."""
    try:
        yield
    except (pickle.UnpicklingError, EOFError) as exn:
        raise unreadable_weights(path, exn) from None
    except RuntimeError as exn:
        if not str(exn).startswith("PytorchStreamReader"):  # the zip container is damaged; others are not ours
            raise
        raise unreadable_weights(path, exn) from None


def load_open_clip_folder(folder: str | Path, device: torch.device | str = "cpu") -> BuiltModel:
    """An open_clip folder as open_clip's ``local-dir:`` loader builds it (the architecture in its
    open_clip_config.json, the weights beside it), in eval mode."""
    folder = Path(folder)
    # open_clip random-initialises (with only a warning) when the folder has no weights it recognises.
    if not any(file.suffix in WEIGHT_SUFFIXES for file in folder.iterdir()):
        raise FileNotFoundError(f"{folder}: open_clip folder without weights ({', '.join(WEIGHT_SUFFIXES)})")
    name = f"local-dir:{folder}"
    pickled = next(file for file in sorted(folder.iterdir()) if file.suffix in WEIGHT_SUFFIXES)
    with _weights_only(pickled):  # open_clip loads with weights_only=True: a pickle that would run code is refused
        model, _, transform = open_clip.create_model_and_transforms(name, device=device)
    model_cfg = json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]
    preprocess_cfg = open_clip.get_model_preprocess_cfg(model)
    return BuiltModel(model.eval(), transform, preprocess_cfg, open_clip.get_tokenizer(name), name, model_cfg)


def load_transformers_clip(folder: str | Path, device: torch.device | str = "cpu") -> tuple[Any, Any]:
    """A transformers CLIP folder as transformers loads it: ``(CLIPModel in eval mode, its processor)``."""
    from transformers import AutoProcessor, CLIPModel

    folder = Path(folder)
    model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    if model_type != "clip":
        raise ValueError(
            f"{folder}: transformers model_type {model_type!r}; only CLIP folders (model_type clip) are supported"
        )
    # Without tokenizer files transformers does not fail: it maps every word to the unknown token.
    if not any((folder / name).is_file() for name in ("tokenizer.json", "vocab.json")):
        raise FileNotFoundError(
            f"{folder}: transformers CLIP folder without tokenizer files (tokenizer.json or vocab.json + merges.txt)"
        )
    model = CLIPModel.from_pretrained(str(folder)).to(device).eval()
    return model, AutoProcessor.from_pretrained(str(folder))
