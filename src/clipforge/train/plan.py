"""``clipforge plan CONFIG --gpus N --gpu h100``: a run's memory and time per GPU, planned on a laptop.

Memory: one real training step of the run on fake tensors, for N ranks (``clipforge.train.memory``): the peak per
GPU by part, under the config's parallelism (``parallel.strategy``) and precision, at its batch per GPU. To fit, the
peak plus what a fake step cannot see must stay under the GPU's memory: ``RESERVE`` (the CUDA context, NCCL's and
the libraries' workspaces) plus ``SLACK`` of the tensors (the caching allocator's rounding and fragmentation).
The largest batch per GPU that fits, with and without gradient checkpointing, is searched with more fake steps
(``largest_fitting``): the parts of the peak that grow with the batch (``PER_SAMPLE_PARTS``) give its slope, the
line gives a candidate, the candidate is stepped, and a curve through the sizes nearest the budget gives the next,
until a candidate lands within 1% above a size that fits. The peak is a line in the batch as long as the loss's
buffers are (it bends up when the logits are materialised, ``loss.tile_size: 0``, whose (B_local, B_global)
matrices grow with B_local²), so one to three candidates settle it.

Time: model FLOPs per step per GPU are ``clipforge.train.flops``' count (the one MFU is measured with) times the
batch per GPU; a step takes them over the assumed MFU of the GPU's dense peak (``clipforge.train.peak``). Gradient
checkpointing, and GradCache (``train.accum_steps``), make the GPU compute each tower's forward once more: the step
is planned at the same utilisation of that larger work.

Communication: the bytes each GPU sends per step, from the collectives the fake step made (FSDP's all-gathers and
reduce-scatters, the loss's embedding all-gather or ring) and DDP's gradient all-reduce, and their time at an
assumed bus bandwidth: NVLink within a node of ``Gpu.per_node`` GPUs, the network across nodes. The transfers
overlap the compute when they are shorter than it (DDP's bucketed all-reduce and FSDP's prefetched gathers do; the
loss's exchange does not, it sits between the forward and the backward).

Every assumption is printed with the plan and each is an option.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from clipforge.train.config import RunConfig
    from clipforge.train.memory import StepMemory

GIB = 2**30
MIB = 2**20
RESERVE = 2 * GIB
"""Memory a GPU needs besides the step's tensors: the CUDA context (~0.5 GiB), cuBLAS/cuDNN workspaces, NCCL's
buffers."""
SLACK = 0.10
"""The caching allocator's overhead over the live tensors (block rounding, fragmentation), as a fraction of them."""
DEFAULT_MFU = 0.40


@dataclass(frozen=True)
class Gpu:
    """A GPU as the plan sees it: memory (bytes, as CUDA reports its total), the key of its dense peak in
    ``clipforge.train.peak.GPU_PEAKS``, and the bus bandwidth (bytes/s) assumed within a node and across nodes."""

    name: str
    memory: int
    peak_key: str
    intra_node: float
    inter_node: float
    per_node: int = 8


GPUS = {
    # memory: the total nvidia-smi shows; bandwidths: ~80% of NVLink's per-direction figure within a node, ~90% of
    # one InfiniBand NIC per GPU across nodes (NDR 400 Gb/s on H100/H200 systems, HDR 200 Gb/s on A100's)
    "h100": Gpu("H100 SXM 80GB", 81559 * MIB, "H100", 360e9, 45e9),
    "h200": Gpu("H200 141GB", 143771 * MIB, "H200", 360e9, 45e9),
    "a100": Gpu("A100 SXM 80GB", 81920 * MIB, "A100", 240e9, 22e9),
    "a100-40gb": Gpu("A100 SXM 40GB", 40960 * MIB, "A100", 240e9, 22e9),
    "l40s": Gpu("L40S 48GB", 46068 * MIB, "L40S", 20e9, 20e9),
}


@dataclass
class Transfer:
    """One kind of communication per step per GPU: bytes sent and their time at the plan's bandwidth."""

    name: str
    sent: float
    seconds: float


