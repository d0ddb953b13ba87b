"""The on-disk checkpoint format, read: a directory's manifest verified first, then its weights or shards.

The one reader behind resume, ``clipforge eval``, ``clipforge export`` and ``model.init_from`` (the writer,
and the rest of the restart state, are in ``clipforge.train.checkpoint``). A checkpoint directory holds
``manifest.json`` ``{"step": N, "files": {name: {"bytes": n, "sha256": hex}}}``, written last: every file in
the directory must be listed with its size and hash and every listed file must be there, so a truncated,
bit-flipped, half-copied or tampered checkpoint is refused with a ``CorruptCheckpoint`` naming the file
before anything is loaded.

Two layouts: sharded (``torch.distributed.checkpoint``: ``.metadata`` + one ``__R_0.distcp`` per rank that
wrote, holding ``model.*`` and ``optimizer.*``), written since FSDP; and single-file (``model.safetensors`` +
``state.pt``), written before it, still read. ``read_weights`` gives a full model state dict from either, in one
process, with no process group. DCP's ``.metadata`` is a pickle: it is read with an unpickler that admits only
DCP's own metadata classes and torch's sizes, dtypes and layouts, so a checkpoint cannot run code on load.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

LEGACY_FILES = ("model.safetensors", "state.pt", "config.yaml", "manifest.json")  # the single-file layout
SHARDED_FILES = (".metadata", "state.pt", "config.yaml", "manifest.json")
MODEL_PREFIX = "model."  # the model's entries among the sharded state's keys


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
    if not isinstance(files, dict) or not all(
        isinstance(entry, dict) and {"bytes", "sha256"} <= set(entry) for entry in files.values()
    ):
        raise CorruptCheckpoint(
            f"checkpoint {path}: manifest.json has no valid 'files' entry ({{name: {{bytes, sha256}}}})"
        )
    present = {file.name for file in path.iterdir() if file.is_file() and file.name != "manifest.json"}
    unlisted = sorted(present - set(files))
    if unlisted:
        raise CorruptCheckpoint(f"checkpoint {path}: {unlisted[0]} is not listed in manifest.json")
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            raise CorruptCheckpoint(f"checkpoint {path}: {name} is missing")
        if file.stat().st_size != expected["bytes"]:
            raise CorruptCheckpoint(
                f"checkpoint {path}: {name} has {file.stat().st_size} bytes, the manifest says "
                f"{expected['bytes']} (truncated?)"
            )
        if sha256(file) != expected["sha256"]:
            raise CorruptCheckpoint(f"checkpoint {path}: {name} does not match its SHA-256 in manifest.json")


def with_process_umask(*paths: str | Path) -> None:
    """Give ``paths`` the mode the process umask gives any new file (0644 under the usual 022): safetensors, and so
    transformers' ``save_pretrained``, creates its files 0600, unreadable to the rest of a team sharing them."""
    mask = os.umask(0)
    os.umask(mask)
    for path in paths:
        os.chmod(path, 0o666 & ~mask)


def is_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` looks like a clipforge checkpoint directory (its manifest, weights or shards are there)."""
    path = Path(path)
    return path.is_dir() and any(
        (path / name).is_file() for name in ("manifest.json", "model.safetensors", ".metadata")
    )


def is_sharded(path: str | Path) -> bool:
    return (Path(path) / ".metadata").is_file()


def check_complete(path: str | Path) -> None:
    """``CorruptCheckpoint`` unless the files of the directory's layout are all there."""
    path = Path(path)
    required = SHARDED_FILES if is_sharded(path) else LEGACY_FILES
    missing = [name for name in required if not (path / name).is_file()]
    if missing:
        raise CorruptCheckpoint(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's metadata classes, torch sizes, dtypes and layouts, paths: nothing that can run code."""

    SAFE_MODULES = ("torch.distributed.checkpoint.metadata",)
    SAFE = {
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("collections", "OrderedDict"),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
        ("pathlib", "Path"),
        ("pathlib._local", "PosixPath"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (
            module in self.SAFE_MODULES
            or (module, name) in self.SAFE
            or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")


def read_metadata(path: str | Path):
    """The DCP ``Metadata`` of a sharded checkpoint, unpickled with only DCP's own classes allowed."""
    path = Path(path)
    try:
        with open(path / ".metadata", "rb") as stream:
            return _MetadataUnpickler(stream).load()
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ValueError) as exn:
        raise CorruptCheckpoint(f"checkpoint {path}: .metadata does not load safely ({exn})") from None


def storage_reader(path: str | Path):
    """A ``FileSystemReader`` for ``path`` whose metadata comes from ``read_metadata``."""
    from torch.distributed.checkpoint import FileSystemReader

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            metadata = read_metadata(path)
            if getattr(metadata, "storage_meta", None) is not None:
                metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(path))


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The full model state dict of a checkpoint directory (either layout), after ``verify``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    check_complete(path)
    verify(path)
    if is_sharded(path):
        return _read_sharded_weights(path)
    try:
        return load_file(str(path / "model.safetensors"))
    except (SafetensorError, OSError) as exn:  # listed with the right hash, yet unreadable: written wrong
        raise CorruptCheckpoint(f"checkpoint {path}: model.safetensors does not load ({exn})") from None


TRAINING_ONLY_PREFIX = "objectives."
"""Parameters of the objectives attached to the model while it trains (a head, a decoder): in the checkpoint, never
in the model that is evaluated or exported (``clipforge.train.parallel.attach_objectives``)."""


def read_model_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The model's own state dict from a checkpoint: ``read_weights`` without the training-only objectives."""
    return {key: value for key, value in read_weights(path).items() if not key.startswith(TRAINING_ONLY_PREFIX)}


def _read_sharded_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every ``model.*`` tensor of a DCP checkpoint, whole, in this process (the shards of every rank)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = read_metadata(path)
    template = {
        key[len(MODEL_PREFIX) :]: torch.empty(entry.size, dtype=entry.properties.dtype)
        for key, entry in metadata.state_dict_metadata.items()
        if key.startswith(MODEL_PREFIX) and isinstance(entry, TensorStorageMetadata)
    }
    if not template:
        raise CorruptCheckpoint(f"checkpoint {path}: its shards hold no model tensors")
    state = {"model": template}
    try:
        with warnings.catch_warnings():  # "torch.distributed is ... uninitialized, assuming ... a single process"
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, storage_reader=storage_reader(path), no_dist=True)
    except Exception as exn:  # the storage layer raises its own types for a bad shard
        raise CorruptCheckpoint(f"checkpoint {path}: its shards do not load ({type(exn).__name__}: {exn})") from None
    return state["model"]
