"""Reading a clipforge checkpoint directory: its manifest verified first, then its weights.

The one reader behind resume, ``clipforge eval``, ``clipforge export`` and ``model.init_from`` (the writer,
and the rest of the restart state, are in ``clipforge.train.checkpoint``). A checkpoint directory holds
``manifest.json`` ``{"step": N, "files": {name: {"bytes": n, "sha256": hex}}}``, written last: every file in
the directory must be listed with its size and hash and every listed file must be there, so a truncated,
bit-flipped, half-copied or tampered checkpoint is refused with a ``CorruptCheckpoint`` naming the file
before anything is loaded.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

REQUIRED_FILES = ("model.safetensors", "state.pt", "config.yaml", "manifest.json")


class CorruptCheckpoint(ValueError):
    """A checkpoint's files do not match its manifest, or cannot be read."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(path: str | Path) -> None:
    """Raise ``CorruptCheckpoint`` unless the manifest lists exactly the directory's files, each with its size and
    SHA-256."""
    path = Path(path)
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError) as exn:
        raise CorruptCheckpoint(f"checkpoint {path}: unreadable manifest.json ({exn})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(isinstance(entry, dict) and {"bytes", "sha256"} <= set(entry)
                                              for entry in files.values()):
        raise CorruptCheckpoint(f"checkpoint {path}: manifest.json has no valid 'files' entry ({{name: {{bytes, "
                                f"sha256}}}})")
    present = {file.name for file in path.iterdir() if file.is_file() and file.name != "manifest.json"}
    unlisted = sorted(present - set(files))
    if unlisted:
        raise CorruptCheckpoint(f"checkpoint {path}: {unlisted[0]} is not listed in manifest.json")
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            raise CorruptCheckpoint(f"checkpoint {path}: {name} is missing")
        if file.stat().st_size != expected["bytes"]:
            raise CorruptCheckpoint(f"checkpoint {path}: {name} has {file.stat().st_size} bytes, the manifest says "
                                    f"{expected['bytes']} (truncated?)")
        if sha256(file) != expected["sha256"]:
            raise CorruptCheckpoint(f"checkpoint {path}: {name} does not match its SHA-256 in manifest.json")


def is_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` looks like a clipforge checkpoint directory (its manifest or weights file is there)."""
    path = Path(path)
    return path.is_dir() and any((path / name).is_file() for name in ("manifest.json", "model.safetensors"))


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The model state dict of a checkpoint directory, after ``verify``; nothing is unpickled (safetensors)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
    if missing:
        raise CorruptCheckpoint(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    verify(path)
    try:
        return load_file(str(path / "model.safetensors"))
    except (SafetensorError, OSError) as exn:  # listed with the right hash, yet unreadable: written wrong
        raise CorruptCheckpoint(f"checkpoint {path}: model.safetensors does not load ({exn})") from None
