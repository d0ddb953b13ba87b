"""The objective contract: a loss term declares what it needs and returns named terms.

An ``Objective`` is an ``nn.Module`` with:

- ``batch_fields``: the batch fields it reads besides ``images`` and ``texts``. Each is a name the loader knows
  (``caption_ids``, ``image_ids``, ``teacher_image``, ``teacher_text``, ``regions``), a ``RegionsField`` (the
  grounded regions with its own cap on their number), or a ``SampleField``: a name with a picklable function the
  data workers apply to every decoded sample. The loader emits exactly the union of what the configured objectives
  declare, so a field nobody asks for costs nothing.
- ``model_outputs``: what it reads from the model besides the pooled, L2-normalised ``image_features`` and
  ``text_features``, ``logit_scale`` and ``logit_bias``: ``image_tokens`` (the image tower's unpooled output tokens,
  (B, N, width), before the final norm and projection) or ``text_tokens``. The model computes them only when an
  objective asks (``clipforge.models.outputs``).
- ``forward(outputs, batch) -> {name: loss term}``: fp32 scalars, already weighted; their sum is minimised and each
  is logged as ``train/NAME``. ``outputs`` holds the model's outputs (features in fp32), ``batch`` the batch on the
  device.
- ``bind(model)``, once the model is ready to train, for an objective that copies or reads it (a momentum
  encoder, an EMA teacher).
- ``before_forward(batch)`` and ``after_update(applied)``: optional hooks around the step (a momentum encoder's
  keys before the model's forward; its EMA and the queue's enqueue after an applied update). ``applied`` is a bool
  tensor on the device.
- ``train_flops(image_tokens, image_trainable)``: the model FLOPs of one sample's forward and backward through the
  objective's own modules (a decoder), for MFU and ``--dry-run`` (``clipforge.train.flops``); 0 by default, for
  objectives whose arithmetic is negligible beside the towers'.
- ``name``: what the step-time breakdown calls its forward, ``loss/NAME`` (by default its term names' common prefix).
- state: its parameters and buffers (a head, a decoder) are attached to the model under ``objectives.`` while it
  trains (``clipforge.train.parallel.attach_objectives``), so the optimizer, DDP or FSDP and the checkpoint treat
  them as the model's, and every export leaves them out; other state (a queue and its write position) is named by
  ``restart_pieces()`` and checkpointed beside the model, the same on every rank.

``Objectives`` is the configured set: it sums the terms, answers what the set needs, and runs the hooks. A new
objective is one module that subclasses ``Objective`` plus one line in ``clipforge.losses.REGISTRY``; it is then
configured as ``loss.terms: [{name: NAME, weight: W, options: {...}}]``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch.distributed.device_mesh import DeviceMesh

from clipforge.distributed import mesh_group

MODEL_OUTPUTS = ("image_tokens", "text_tokens")
"""What an objective may ask of the model besides the pooled features (``clipforge.models.outputs`` makes them)."""

LOADER_FIELDS = ("caption_ids", "image_ids", "teacher_image", "teacher_text", "regions")
"""Batch fields the loader itself knows how to make (``clipforge.data.pipeline``)."""


@dataclass(frozen=True)
class RegionsField:
    """The grounded regions of each sample (``clipforge.data.regions``): its ``KEY.regions.json`` boxes moved into the
    training crop and its region captions tokenised, at most ``max_regions`` a sample. The batch holds
    ``region_boxes`` float32 (B, R, 4) as (x0, y0, x1, y1) in [0, 1] of the crop, ``region_captions`` int64
    (B, R, L) and ``region_count`` int64 (B,); a sample without the member (web data) has count 0."""

    max_regions: int = 8
    name: str = "regions"


@dataclass(frozen=True)
class SampleField:
    """A batch field made in the data workers: ``function(image, caption)`` for each decoded sample, with the image
    a uint8 tensor (3, H, W) after the training transform and the caption a string; it returns a float32 tensor of
    a fixed shape, and the batch holds them stacked, (B, *shape). The function must be picklable (module level).
    ``shape``, where the objective knows it, is that per-sample shape: ``clipforge plan`` sizes the field from it
    (without it a run with the field cannot be planned)."""

    name: str
    function: Callable[[torch.Tensor, str], torch.Tensor]
    shape: tuple[int, ...] | None = None


@dataclass(frozen=True)
class ObjectiveContext:
    """The runtime objects an objective may need, given by the trainer at build time.

    ``mesh`` is the run's device mesh (``clipforge.distributed.build_mesh``): an objective's collectives go through
    ``group``, the mesh's process group, and ``rank`` and ``world_size`` are this process's place in it (checked
    against the mesh). Without a mesh (one process, or a caller outside a run) they use the default group.
    ``model`` is the plain model as built (for reading shapes when making a head; copies are taken in ``bind``);
    ``autocast`` returns the step's autocast context; ``step`` the number of optimizer steps taken so far;
    ``total_steps`` the run's (``train.steps``; 0: unknown), for a schedule over training (an EMA momentum);
    ``teacher`` is the online distillation teacher (``loss.distill_model``), if any."""

    rank: int = 0
    world_size: int = 1
    mesh: DeviceMesh | None = None
    device: str = "cpu"
    model: torch.nn.Module | None = None
    autocast: Callable[[], Any] | None = None
    step: Callable[[], int] | None = None
    total_steps: int = 0
    teacher: Any = None
    teacher_temperature: float | None = None

    def __post_init__(self) -> None:
        if self.mesh is not None and (self.mesh.size(), self.mesh.get_local_rank()) != (self.world_size, self.rank):
            raise ValueError(
                f"ObjectiveContext: rank {self.rank} of {self.world_size} is not this process's place in its mesh "
                f"(rank {self.mesh.get_local_rank()} of {self.mesh.size()})"
            )

    @property
    def group(self):
        """The process group of the objectives' collectives: the mesh's (None, the default group, without one)."""
        return mesh_group(self.mesh)


def read_options(options_class: type, options: Mapping[str, Any], objective: str):
    """``options_class(**options)`` (a dataclass of an objective's options), an unknown option refused by name."""
    known = {field.name for field in fields(options_class)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown options {unknown} ({objective} takes {', '.join(sorted(known))})")
    return options_class(**options)


class Objective(torch.nn.Module):
    """One loss term (or a few that belong together); see the module docstring for the contract."""

    batch_fields: tuple[str | SampleField, ...] = ()
    model_outputs: tuple[str, ...] = ()
    runs_towers: bool = False
    """True for an objective that runs the model's towers itself in ``forward`` (the self-distillation's student
    views): GradCache, which caches the towers' outputs and re-runs them, cannot take it."""

    @property
    def name(self) -> str:
        """What the step-time breakdown calls it (``loss/NAME``): its term names' common prefix (``locca`` for
        ``locca_caption``, ``locca_referring``, ...), else its first term's name; an objective may set its own."""
        names = tuple(getattr(self, "term_names", ())) or (type(self).__name__.lower(),)
        prefix = names[0]
        for other in names[1:]:
            while not other.startswith(prefix):
                prefix = prefix[:-1]
        return prefix.rstrip("_") or names[0]

    def bind(self, model: torch.nn.Module) -> None:
        """Called once the model is ready to train (on its device, before any wrapper): an objective that copies or
        reads the model (a momentum encoder, an EMA teacher) takes it here. ``model`` is the plain module whose
        parameters the optimizer updates."""

    def before_forward(self, batch: Mapping[str, torch.Tensor]) -> None:
        """Called before the model's forward on every training batch."""

    def forward(
        self, outputs: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def after_update(self, applied: torch.Tensor) -> None:
        """Called after the optimizer step; ``applied`` is False when the update was skipped (non-finite)."""

    def train_flops(self, image_tokens: int, image_trainable: bool = True) -> float:
        """Model FLOPs of one sample's forward and backward through the objective's own modules, given the number of
        image tokens the tower gives it and whether they need a gradient (a locked tower's do not); they are charged
        with the towers' for MFU (``clipforge.train.flops``). 0: nothing worth counting."""
        return 0.0

    @property
    def needs_host_sync(self) -> bool:
        """Whether ``after_update`` reads ``applied`` on the host (the step then cannot keep its skip on the device)."""
        return False

    def restart_pieces(self) -> dict[str, Any]:
        """Restart state besides its parameters and buffers (which the trainer keeps with the model's weights), by
        checkpoint key: objects with ``state_dict`` / ``load_state_dict``, the same on every rank (a queue)."""
        return {}


class Objectives(torch.nn.Module):
    """The configured objectives: the loss is the sum of all their terms."""

    def __init__(self, objectives: Iterable[Objective]) -> None:
        super().__init__()
        self.members = torch.nn.ModuleList(objectives)
        names = [name for member in self.members for name in getattr(member, "term_names", ())]
        if len(names) != len(set(names)):
            raise ValueError(f"loss terms: two objectives return the same term name: {sorted(names)}")

    @property
    def batch_fields(self) -> tuple[str | RegionsField | SampleField, ...]:
        """The union of the members' batch fields, in order of first mention."""
        fields: dict[str, str | RegionsField | SampleField] = {}
        for member in self.members:
            for field in member.batch_fields:
                name = field if isinstance(field, str) else field.name
                if name in fields and fields[name] != field:
                    raise ValueError(f"loss terms: two objectives define batch field {name!r} differently")
                fields.setdefault(name, field)
        return tuple(fields.values())

    @property
    def model_outputs(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(output for member in self.members for output in member.model_outputs))

    @property
    def needs_host_sync(self) -> bool:
        return any(member.needs_host_sync for member in self.members)

    @property
    def runs_towers(self) -> bool:
        return any(member.runs_towers for member in self.members)

    def bind(self, model: torch.nn.Module) -> None:
        for member in self.members:
            member.bind(model)

    def before_forward(self, batch: Mapping[str, torch.Tensor]) -> None:
        for member in self.members:
            member.before_forward(batch)

    def forward(
        self,
        outputs: Mapping[str, torch.Tensor],
        batch: Mapping[str, torch.Tensor],
        part: Callable[[str], AbstractContextManager] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Every member's terms. ``part`` (a name → a context manager: the step's ``recorder.part``) times each
        member as ``loss/NAME`` (its ``name``), so the step-time breakdown shows what each objective costs."""
        terms: dict[str, torch.Tensor] = {}
        for member in self.members:
            with part(f"loss/{member.name}") if part is not None else nullcontext():
                made = member(outputs, batch)
            for name, value in made.items():
                if name in terms:
                    raise ValueError(f"loss terms: two objectives return a term named {name!r}")
                terms[name] = value
        return terms

    def after_update(self, applied: torch.Tensor) -> None:
        for member in self.members:
            member.after_update(applied)

    def train_flops(self, image_tokens: int, image_trainable: bool = True) -> float:
        return sum(member.train_flops(image_tokens, image_trainable) for member in self.members)

    def restart_pieces(self) -> dict[str, Any]:
        pieces: dict[str, Any] = {}
        for member in self.members:
            for key, piece in member.restart_pieces().items():
                if key in pieces:
                    raise ValueError(f"loss terms: two objectives keep restart state under {key!r}")
                pieces[key] = piece
        return pieces


class Weighted(Objective):
    """An objective whose terms are multiplied by ``weight``, and switched on from step ``start_step`` (0 until then,
    with no work done: the member is not called, so its needs still hold but cost no compute)."""

    def __init__(self, member: Objective, weight: float, start_step: int = 0, step: Callable[[], int] | None = None):
        super().__init__()
        self.member, self.weight, self.start_step, self.step = member, weight, start_step, step
        self.batch_fields, self.model_outputs = member.batch_fields, member.model_outputs
        self.runs_towers = member.runs_towers
        self.term_names = getattr(member, "term_names", ())

    @property
    def name(self) -> str:
        return self.member.name

    def bind(self, model):
        self.member.bind(model)

    def before_forward(self, batch):
        if self._on():
            self.member.before_forward(batch)

    def _on(self) -> bool:
        return self.start_step == 0 or self.step is None or self.step() >= self.start_step

    def forward(self, outputs, batch):
        if not self._on():
            # zero terms that still touch every parameter: each gets a zero gradient, as data-parallel wrappers
            # that expect a gradient for every parameter (DDP without find_unused_parameters) require
            zero = sum((parameter.sum() for parameter in self.member.parameters()), outputs["logit_scale"] * 0) * 0.0
            return {name: zero for name in self.term_names}
        return {name: self.weight * value for name, value in self.member(outputs, batch).items()}

    def after_update(self, applied):
        if self._on():
            self.member.after_update(applied)

    @property
    def needs_host_sync(self) -> bool:
        return self.member.needs_host_sync

    def train_flops(self, image_tokens: int, image_trainable: bool = True) -> float:
        return self.member.train_flops(image_tokens, image_trainable)

    def restart_pieces(self):
        return self.member.restart_pieces()
