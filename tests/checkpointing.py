"""Checkpoints for tests, written and read by the trainer's own ``Checkpointer`` over a model's restart state."""

from __future__ import annotations

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
        model, optimizer, build_scheduler(cfg, optimizer, 10), cfg, 10, TrainState(step), Held(data), device, rank=rank
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
