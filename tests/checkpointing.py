"""Checkpoints for tests, written and read by the trainer's own ``Checkpointer`` over a model's restart state; and a
checkpoint's files read by torch.distributed.checkpoint itself, never through clipforge."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from clipforge.train.checkpoint import Checkpointer
from clipforge.train.optim import OptimConfig, build_scheduler
from clipforge.train.state import Piece, TrainState, restart_state


class Held:
    """A plain ``Stateful`` holding a dict (stands for a data position)."""

    def __init__(self, state: dict[str, Any] | None = None) -> None:
        self.state = dict(state or {})

    def state_dict(self) -> dict[str, Any]:
        return self.state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = dict(state)


def model_pieces(
    model: torch.nn.Module, step: int = 1, device: str = "cpu", data: dict[str, Any] | None = None, rank: int = 0
) -> dict[str, Piece]:
    """The restart state of ``model`` on ``rank`` with a fresh AdamW and schedule, as the trainer lists it."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    cfg = OptimConfig()
    return restart_state(
        model,
        optimizer,
        build_scheduler(cfg, optimizer, 10),
        optim_cfg=cfg,
        total_steps=10,
        train=TrainState(step),
        loader=Held(data),
        device=device,
        rank=rank,
    )


def save_checkpoint(
    directory: Path,
    model: torch.nn.Module,
    step: int = 1,
    config_yaml: str = "train: {}\n",
    rank: int = 0,
    device: str = "cpu",
    data: dict[str, Any] | None = None,
) -> Path:
    return Checkpointer(Path(directory), rank=rank).save(
        step, model_pieces(model, step, device, data, rank), config_yaml
    )


def load_checkpoint(path: Path, model: torch.nn.Module, rank: int = 0, device: str = "cpu") -> dict[str, Piece]:
    """Load ``path`` into ``model`` (and fresh pieces); returns the pieces, e.g. ``["data"].stateful.state``."""
    pieces = model_pieces(model, device=device, rank=rank)
    Checkpointer(Path(path).parent, rank=rank).load(path, pieces)
    return pieces


def dcp_contents(path: Path) -> dict[str, Any]:
    """Everything a checkpoint's DCP files hold (``{"model": {...}, "optimizer": {...}}``), whole tensors, read by
    ``torch.distributed.checkpoint.format_utils.dcp_to_torch_save``."""
    import warnings

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as scratch, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "torch.distributed is ... uninitialized, assuming ..."
        dcp_to_torch_save(path, Path(scratch) / "converted.pt")
        return torch.load(Path(scratch) / "converted.pt", weights_only=True)


def dcp_weights(path: Path) -> dict[str, torch.Tensor]:
    """The model weights of the checkpoint at ``path``, read from its DCP files by torch itself."""
    return dcp_contents(path)["model"]


def weights_file(checkpoint: Path, path: Path) -> Path:
    """The checkpoint's model weights (``dcp_weights``) written to ``path`` as a plain safetensors file."""
    from safetensors.torch import save_file

    save_file(dcp_weights(checkpoint), str(path))
    return path


def as_older_layout(path: Path, model: dict[str, torch.Tensor] | None = None, state: dict | None = None) -> None:
    """Make the checkpoint at ``path`` one of the single-file layout (with ``model``: its weights as
    ``model.safetensors``, the DCP files removed; with ``state``: that ``state.pt``), its manifest listing the
    files as they now are, without ``format``."""
    from safetensors.torch import save_file

    from clipforge.checkpoints import sha256

    if model is not None:
        for name in [".metadata", *(p.name for p in path.glob("*.distcp"))]:
            (path / name).unlink()
        save_file(model, str(path / "model.safetensors"))
    if state is not None:
        torch.save(state, path / "state.pt")
    files = {f.name: {"bytes": f.stat().st_size, "sha256": sha256(f)} for f in sorted(path.iterdir())}
    files.pop("manifest.json")
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({"step": manifest["step"], "files": files}))
