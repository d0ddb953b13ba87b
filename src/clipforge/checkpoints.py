"""The on-disk checkpoint format, read: a directory's manifest verified first, then its weights or shards.

The one reader behind resume, ``clipforge eval``, ``clipforge export`` and ``model.init_from`` (the writer,
and the rest of the restart state, are in ``clipforge.train.checkpoint``). A checkpoint directory holds
``manifest.json`` ``{"format": 2, "step": N, "files": {name: {"bytes": n, "sha256": hex}}}``, written last:
every file in the directory must be listed with its size and hash and every listed file must be there, so a
truncated, bit-flipped, half-copied or tampered checkpoint is refused with a ``CorruptCheckpoint`` naming the
file before anything is loaded.

The model and optimizer are ``torch.distributed.checkpoint`` (DCP) files: ``.metadata`` + one ``__R_0.distcp``
per rank that wrote, holding ``model.*`` and ``optimizer.*``. A checkpoint without ``format`` in its manifest
may instead hold the model as ``model.safetensors`` and the optimizer in ``state.pt`` (the single-file layout);
``read_weights`` gives a full model state dict from either, in one process, with no process group, and
``clipforge.train.checkpoint_read.upgrade`` reads the rest of such a checkpoint's restart state. DCP's ``.metadata``
is a pickle: it is read with an unpickler that admits only DCP's own metadata classes and torch's sizes, dtypes
and layouts, so a checkpoint cannot run code on load.
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

FORMAT = 2
"""``manifest.json``'s ``format`` for the layout ``clipforge.train.checkpoint`` writes; a manifest without one is of a
checkpoint that may need ``clipforge.train.checkpoint_read.upgrade`` (the single-file layout, older names in
state.pt)."""
DCP_FILES = (".metadata", "state.pt", "config.yaml", "manifest.json")
SINGLE_FILE_FILES = ("model.safetensors", "state.pt", "config.yaml", "manifest.json")
MODEL_PREFIX = "model."  # the model's entries among the DCP files' keys


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


def has_dcp_weights(path: str | Path) -> bool:
    """Whether the checkpoint at ``path`` holds its model as DCP files (else as ``model.safetensors``)."""
    return (Path(path) / ".metadata").is_file()


def manifest_format(path: str | Path) -> int:
    """The ``format`` of the checkpoint's manifest (read after ``verify``): 1 for a manifest without one; a format
    newer than ``FORMAT`` is a ``ValueError``."""
    found = int(json.loads((Path(path) / "manifest.json").read_text()).get("format", 1))
    if found > FORMAT:
        raise ValueError(f"checkpoint {path} is of format {found}; this clipforge reads formats up to {FORMAT}")
    return found


def check_complete(path: str | Path) -> None:
    """``CorruptCheckpoint`` unless the files of the directory's layout are all there: the single-file layout's where
    ``model.safetensors`` is, the DCP layout's otherwise."""
    path = Path(path)
    required = SINGLE_FILE_FILES if (path / "model.safetensors").is_file() else DCP_FILES
    missing = [name for name in required if not (path / name).is_file()]
    if missing:
        raise CorruptCheckpoint(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")


def is_complete(path: str | Path) -> bool:
    try:
        check_complete(path)
        return True
    except CorruptCheckpoint:
        return False


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
    """The DCP ``Metadata`` of a checkpoint, unpickled with only DCP's own classes allowed."""
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


def load_dcp(path: str | Path, state: dict[str, Any], into: str = "", **options: Any) -> None:
    """``torch.distributed.checkpoint.load`` of the checkpoint at ``path`` into ``state`` (its tensors are read in
    place; ``options``: ``process_group``, ``no_dist``), with the metadata of ``read_metadata`` and the non-tensor
    entries (the optimizer's parameter groups) unpickled only if ``torch.load(weights_only=True)`` admits them (DCP's
    own planner allows every class). A failure is one ``CorruptCheckpoint`` line (``into``: what ``state`` is) with
    the first failed rank's error (DCP's own exception carries every rank's traceback)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp.load(state, storage_reader=storage_reader(path), planner=_load_planner(), **options)
    except (Exception, CheckpointException) as exn:  # the storage layer raises its own types for a bad file
        failure = next(iter(getattr(exn, "failures", {}).values()), exn)
        failure = failure[0] if isinstance(failure, tuple) else failure  # (error, traceback) by rank
        raise CorruptCheckpoint(
            f"checkpoint {path}: its DCP files do not load{into} ({type(failure).__name__}: {failure})"
        ) from None


def _load_planner():
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class SafePlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value) -> None:
            try:
                torch.load(value, weights_only=True)
            except pickle.UnpicklingError:
                fqn = read_item.dest_index.fqn
                raise pickle.UnpicklingError(
                    f"{fqn} is not plain data (torch.load(weights_only=True) refuses it)"
                ) from None
            value.seek(0)
            super().load_bytes(read_item, value)  # what was just read as plain data: the same bytes, read again

    return SafePlanner()


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The full model state dict of a checkpoint directory (either layout), after ``verify``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    check_complete(path)
    verify(path)
    if has_dcp_weights(path):
        return _read_dcp_weights(path)
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


def _read_dcp_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every ``model.*`` tensor of a DCP checkpoint, whole, in this process (the shards of every rank)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = read_metadata(path)
    template = {
        key[len(MODEL_PREFIX) :]: torch.empty(entry.size, dtype=entry.properties.dtype)
        for key, entry in metadata.state_dict_metadata.items()
        if key.startswith(MODEL_PREFIX) and isinstance(entry, TensorStorageMetadata)
    }
    if not template:
        raise CorruptCheckpoint(f"checkpoint {path}: its DCP files hold no model tensors")
    state = {"model": template}
    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized, assuming ... a single process"
        warnings.simplefilter("ignore", UserWarning)
        load_dcp(path, state, no_dist=True)
    return state["model"]