@dataclass
class Plan:
    config: str
    architecture: str
    gpus: int
    gpu: Gpu
    strategy: str
    precision: str
    local_batch: int
    accum_steps: int
    grad_checkpointing: bool
    peak: int  # bytes of tensors per GPU at the step's peak
    parts: dict[str, int]
    peak_phase: str
    budget: int  # bytes of tensors that fit: (memory - RESERVE) / (1 + SLACK)
    largest_batch: dict[bool, int | None]  # per grad checkpointing: the largest local batch that fits (None: n/a)
    peaks: dict[bool, int]  # per grad checkpointing: the peak at the config's batch (from the search)
    flops_per_sample: float
    forward_flops_per_sample: float  # both towers' forward: what gradient checkpointing computes again
    flops_per_step: float  # model FLOPs per GPU per step
    hardware_flops_per_step: float  # with checkpointing's second forward
    mfu: float
    peak_tflops: float
    step_seconds: float
    steps: int
    transfers: list[Transfer]
    bandwidth: float
    seconds: float = 0.0  # how long planning took
    fake_steps: int = 0  # how many steps it simulated
    notes: list[str] = field(default_factory=list)
    gradcache: bool = True  # whether the loss terms allow GradCache (train.accum_steps > 1)
    run_step_seconds: float = 0.0  # the mean step over the run: a term that starts late is charged from its start

    @property
    def global_batch(self) -> int:
        return self.local_batch * self.gpus

    @property
    def fits(self) -> bool:
        return self.peak <= self.budget

    @property
    def samples_per_second(self) -> float:
        return self.global_batch / self.step_seconds

    @property
    def run_seconds(self) -> float:
        return self.steps * (self.run_step_seconds or self.step_seconds)

    @property
    def communication_seconds(self) -> float:
        return sum(transfer.seconds for transfer in self.transfers)


def tensor_budget(memory: int, reserve: int = RESERVE, slack: float = SLACK) -> int:
    """The bytes of tensors a GPU of ``memory`` bytes holds once ``reserve`` and the allocator's ``slack`` are
    set aside."""
    return int((memory - reserve) / (1 + slack))


def bus_bandwidth(gpu: Gpu, gpus: int) -> float:
    """The assumed bus bandwidth of a ring over ``gpus`` GPUs: NVLink within one node, the network across nodes."""
    return gpu.intra_node if gpus <= gpu.per_node else gpu.inter_node


def largest_fitting(
    peak_of: Callable[[int], int],
    budget: int,
    known: dict[int, int],
    slope: float | None = None,
    tolerance: float = 0.01,
    limit: int = 8,
) -> int:
    """The largest batch whose ``peak_of(batch)`` is at most ``budget``, within ``tolerance`` of it, from the
    ``known`` peaks by batch size. Each candidate is where a curve through the known sizes nearest the budget meets
    it (a line through one size with ``slope``, bytes per sample; a line through two; a parabola through three, for
    the materialised logits grow with B_local²), aimed ``tolerance / 2`` below; it is stepped (``peak_of``) and joins
    ``known``. The search ends when the next candidate is within ``tolerance`` above a size known to fit.
    Returns 0 when not even one sample fits."""
    for _ in range(limit):
        fitting = [batch for batch, peak in known.items() if peak <= budget]
        over = [batch for batch, peak in known.items() if peak > budget]
        crossing = _crossing(known, budget, slope)
        if crossing is None:
            break
        guess = math.floor(crossing * (1 - tolerance / 2))  # aimed a little below: a size that fits ends it sooner
        if over:
            guess = min(guess, min(over) - 1)
        if fitting and guess <= max(fitting) * (1 + tolerance):
            break
        if guess in known or guess < 1:
            break
        known[guess] = peak_of(guess)
    fitting = [batch for batch, peak in known.items() if peak <= budget]
    return max(fitting) if fitting else 0


