"""Reading a checkpoint's restart state: what every layout gives (``Saved``: the sharded and replicated pieces, the
per-rank ones by rank), the readers of ``state.pt`` and the per-rank files, and ``upgrade``, the one place that knows
the layouts and names a checkpoint without a manifest ``format`` may have. ``clipforge.train.checkpoint`` writes the
one current layout and reads it with these.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from clipforge.checkpoints import CorruptCheckpoint, has_dcp_weights, read_weights
from clipforge.train.state import PER_RANK, Piece


@dataclass
class Saved:
    """A checkpoint's restart state as read: ``state`` by piece name (sharded and replicated pieces), ``ranks``
    each per-rank piece's states by rank; ``whole``: the sharded pieces are whole tensors whatever this run's
    strategy (``upgrade``), not in this run's form (what DCP files are read into)."""

    state: dict[str, Any]
    ranks: dict[str, list[dict[str, Any]]]
    whole: bool = False


def upgrade(path: Path, pieces: dict[str, Piece], read: Callable[[Path, dict[str, Piece]], Saved]) -> Saved:
    """The restart state of the checkpoint at ``path``, whose manifest has no ``format``, in the form this code's
    pieces load; ``read`` reads a DCP checkpoint (``Checkpointer._read``). Such a checkpoint may hold:

    * the model as ``model.safetensors`` and the optimizer in ``state.pt``, whole tensors (``Saved.whole``);
    * in ``state.pt``: the train step and the schedule under ``step`` and ``scheduler``; the optimizer numbered in
      its groups' order (``optimizer.state_dict()``), which must be this run's; the train state without samples
      and reference batch, whose global batch is then taken to be this run's;
    * in ``rng_rank{R}.pt``: every visible GPU's generator, a list under ``cuda``, of which this rank's device's
      entry is taken, if there is one.
    """
    if has_dcp_weights(path):
        saved = read(path, pieces)
    else:
        saved = Saved({**read_state(path), "model": read_weights(path)}, read_ranks(path, pieces), whole=True)
    state = saved.state
    if "train" not in state and "step" in state:
        state["train"] = {"step": state.pop("step")}
    if "schedule" not in state and "scheduler" in state:
        state["schedule"] = state.pop("scheduler")
    groups = state.get("optimizer", {}).get("param_groups", [])
    if "optimizer" in pieces and any(isinstance(index, int) for group in groups for index in group["params"]):
        state["optimizer"] = pieces["optimizer"].stateful.keyed_by_name(state["optimizer"])
    if "train" in pieces and "train" in state:
        batch = pieces["train"].stateful.clock.global_batch
        state["train"] = {"samples": int(state["train"]["step"]) * batch, "reference_batch": batch, **state["train"]}
    if "rng" in pieces:
        device = pieces["rng"].stateful.device
        saved.ranks["rng"] = [_own_generator(generators, device) for generators in saved.ranks.get("rng", [])]
    return saved


def _own_generator(generators: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """``generators`` with, for a GPU ``device``, the entry of its index in the ``cuda`` list as ``cuda_device``."""
    every_gpu = generators.get("cuda")
    if every_gpu is None:
        return generators
    own = {key: value for key, value in generators.items() if key != "cuda"}
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index < len(every_gpu):
            own["cuda_device"] = every_gpu[index]
    return own


def read_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as exn:  # verified, yet unreadable (or refused by weights_only): never load it otherwise
        raise CorruptCheckpoint(f"checkpoint {path}: state.pt does not load with weights_only=True ({exn})") from None


def read_ranks(path: Path, pieces: dict[str, Piece]) -> dict[str, list[dict[str, Any]]]:
    """Every per-rank piece's saved states, by rank (rank 0 up to the first rank with none)."""
    ranks: dict[str, list[dict[str, Any]]] = {}
    for name in (name for name, piece in pieces.items() if piece.kind == PER_RANK):
        states = ranks[name] = []
        while (found := _read_per_rank(path, name, len(states))) is not None:
            states.append(found)
    return ranks


def _read_per_rank(path: Path, name: str, rank: int) -> dict[str, Any] | None:
    if (path / f"{name}_rank{rank}.json").is_file():
        return json.loads((path / f"{name}_rank{rank}.json").read_text())
    if (path / f"{name}_rank{rank}.pt").is_file():
        try:
            return torch.load(path / f"{name}_rank{rank}.pt", map_location="cpu", weights_only=True)
        except Exception as exn:
            raise CorruptCheckpoint(
                f"checkpoint {path}: {name}_rank{rank}.pt does not load with weights_only=True ({exn})"
            ) from None
    return None
