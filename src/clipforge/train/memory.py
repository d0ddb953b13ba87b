"""One real training step on fake tensors: the memory a rank holds at its peak, by part, and the bytes it sends.

``simulate(cfg, world_size, batch_sizes)`` builds the run's model, objectives, optimizer and step strategy as
``clipforge.train.build`` does (``prepare_model``, ``build_optimizer``, ``build_step``) inside torch's
``FakeTensorMode``: every tensor has a shape, a dtype and a device but no data, so no weights, no data and no GPU
are needed, and ViT-L/14 costs what a tiny model does. A fake process group (torch's ``"fake"`` backend) of
``world_size`` ranks stands for the others: FSDP shards each parameter into 1/N, the contrastive loss gathers
N × B_local features (or passes them round the ring), and every collective returns at once with a tensor of the
right shape. The step itself is the run's (``PlainStep.backward`` or GradCache's: objectives' hooks, forward
under autocast, loss, backward), then the gradient norm and clipping and the optimizer's update; the optimizer's
state exists before the step, as it does from the second step of a run on. What the step holds and sends is kept by
the storage ledger, ``clipforge.train.ledger``.

DDP is not run on fake tensors (its reducer allocates its buckets in C++, out of a dispatch mode's sight): the model
runs unwrapped with the objectives still on the N-rank group, and DDP's own memory is added as it allocates it:
gradient buckets as large as the trainable parameters, in their dtype, for the whole run (``gradient_as_bucket_view``
off, DDP's default and clipforge's). Its all-reduce of those buckets is counted the same way, 2 (N - 1)/N of them.

What a fake step cannot see: the CUDA context, the kernels' workspaces (cuBLAS, cuDNN, attention), NCCL's own
buffers and the caching allocator's rounding and fragmentation (``clipforge.train.plan`` sets memory aside for
them); ``speed.compile`` (planned eager: compiled graphs usually hold less); the caption trimming of
``speed.trim_text_padding`` (planned at the full context length, the worst case).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from clipforge.distributed import DistInfo, build_mesh
from clipforge.losses import ObjectiveContext, build_objectives
from clipforge.models import build_model
from clipforge.models.outputs import needs_every_token
from clipforge.train.build import step_for_run
from clipforge.train.config import RunConfig
from clipforge.train.ledger import (
    PARTS,
    PHASE_PARTS,
    Collective,
    PhaseRecorder,
    StorageLedger,
    fake_process_group,
    tensor_bytes,
)
from clipforge.train.optim import build_optimizer
from clipforge.train.parallel import attach_objectives, prepare_model, unwrap
from clipforge.train.step import autocast_for


@dataclass
class StepMemory:
    """One simulated step of one rank: the peak and its parts (bytes), where it happened, and the collectives."""

    local_batch: int
    peak: int
    parts: dict[str, int]
    peak_phase: str
    collectives: list[Collective] = field(default_factory=list)
    seconds: float = 0.0


class FakeRun:
    """The run's model, objectives, optimizer and step on fake tensors, for ``world_size`` ranks (this is rank 0).
    Use as a context manager; ``step(local_batch)`` simulates one step and may be called again with other sizes."""

    def __init__(self, cfg: RunConfig, world_size: int) -> None:
        self.cfg = dataclasses.replace(cfg, speed=dataclasses.replace(cfg.speed, compile=False))
        self.world_size = world_size
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> FakeRun:
        try:
            return self._enter()
        except BaseException:
            self._stack.close()  # the fake process group and modes go, so a next plan can start
            raise

    def _enter(self) -> FakeRun:
        cfg, world_size = self.cfg, self.world_size
        self._stack.enter_context(fake_process_group(world_size))
        info = DistInfo(world_size=world_size, local_world_size=min(world_size, 8), device="cpu", backend="fake")
        self.mesh = build_mesh(info)  # a real (tiny) tensor of ranks: made before the fake mode
        with torch.device("meta"):  # shapes only: nothing is initialised
            self.built = build_model(dataclasses.replace(cfg.model, init_from=None), device="meta")
            context = ObjectiveContext(
                rank=0,
                world_size=world_size,
                mesh=self.mesh,
                device="cpu",
                model=self.built.model,
                autocast=autocast_for("cpu", cfg.train.precision),
                # the last step, when every term is on (a term with a start adds its work there): the heaviest step
                step=lambda: max(cfg.train.steps - 1, 0),
                total_steps=cfg.train.steps,
            )
            self.objectives = build_objectives(cfg.loss, context, cfg.train.steps)
        attached = attach_objectives(self.built.model, self.objectives)
        sharded = cfg.parallel.strategy == "fsdp" and world_size > 1
        # Prepared and sharded on the meta device, then made fake in one pass (``to_empty``): a module's ``to()``
        # cannot swap in new fake parameters once they exist. DDP is not wrapped (module docstring); the
        # objectives talk to the N ranks either way.
        wrap_info = DistInfo(world_size=world_size if sharded else 1, device="meta", backend="fake")
        self.prepared = prepare_model(
            self.built.model,
            model_cfg=cfg.model,
            speed=self.cfg.speed,
            parallel=cfg.parallel,
            precision=cfg.train.precision,
            learn_temperature=cfg.loss.learn_temperature,
            dist_info=wrap_info,
            mesh=self.mesh if sharded else None,
            every_token=needs_every_token(self.objectives.model_outputs),
        )
        self._stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
        self.ledger = self._stack.enter_context(StorageLedger(world_size))
        self.prepared.model.to_empty(device="cpu")
        if not attached:
            self.objectives.to_empty(device="cpu")
        self.objectives.bind(unwrap(self.prepared.model))
        self.optimizer = build_optimizer(cfg.optim, self.built.model)
        self.step_fn = step_for_run(cfg, self.prepared.model, self.objectives, self.optimizer, None, "cpu")
        self.ddp_buckets = 0 if sharded or world_size == 1 else self._trainable_bytes()
        self._make_optimizer_state()
        self._loss_inputs: dict[str, tuple[torch.Size, torch.dtype, bool]] = {}
        self.objectives.register_forward_pre_hook(self._keep_loss_inputs)
        return self

    def _keep_loss_inputs(self, _module, args) -> None:
        """The shapes of what the objectives are given (model outputs and batch fields), for ``loss_step``."""
        outputs, batch = args
        self._loss_inputs = {
            **{f"out.{k}": (v.shape, v.dtype, v.requires_grad) for k, v in outputs.items()},
            **{f"batch.{k}": (v.shape, v.dtype, False) for k, v in batch.items() if isinstance(v, torch.Tensor)},
        }

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _trainable_bytes(self) -> int:
        return sum(tensor_bytes(p) for p in self.built.model.parameters() if p.requires_grad)

    def _make_optimizer_state(self) -> None:
        """AdamW's moments, as they exist from the second step of a run on."""
        for parameter in self.built.model.parameters():
            if parameter.requires_grad:
                parameter.grad = torch.zeros_like(parameter)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def set_grad_checkpointing(self, enabled: bool) -> None:
        """Gradient checkpointing on or off, as ``model.grad_checkpointing`` sets it (``ValueError`` where the model
        has none)."""
        try:
            self.built.model.set_grad_checkpointing(enabled)
        except AssertionError as exn:  # as clipforge.train.parallel.apply_training_options says it
            tower = type(self.built.model.visual).__name__
            raise ValueError(f"model.grad_checkpointing: not supported by {tower} image towers") from exn

    def batch(self, local_batch: int) -> dict[str, torch.Tensor]:
        return make_batch(self.built, self.objectives, local_batch, self.prepared.channels_last)

    def step(self, local_batch: int) -> StepMemory:
        """One step at ``local_batch`` samples on this rank: its peak memory by part and its collectives."""
        start = time.perf_counter()
        ledger, recorder = self.ledger, PhaseRecorder(self.ledger)
        model = self.built.model
        self.optimizer.zero_grad(set_to_none=True)
        ledger.phase = "batch"
        batch = self.batch(local_batch)
        ledger.phase = "setup"
        ledger.start()
        self.prepared.model.train()
        self.step_fn.backward(batch, recorder)
        with recorder.part("optimizer"):
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            # the norm, as the step takes it; clipping then scales the gradients in place, which holds no memory
            # (and on fake FSDP gradients mixes DTensor and plain tensors in a way only real ones take)
            torch.nn.utils.get_total_norm(grads)
            self.optimizer.step()
            grad_records = {id(ledger.track(grad)) for grad in grads}
            self.optimizer.zero_grad(set_to_none=True)
        del batch
        parts, phase = self._composition(grad_records)
        collectives = list(ledger.collectives)
        if self.ddp_buckets:
            parts["communication_buffers"] += self.ddp_buckets
            n = self.world_size
            sent = 2 * self.ddp_buckets * (n - 1) / n
            collectives.append(Collective("all_reduce", "backward", self.ddp_buckets, sent))
        return StepMemory(
            local_batch=local_batch,
            peak=sum(parts.values()),
            parts=parts,
            peak_phase=phase,
            collectives=collectives,
            seconds=time.perf_counter() - start,
        )

    def loss_step(self, local_batch: int) -> StepMemory:
        """The objectives alone, forward and backward, on inputs shaped as a step at ``local_batch`` gives them: the
        memory they add at their peak (``peak``, ``parts["loss_buffers"]``) and their collectives. Run ``step``
        once first (any batch size): it shows what the objectives are given."""
        if not self._loss_inputs:
            self.step(local_batch)
        ledger, recorder = self.ledger, PhaseRecorder(self.ledger)
        ledger.phase = "batch"
        outputs, batch = {}, {}
        for key, (shape, dtype, grad) in self._loss_inputs.items():
            where, _, name = key.partition(".")
            shape = (local_batch, *shape[1:]) if len(shape) else shape
            tensor = torch.zeros(shape, dtype=dtype, requires_grad=grad and dtype.is_floating_point)
            (outputs if where == "out" else batch)[name] = tensor
        ledger.start()
        before = ledger.live
        with recorder.part("loss"):
            loss = sum(self.objectives(outputs, batch).values())
            loss.backward()
        del loss, outputs, batch
        self.optimizer.zero_grad(set_to_none=True)  # an objective's own modules got gradients
        extra = ledger.peak - before
        return StepMemory(local_batch, extra, {"loss_buffers": extra}, "loss", list(ledger.collectives))

    def _composition(self, grad_records: set[int]) -> tuple[dict[str, int], str]:
        ledger, model = self.ledger, self.built.model
        objective_names = {name for name, _ in model.named_parameters() if name.startswith("objectives.")}
        known: dict[int, str] = {}
        for name, parameter in model.named_parameters():
            part = "objective_modules" if name in objective_names else "parameters"
            known[id(ledger.track(parameter))] = part
            state = self.optimizer.state.get(parameter, {})
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    known[id(ledger.track(value))] = part if part == "objective_modules" else "optimizer_state"
        for buffer in model.buffers():
            known.setdefault(id(ledger.track(buffer)), "parameters")
        parts = dict.fromkeys(PARTS, 0)
        for _, record in ledger.alive_at(ledger.peak_at):
            part = known.get(id(record))
            if part is None and id(record) in grad_records:
                part = "gradients"
            if part is None:
                if record.communication and record.phase in ("forward", "backward"):
                    part = "communication_buffers"
                else:
                    part = PHASE_PARTS.get(record.phase, "other")
            parts[part] += record.nbytes
        born = [record for record in ledger.records if record.born <= ledger.peak_at]
        phase = born[-1].phase if born else "setup"
        return parts, phase