def _crossing(known: dict[int, int], budget: int, slope: float | None) -> int | None:
    """Where the curve through the known peaks nearest ``budget`` reaches it (``largest_fitting``), rounded down."""
    nearest = sorted(sorted(known, key=lambda batch: abs(known[batch] - budget))[:3])
    if len(nearest) == 1:
        (batch,) = nearest
        return None if not slope or slope <= 0 else batch + math.floor((budget - known[batch]) / slope)
    if len(nearest) == 3:
        (x0, x1, x2), (y0, y1, y2) = nearest, [known[batch] for batch in nearest]
        # Newton's divided differences: y = y0 + d1 (x - x0) + d2 (x - x0)(x - x1)
        d1, d12 = (y1 - y0) / (x1 - x0), (y2 - y1) / (x2 - x1)
        d2 = (d12 - d1) / (x2 - x0)
        a, b, c = d2, d1 - d2 * (x0 + x1), y0 - d1 * x0 + d2 * x0 * x1 - budget
        if a > 0 and b * b - 4 * a * c >= 0:
            return math.floor((-b + math.sqrt(b * b - 4 * a * c)) / (2 * a))
        nearest = nearest[1:] if abs(known[nearest[0]] - budget) > abs(known[nearest[2]] - budget) else nearest[:2]
    (x0, x1), (y0, y1) = nearest, (known[nearest[0]], known[nearest[1]])
    line = (y1 - y0) / (x1 - x0)
    return None if line <= 0 else x0 + math.floor((budget - y0) / line)


PER_SAMPLE_PARTS = ("batch", "activations", "loss_buffers", "backward_temporaries")
"""The parts of the peak that grow with the batch (the others are the model's and its optimizer's)."""


def plan_run(
    cfg: RunConfig,
    gpus: int,
    gpu: str = "h100",
    *,
    mfu: float = DEFAULT_MFU,
    bandwidth: float | None = None,
    reserve: int = RESERVE,
    slack: float = SLACK,
    largest: bool = True,
    config_name: str = "",
) -> Plan:
    """Plan ``cfg`` on ``gpus`` GPUs of kind ``gpu`` (a key of ``GPUS``); see the module docstring."""
    from clipforge.train.flops import count_train_flops
    from clipforge.train.peak import GPU_PEAKS, matmul_precision

    if gpu not in GPUS:
        raise ValueError(f"--gpu: {gpu!r} is not one of {', '.join(GPUS)}")
    if gpus < 1:
        raise ValueError(f"--gpus: must be at least 1, got {gpus}")
    if not 0 < mfu <= 1:
        raise ValueError(f"--mfu: a fraction in (0, 1], got {mfu}")
    started = time.perf_counter()
    device = GPUS[gpu]
    budget = tensor_budget(device.memory, reserve, slack)
    local_batch = cfg.data.batch_size
    checkpointing = cfg.model.grad_checkpointing
    quiet = logging.getLogger("clipforge.train")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # prepare_model's notes describe a run, not this plan
    try:
        simulated = _simulate(cfg, gpus, budget, largest)
    finally:
        quiet.setLevel(level)
    memory = simulated.memory
    flops = count_train_flops(
        cfg.model, cfg.loss.learn_temperature, cfg.speed.pooled_last_block, loss=cfg.loss, total_steps=cfg.train.steps
    )
    per_sample = flops.train()  # the heaviest step: every term on
    forward = flops.image_forward + flops.text_forward
    # the forward computed again: by gradient checkpointing in the backward, by GradCache for each micro-batch's graph
    again = forward * ((checkpointing) + (cfg.train.accum_steps > 1))
    hardware = per_sample + again
    peak_tflops = GPU_PEAKS[device.peak_key][matmul_precision(cfg.train.precision, cfg.train.tf32)]
    step_seconds = local_batch * hardware / (mfu * peak_tflops * 1e12)
    run_step_seconds = local_batch * (flops.run_mean(cfg.train.steps) + again) / (mfu * peak_tflops * 1e12)
    bandwidth = bandwidth or bus_bandwidth(device, gpus)
    transfers = _transfers(memory.collectives, simulated.loss_sent, cfg, bandwidth)
    return Plan(
        config=config_name,
        architecture=simulated.architecture,
        gpus=gpus,
        gpu=device,
        strategy=cfg.parallel.strategy if gpus > 1 else "one GPU",
        precision=cfg.train.precision,
        local_batch=local_batch,
        accum_steps=cfg.train.accum_steps,
        grad_checkpointing=checkpointing,
        peak=memory.peak,
        parts=memory.parts,
        peak_phase=memory.peak_phase,
        budget=budget,
        largest_batch=simulated.largest_batch,
        peaks=simulated.peaks,
        flops_per_sample=per_sample,
        forward_flops_per_sample=forward,
        flops_per_step=local_batch * per_sample,
        hardware_flops_per_step=local_batch * hardware,
        mfu=mfu,
        peak_tflops=peak_tflops,
        step_seconds=step_seconds,
        steps=cfg.train.steps,
        transfers=transfers,
        bandwidth=bandwidth,
        seconds=time.perf_counter() - started,
        fake_steps=simulated.fake_steps,
        notes=simulated.notes,
        gradcache=simulated.gradcache,
        run_step_seconds=run_step_seconds,
    )


