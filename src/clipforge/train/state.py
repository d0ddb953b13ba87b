"""Everything a restart needs, as ``Stateful`` pieces (``state_dict`` / ``load_state_dict``) the checkpointer iterates.

``restart_state`` lists them, one line each, with how each is stored:

* ``SHARDED``: the model and the optimizer, written through ``torch.distributed.checkpoint`` by every rank:
  under FSDP each rank its own shards, under DDP (or one process) rank 0 the replicas, which are identical.
* ``REPLICATED``: the same on every rank (the schedule, the train step, the fp16 scaler, the objectives' state):
  rank 0 writes them into ``state.pt``.
* ``PER_RANK``: each rank's own (its data position, its random generators): ``NAME_rank{R}.pt``. On load, a piece
  with ``load_state_dicts`` is given every rank's saved state, by rank, and picks its own or, when the world size
  changed, makes its state from all of them (the data position is redistributed over the new ranks); any other
  takes its own rank's.

Adding a piece of restart state is one line in ``restart_state``.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from clipforge.train.optim import OptimConfig, SampleClock, load_schedule_state
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
    """The loop's own position: optimizer steps taken, and (``clock``) samples trained on and the reference global
    batch the configured step counts are in (see ``clipforge.train.optim``)."""

    step: int = 0
    clock: SampleClock = field(default_factory=SampleClock)

    @property
    def samples(self) -> int:
        return self.clock.samples(self.step)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "samples": self.samples, "reference_batch": self.clock.reference_batch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.clock.base_step = self.step
        self.clock.base_samples = int(state["samples"])
        self.clock.reference_batch = int(state["reference_batch"])


class ModelState:
    """The model's weights: whole tensors for DDP or one process, this rank's shards (DTensors) for FSDP.

    ``load_state_dict`` takes them in the form ``state_dict`` gives (what a DCP checkpoint is read into) or, with
    ``whole``, every tensor entire whatever the strategy (a single-file checkpoint's, ``upgrade``d)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        if is_sharded(self.model):
            from torch.distributed.checkpoint.state_dict import get_model_state_dict

            return get_model_state_dict(self.model)
        return dict(unwrap(self.model).state_dict())

    def load_state_dict(self, state: dict[str, Any], whole: bool = False) -> None:
        if is_sharded(self.model):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(self.model, state, options=StateDictOptions(full_state_dict=whole, strict=True))
        else:
            unwrap(self.model).load_state_dict(state, strict=True)


class OptimizerState:
    """AdamW's moments, keyed by parameter name (``get_optimizer_state_dict``'s form): whole tensors for DDP or one
    process, this rank's shards (DTensors) for FSDP, so that a checkpoint written at one world size or strategy
    loads at another (``torch.distributed.checkpoint`` reads the saved tensors into this run's shards or whole
    tensors). ``load_state_dict(..., whole=True)`` takes whole tensors under either strategy, as ``ModelState``."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        """Whole tensors from ``optimizer.state_dict()`` itself where they are whole: ``get_optimizer_state_dict``
        would give an optimizer that has taken no step yet state of a step it never took."""
        if is_sharded(self.model):
            return self.template()
        return self.keyed_by_name(self.optimizer.state_dict())

    def template(self, saved: set[str] | None = None) -> dict[str, Any]:
        """What a checkpoint's DCP files are read into: this optimizer's state in ``get_optimizer_state_dict``'s form,
        its tensors made first (a zero-gradient, zero-rate step) if the optimizer has taken no step yet; with
        ``saved`` (the checkpoint's keys, ``state.NAME.exp_avg``), only the parameters' entries it holds."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        state = get_optimizer_state_dict(self.model, self.optimizer)
        if saved is not None:
            kept = {n: {k: v for k, v in e.items() if f"state.{n}.{k}" in saved} for n, e in state["state"].items()}
            state["state"] = {name: entry for name, entry in kept.items() if entry}
        return state

    def load_state_dict(self, state: dict[str, Any], whole: bool = False) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        try:
            if is_sharded(self.model):
                options = StateDictOptions(full_state_dict=whole)
                set_optimizer_state_dict(self.model, self.optimizer, state, options=options)
            else:
                self.optimizer.load_state_dict(self._keyed_by_number(state))
        except (ValueError, KeyError) as exc:  # torch: "... parameter group that doesn't match the size of ..."
            raise ValueError(
                f"its optimizer state does not fit this run's parameter groups ({exc}). A checkpoint whose "
                "optimizer exempts the embeddings from weight decay resumes with optim.weight_decay_embeddings="
                "false; otherwise the model, its locked towers or the weight-decay setting differ from the run "
                "that wrote it"
            ) from exc

    def parameter_names(self) -> list[str]:
        """The optimizer's parameters' names in its groups' order (the numbering of ``optimizer.state_dict()``)."""
        names = {id(parameter): name for name, parameter in unwrap(self.model).named_parameters()}
        return [names[id(parameter)] for group in self.optimizer.param_groups for parameter in group["params"]]

    def keyed_by_name(self, state: dict[str, Any]) -> dict[str, Any]:
        """``optimizer.state_dict()``'s form (parameters numbered in group order) keyed by parameter name instead;
        the numbering is this run's groups', which must be those of the optimizer that made ``state``."""
        ordered = self.parameter_names()
        saved = [index for group in state["param_groups"] for index in group["params"]]
        if len(saved) != len(ordered):
            raise ValueError(f"{len(saved)} parameters in the checkpoint's groups, {len(ordered)} in this run's")
        name_of = dict(zip(saved, ordered, strict=True))
        return {
            "state": {name_of[index]: entry for index, entry in state["state"].items()},
            "param_groups": [{**g, "params": [name_of[i] for i in g["params"]]} for g in state["param_groups"]],
        }

    def _keyed_by_number(self, state: dict[str, Any]) -> dict[str, Any]:
        """The inverse of ``keyed_by_name``, for ``optimizer.load_state_dict`` (which, unlike
        ``set_optimizer_state_dict``, makes no zero-rate step to create an empty optimizer's tensors)."""
        number = {name: index for index, name in enumerate(self.parameter_names())}
        missing = [name for group in state["param_groups"] for name in group["params"] if name not in number]
        if missing:
            raise ValueError(f"the checkpoint's optimizer has parameters this run's has not: {missing[:3]}")
        return {
            "state": {number[name]: entry for name, entry in state["state"].items()},
            "param_groups": [{**g, "params": [number[n] for n in g["params"]]} for g in state["param_groups"]],
        }


class ScheduleState:
    """The learning-rate schedule's position; the rate itself follows this run's config (``load_schedule_state``)."""

    def __init__(
        self,
        scheduler,
        optimizer: torch.optim.Optimizer,
        cfg: OptimConfig,
        total_steps: int,
        clock: SampleClock | None = None,
    ) -> None:
        self.scheduler, self.optimizer, self.cfg, self.total_steps = scheduler, optimizer, cfg, total_steps
        self.clock = clock

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_schedule_state(self.scheduler, self.optimizer, state, self.cfg, self.total_steps, self.clock)


class RNGState:
    """This rank's generators: torch's CPU one, Python's, and its own GPU's when it trains on one."""

    def __init__(self, device: str | torch.device, rank: int = 0) -> None:
        self.device, self.rank = torch.device(device), rank

    def load_state_dicts(self, states: list[dict[str, Any]]) -> None:
        """This rank's saved generators; a rank the checkpoint's run did not have keeps its own seeding (seed +
        rank), which no saved rank shares."""
        if self.rank < len(states):
            self.load_state_dict(states[self.rank])
        else:
            logging.getLogger(__name__).info("rank %d: no saved generators (the checkpoint had fewer ranks)", self.rank)

    def state_dict(self) -> dict[str, Any]:
        """Other GPUs' generators belong to other ranks: saving them all made a resume with fewer visible GPUs
        fail, and a CPU rank on a GPU host would initialise CUDA just to read them."""
        state = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if self.device.type == "cuda":
            state["cuda_device"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The CUDA generator only onto a GPU device (a GPU run resumed on a CPU has none to give it to)."""
        torch.set_rng_state(state["torch"])
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        if self.device.type != "cuda":
            return
        cuda_state = state.get("cuda_device")
        if cuda_state is None:
            logging.getLogger(__name__).warning(
                "the checkpoint holds no CUDA generator state for %s; it keeps this run's seed", self.device
            )
            return
        torch.cuda.set_rng_state(cuda_state, self.device)


def restart_state(
    model,
    optimizer,
    scheduler,
    *,
    optim_cfg: OptimConfig,
    total_steps: int,
    train: TrainState,
    loader,
    device: str,
    scaler=None,
    objective_pieces: dict[str, Stateful] | None = None,
    rank: int = 0,
) -> dict[str, Piece]:
    """Every piece of restart state, in loading order (the schedule after the optimizer, whose groups it sets, and
    after the train state, whose clock places it). ``objective_pieces``: the objectives' own state
    (``Objectives.restart_pieces``: a negative queue, a head), the same on every rank."""
    pieces = {
        "model": Piece(SHARDED, ModelState(model)),
        "optimizer": Piece(SHARDED, OptimizerState(model, optimizer)),
        "train": Piece(REPLICATED, train),
        "schedule": Piece(REPLICATED, ScheduleState(scheduler, optimizer, optim_cfg, total_steps, train.clock)),
        "data": Piece(PER_RANK, loader),
        "rng": Piece(PER_RANK, RNGState(device, rank)),
    }
    if scaler is not None:
        pieces["scaler"] = Piece(REPLICATED, scaler, required=False)
    for key, stateful in (objective_pieces or {}).items():
        if key in pieces:
            raise ValueError(f"an objective keeps restart state under {key!r}, a name the trainer uses")
        pieces[key] = Piece(REPLICATED, stateful)
    return pieces
