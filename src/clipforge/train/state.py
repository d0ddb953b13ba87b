"""Everything a restart needs, as ``Stateful`` pieces (``state_dict`` / ``load_state_dict``) the checkpointer iterates.

``restart_state`` lists them, one line each, with how each is stored:

* ``SHARDED``: the model and the optimizer. Under FSDP every rank writes its own shard through
  ``torch.distributed.checkpoint``; under DDP (or one process) the replicas are identical, so rank 0 writes
  ``model.safetensors`` and the optimizer goes into ``state.pt``.
* ``REPLICATED``: the same on every rank (the schedule, the train step, the fp16 scaler, the negative queue):
  rank 0 writes them into ``state.pt``.
* ``PER_RANK``: each rank's own (its data position, its random generators): ``NAME_rank{R}.pt``.

Adding a piece of restart state is one line in ``restart_state``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from clipforge.train.optim import OptimConfig, load_schedule_state
from clipforge.train.parallel import is_sharded, unwrap

SHARDED, REPLICATED, PER_RANK = "sharded", "replicated", "per_rank"


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class Piece:
    kind: str
    stateful: Stateful
    required: bool = True  # False: a checkpoint without it resumes with this piece as it is (the fp16 scaler)


@dataclass
class TrainState:
    """The loop's own position."""

    step: int = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])


class ModelState:
    """The model's weights: full (``unwrap(model).state_dict()``) for DDP, this rank's shards (DTensors) for FSDP."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        if is_sharded(self.model):
            from torch.distributed.checkpoint.state_dict import get_model_state_dict

            return get_model_state_dict(self.model)
        return {k: v.detach().cpu().contiguous() for k, v in unwrap(self.model).state_dict().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if is_sharded(self.model):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            full = not any(type(v).__name__ == "DTensor" for v in state.values())  # a DDP checkpoint into FSDP
            set_model_state_dict(self.model, state, options=StateDictOptions(full_state_dict=full, strict=True))
        else:
            unwrap(self.model).load_state_dict(state, strict=True)


class OptimizerState:
    """AdamW's moments: ``optimizer.state_dict()`` for DDP; keyed by parameter name and sharded for FSDP."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        if is_sharded(self.model):
            from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

            return get_optimizer_state_dict(self.model, self.optimizer)
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            if is_sharded(self.model):
                from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

                set_optimizer_state_dict(self.model, self.optimizer, state)
            else:
                self.optimizer.load_state_dict(state)
        except (ValueError, KeyError) as exc:  # torch: "... parameter group that doesn't match the size of ..."
            raise ValueError(
                f"its optimizer state does not fit this run's parameter groups ({exc}). Checkpoints "
                "written before clipforge decayed the embeddings as OpenCLIP does resume with "
                "optim.weight_decay_embeddings=false; otherwise the model, its locked towers or the "
                "weight-decay setting differ from the run that wrote it"
            ) from exc


class ScheduleState:
    """The learning-rate schedule's position; the rate itself follows this run's config (``load_schedule_state``)."""

    def __init__(self, scheduler, optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> None:
        self.scheduler, self.optimizer, self.cfg, self.total_steps = scheduler, optimizer, cfg, total_steps

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_schedule_state(self.scheduler, self.optimizer, state, self.cfg, self.total_steps)


class RNGState:
    """This rank's generators: torch's CPU one, Python's, and its own GPU's when it trains on one."""

    def __init__(self, device: str | torch.device) -> None:
        self.device = torch.device(device)

    def state_dict(self) -> dict[str, Any]:
        """Other GPUs' generators belong to other ranks: saving them all made a resume with fewer visible GPUs
        fail, and a CPU rank on a GPU host would initialise CUDA just to read them."""
        state = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if self.device.type == "cuda":
            state["cuda_device"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The CUDA generator only onto a GPU device. Older checkpoints hold every visible GPU's state as a list
        under ``cuda``: the entry of this device's index is taken, if there is one."""
        torch.set_rng_state(state["torch"])
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        if self.device.type != "cuda":
            return
        cuda_state = state.get("cuda_device")
        if cuda_state is None and "cuda" in state:
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            cuda_state = state["cuda"][index] if index < len(state["cuda"]) else None
        if cuda_state is None:
            import logging

            logging.getLogger(__name__).warning(
                "the checkpoint holds no CUDA generator state for %s; it keeps this run's seed", self.device
            )
            return
        torch.cuda.set_rng_state(cuda_state, self.device)


def restart_state(
    model,
    optimizer,
    scheduler,
    optim_cfg: OptimConfig,
    total_steps: int,
    train: TrainState,
    loader,
    device: str,
    scaler=None,
    queue=None,
) -> dict[str, Piece]:
    """Every piece of restart state, in loading order (the schedule after the optimizer, whose groups it sets)."""
    pieces = {
        "model": Piece(SHARDED, ModelState(model)),
        "optimizer": Piece(SHARDED, OptimizerState(model, optimizer)),
        "schedule": Piece(REPLICATED, ScheduleState(scheduler, optimizer, optim_cfg, total_steps)),
        "train": Piece(REPLICATED, train),
        "data": Piece(PER_RANK, loader),
        "rng": Piece(PER_RANK, RNGState(device)),
    }
    if scaler is not None:
        pieces["scaler"] = Piece(REPLICATED, scaler, required=False)
    if queue is not None:
        pieces["queue"] = Piece(REPLICATED, queue)
    return pieces