@dataclass
class _Simulated:
    architecture: str
    memory: StepMemory  # the step at the config's batch
    largest_batch: dict[bool, int | None]
    peaks: dict[bool, int]  # at the config's batch, by gradient checkpointing
    loss_sent: dict[str, float]  # by collective kind, the loss's own
    fake_steps: int
    notes: list[str]
    gradcache: bool


def _simulate(cfg: RunConfig, gpus: int, budget: int, largest: bool) -> _Simulated:
    """The fake steps of a plan: the config's batch, the loss alone, and the largest-batch searches."""
    from clipforge.train.memory import FakeRun

    local_batch, checkpointing = cfg.data.batch_size, cfg.model.grad_checkpointing
    largest_batch: dict[bool, int | None] = {}
    peaks: dict[bool, int] = {}
    notes: list[str] = []
    with FakeRun(cfg, gpus) as run:
        steps = [run.step(local_batch)]
        memory = steps[0]
        loss_sent = _sent_by_name(run.loss_step(local_batch).collectives) if gpus > 1 else {}
        for mode in (False, True) if largest else ():

            def peak_of(batch: int) -> int:
                steps.append(run.step(batch))
                return steps[-1].peak

            try:
                run.set_grad_checkpointing(mode)
            except ValueError as exn:
                largest_batch[mode] = None
                notes.append(str(exn))
                continue
            at_batch = memory if mode == checkpointing else None
            known = {local_batch: memory.peak} if at_batch else {}
            if not known:
                known[local_batch] = peak_of(local_batch)
                at_batch = steps[-1]
            peaks[mode] = at_batch.peak
            slope = sum(at_batch.parts[part] for part in PER_SAMPLE_PARTS) / local_batch
            largest_batch[mode] = largest_fitting(peak_of, budget, known, slope)
        run.set_grad_checkpointing(checkpointing)
        architecture = run.built.architecture
        # GradCache caches the pooled features: terms that read the towers' tokens or run them cannot be cached
        gradcache = not (run.objectives.model_outputs or run.objectives.runs_towers)
    fake_steps = len(steps) + (gpus > 1)
    return _Simulated(architecture, memory, largest_batch, peaks, loss_sent, fake_steps, notes, gradcache)


def _sent_by_name(collectives) -> dict[str, float]:
    sent: dict[str, float] = {}
    for collective in collectives:
        sent[collective.kind] = sent.get(collective.kind, 0.0) + collective.sent
    return sent