def make_batch(built, objectives, local_batch: int, channels_last: bool = False) -> dict[str, torch.Tensor]:
    """A batch as the step takes it (``clipforge.train.loop.prepare_batch``): normalised float32 images, token ids at
    the full context length, and the fields the objectives ask for, in the shapes the loader makes them; zeros (fake
    under a fake mode), but for the captions, which fill the context (the end token, the highest id, last): the worst
    case of work that follows the captions' lengths (a decoder's target positions)."""
    size = built.preprocess_cfg["size"]
    height, width = (size, size) if isinstance(size, int) else size
    context = built.model_cfg["text_cfg"].get("context_length", 77)
    images = torch.zeros(local_batch, 3, height, width)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    texts = torch.ones(local_batch, context, dtype=torch.long)
    texts[:, -1] = built.model_cfg["text_cfg"].get("vocab_size", 49408) - 1
    batch = {"images": images, "texts": texts}
    for name in objectives.batch_fields:
        batch.update(_batch_field(name, local_batch, context))
    return batch


def _batch_field(name, local_batch: int, context: int) -> dict[str, torch.Tensor]:
    """Fake batch fields of the objectives (``clipforge.losses.objective``): the shapes the loader makes."""
    from clipforge.losses.objective import RegionsField, SampleField

    if name in ("caption_ids", "image_ids"):
        return {name: torch.zeros(local_batch, dtype=torch.long)}
    if name == "regions" or isinstance(name, RegionsField):
        regions = name.max_regions if isinstance(name, RegionsField) else RegionsField().max_regions
        return {
            "region_boxes": torch.zeros(local_batch, regions, 4),
            "region_captions": torch.zeros(local_batch, regions, context, dtype=torch.long),
            "region_count": torch.zeros(local_batch, dtype=torch.long),
        }
    if isinstance(name, SampleField):
        if name.shape is None:
            raise ValueError(f"planning: the batch field {name.name!r} is made by a function that declares no shape")
        return {name.name: torch.zeros(local_batch, *name.shape)}
    raise ValueError(f"planning: the batch field {name!r} (a stored teacher's embeddings) is not planned")