def _transfers(collectives, loss_sent: dict[str, float], cfg: RunConfig, bandwidth: float) -> list[Transfer]:
    """The step's communication by purpose: the loss's own collectives (measured alone, ``FakeRun.loss_step``) and
    the rest, the parameters' and gradients' (FSDP's gathers and reduce-scatters, DDP's all-reduce)."""
    total = _sent_by_name(collectives)
    exchange = "ring" if cfg.loss.kind == "siglip" and cfg.loss.siglip_exchange == "ring" else "all-gather"
    names = {
        "all_gather": "FSDP parameter all-gather (forward and backward)",
        "reduce_scatter": "FSDP gradient reduce-scatter",
        "all_reduce": "DDP gradient all-reduce" if cfg.parallel.strategy == "ddp" else "all-reduce (scalars)",
        "send": "sends",
    }
    transfers = []
    loss_total = sum(loss_sent.values())
    if loss_total:
        transfers.append(Transfer(f"loss: embedding {exchange} (forward and backward)", loss_total, 0.0))
    for kind, sent in total.items():
        rest = sent - loss_sent.get(kind, 0.0)
        if rest > MIB:  # the scalars' all-reduces (the gradient norm, the temperature) are no traffic
            transfers.append(Transfer(names.get(kind, kind), rest, 0.0))
    for transfer in transfers:
        transfer.seconds = transfer.sent / bandwidth
    return transfers


def _gib(nbytes: float) -> str:
    if nbytes >= GIB / 10:
        return f"{nbytes / GIB:,.2f} GiB"
    return f"{nbytes / MIB:,.1f} MiB" if nbytes >= MIB / 10 else f"{nbytes / 1024:,.1f} KiB"


def _duration(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:,.0f} µs"
    if seconds < 0.01:
        return f"{seconds * 1e3:.2f} ms"
    if seconds < 1:
        return f"{seconds * 1e3:,.0f} ms"
    if seconds < 120:
        return f"{seconds:,.2f} s"
    hours = seconds / 3600
    return f"{hours:,.1f} h ({hours / 24:,.1f} days)" if hours >= 48 else f"{hours:,.1f} h"


def _count(number: float) -> str:
    for size, suffix in ((1e9, " billion"), (1e6, " million")):
        if number >= size:
            return f"{number / size:,.2f}{suffix}"
    return f"{number:,.0f}"


PART_NAMES = {
    "parameters": "parameters and buffers",
    "gradients": "gradients",
    "optimizer_state": "optimizer state (AdamW moments)",
    "objective_modules": "objectives' modules (params, grads, state)",
    "batch": "batch (images, tokens)",
    "activations": "activations (kept for the backward)",
    "loss_buffers": "loss buffers (gathered features, logits)",
    "backward_temporaries": "backward temporaries",
    "optimizer_temporaries": "optimizer temporaries",
    "communication_buffers": "communication buffers",
    "other": "other",
}


def format_plan(plan: Plan) -> str:
    """The plan as the command prints it."""
    gpu = plan.gpu
    lines = [
        f"{plan.config or plan.architecture}: {plan.architecture}, {plan.gpus:,} × {gpu.name} "
        f"({gpu.memory / GIB:,.1f} GiB), {plan.strategy}, {plan.precision}, batch {plan.local_batch:,} per GPU "
        f"(global {plan.global_batch:,})"
        + (f", train.accum_steps {plan.accum_steps}" if plan.accum_steps > 1 else "")
        + (", gradient checkpointing" if plan.grad_checkpointing else ""),
        "",
        f"memory per GPU at the step's peak (in the {plan.peak_phase}), from one step on fake tensors:",
    ]
    width = max(len(name) for name in PART_NAMES.values())
    for part, nbytes in plan.parts.items():
        if nbytes >= 1024:  # a few scalars are no part worth a line
            lines.append(f"  {PART_NAMES[part]:<{width}}  {_gib(nbytes):>12}")
    lines.append(f"  {'total of the tensors':<{width}}  {_gib(plan.peak):>12}")
    needed = plan.peak * (1 + SLACK) + RESERVE
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    lines.append(
        f"  with {SLACK:.0%} allocator slack and {RESERVE / GIB:.0f} GiB reserved (CUDA context, NCCL, workspaces): "
        f"{_gib(needed)} of {_gib(gpu.memory)}: {verdict}"
    )
    lines.append("")
    for mode in (False, True):
        if mode not in plan.largest_batch:
            continue
        label = "with gradient checkpointing   " if mode else "without gradient checkpointing"
        value = plan.largest_batch[mode]
        if value is None:
            lines.append(f"{label}: not supported by this model")
            continue
        lines.append(
            f"{label}: {_gib(plan.peaks[mode])} at batch {plan.local_batch:,}; the largest batch that fits is "
            f"{value:,} per GPU (global {value * plan.gpus:,})"
        )
    if plan.largest_batch and not plan.fits and not plan.gradcache:
        lines.append(
            "  GradCache (train.accum_steps) cannot keep this batch: the loss terms read or run the towers; turn on "
            "gradient checkpointing or lower the batch per GPU"
        )
    elif plan.largest_batch and not plan.fits:
        best = max((value or 0) for value in plan.largest_batch.values())
        if best:
            lines.append(
                f"  to keep batch {plan.local_batch:,} per GPU: train.accum_steps ≥ "
                f"{math.ceil(plan.local_batch / best)} (GradCache: micro-batches of at most {best:,})"
            )
    lines += [
        "",
        f"compute: {plan.flops_per_sample / 1e9:,.1f} GFLOP per sample (forward + backward, clipforge.train.flops: the "
        f"count MFU uses), {plan.flops_per_step / 1e12:,.2f} TFLOP per GPU per step",
        f"  at {plan.mfu:.0%} MFU of {plan.peak_tflops:,.0f} TFLOP/s ({gpu.name} dense "
        f"{plan.precision if plan.precision != 'fp32' else 'tf32/fp32'}; assumed, --mfu sets it)"
        + (" with the forward computed again" if plan.hardware_flops_per_step > plan.flops_per_step else "")
        + f": {_duration(plan.step_seconds)} per step, {plan.samples_per_second:,.0f} samples/s in all",
        f"  {plan.steps:,} steps (train.steps): {_duration(plan.run_seconds)}, "
        f"{_count(plan.steps * plan.global_batch)} samples seen",
    ]
    if plan.transfers:
        where = "within one node" if plan.gpus <= gpu.per_node else "across nodes"
        lines += [
            "",
            f"communication per step per GPU (bytes each GPU sends, ring algorithms) at {plan.bandwidth / 1e9:,.0f} "
            f"GB/s ({where}; assumed, --bandwidth sets it):",
        ]
        width = max(len(transfer.name) for transfer in plan.transfers)
        for transfer in plan.transfers:
            lines.append(f"  {transfer.name:<{width}}  {_gib(transfer.sent):>12}  {_duration(transfer.seconds):>9}")
        lines.append(
            f"  {'total':<{width}}  {_gib(sum(t.sent for t in plan.transfers)):>12}  "
            f"{_duration(plan.communication_seconds):>9}  (the compute is {_duration(plan.step_seconds)})"
        )
    lines += [
        "",
        f"planned in {plan.seconds:.1f} s ({plan.fake_steps} steps on fake tensors) on this machine, with no GPU, "
        "no weights and no data",
    ]
    lines += [f"note: {note}" for note in plan.notes]
    return "\n".join(lines)


def plan_json(plan: Plan) -> dict:
    """The plan as plain values (bytes, seconds, FLOPs), for ``--json``."""
    data = dataclasses.asdict(plan)
    data["gpu"] = dataclasses.asdict(plan.gpu)
    for key in ("largest_batch", "peaks"):
        data[key] = {
            ("with" if mode else "without") + "_grad_checkpointing": v for mode, v in getattr(plan, key).items()
        }
    data.update(
        global_batch=plan.global_batch,
        fits=plan.fits,
        samples_per_second=plan.samples_per_second,
        run_seconds=plan.run_seconds,
    )
    return data
