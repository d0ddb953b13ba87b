"""AdamW with open_clip_train's parameter groups, and a warmup + cosine learning-rate schedule counted in samples.

The schedule and the run's length are counted in samples, so that a run resumed with another global batch (fewer
nodes, another data.batch_size) keeps its warmup, its decay and its end: ``train.steps``, ``optim.warmup_steps``
and ``optim.cooldown_steps`` are steps of the *reference* global batch, the one the run started with
(data.batch_size × world size at step 0, kept in the checkpoint). ``SampleClock`` converts: after a resume at
another global batch, step ``s`` is at ``samples(s) / reference_batch`` reference steps, and the run ends at the
first step whose samples reach ``train.steps × reference_batch``. With the global batch unchanged every number is
the step-counted one, bit for bit. The peak rate is not rescaled unless ``optim.lr_scaling`` says so (OpenCLIP
never rescales it either).

No weight decay on what open_clip_train exempts (its ``main.py``: parameters with fewer than 2 dimensions, or
"bn", "ln", "bias" or "logit_scale" in the name), so a recipe copied from OpenCLIP decays exactly the same
tensors; the 2-D token and positional embeddings are decayed, as there. ``optim.weight_decay_embeddings: false``
also exempts the embeddings (any name with "embedding"; timm's ``pos_embed`` and ``cls_token``): a checkpoint whose
optimizer was made by that rule (the embeddings among its undecayed group) resumes only with it, since the
optimizer's groups must match.

Layer-wise learning-rate decay (``optim.layer_decay`` = d < 1; BEiT's and timm's ``param_groups_layer_decay``): a
parameter k layers below the top of its tower trains at ``lr × d**k``. Each tower counts its own layers
(``clipforge.models.layer_depths``): the head (final norm and projection) is at the top (k = 0), block i of L at k =
L - i, the embeddings at k = L + 1; the image and the text tower alike, each by its own depth. ``logit_scale``,
``logit_bias`` and objectives' parameters are at the top. The groups are one per (k, decayed or not), top first (the
logged ``train/lr`` is the first group's: lr whenever a head or logit_scale trains); each carries its ``layer_depth``
k, and a resume recomputes its rate from this run's ``optim.lr`` and ``optim.layer_decay``. With d = 1 there are the
two groups of open_clip_train, as without the option.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


SCHEDULES = ("cosine", "constant", "constant-cooldown")
LR_SCALINGS = ("none", "linear", "sqrt")


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    lr: float = 5e-4
    """Peak learning rate (after warmup)."""
    weight_decay: float = 0.2
    """AdamW decoupled weight decay, on the tensors open_clip_train decays (none on biases, norms, logit_scale)."""
    weight_decay_embeddings: bool = True
    """Decay the 2-D token / positional embeddings too, as open_clip_train does; false exempts them."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.98
    """AdamW beta2 (0.98 as in CLIP)."""
    eps: float = 1e-6
    """AdamW epsilon."""
    warmup_steps: int = 100
    """Linear warmup from 0 to lr over this many steps."""
    schedule: str = "cosine"
    """After warmup: cosine (decay to min_lr at the last step), constant, or constant-cooldown (constant, then
    the last cooldown_steps decay to min_lr: OpenCLIP's const-cooldown)."""
    min_lr: float = 0.0
    """Final learning rate of the cosine and constant-cooldown schedules."""
    cooldown_steps: int = 0
    """constant-cooldown: length of the final decay."""
    cooldown_power: float = 1.0
    """constant-cooldown: 1 = linear decay, else polynomial (OpenCLIP's --lr-cooldown-power)."""
    grad_clip_norm: float | None = 1.0
    """Clip the global gradient norm to this value (null = no clipping)."""
    fused: bool = True
    """Fused AdamW kernel (one kernel for all parameters) where the device supports it; else the foreach one."""
    lr_scaling: str = "none"
    """A run resumed with another global batch than it started with: none keeps optim.lr (as OpenCLIP); linear
    multiplies lr and min_lr by new / first global batch, sqrt by its square root."""
    layer_decay: float = 1.0
    """Layer-wise learning-rate decay: a parameter k layers below the top of its tower trains at lr × layer_decay**k
    (head k=0, block i of L: k=L-i, embeddings: k=L+1; each tower by its own depth; logit_scale at the top).
    1.0 = off (BEiT fine-tunes ViT-B with 0.65)."""

    def __post_init__(self) -> None:
        if self.lr_scaling not in LR_SCALINGS:
            raise ValueError(f"optim.lr_scaling: {self.lr_scaling!r} is not one of {LR_SCALINGS}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule: {self.schedule!r} is not one of {SCHEDULES}")
        if self.schedule == "constant-cooldown" and self.cooldown_steps <= 0:
            raise ValueError(
                f"optim.cooldown_steps: constant-cooldown needs a positive length, got {self.cooldown_steps}"
            )
        if self.lr <= 0:
            raise ValueError(f"optim.lr: must be positive, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps: must be >= 0, got {self.warmup_steps}")
        if not 0.0 < self.layer_decay <= 1.0:
            raise ValueError(f"optim.layer_decay: must be in (0, 1], got {self.layer_decay}")


EMBEDDINGS = ("embedding", "pos_embed", "cls_token")  # open_clip/HF "*embedding*", timm's pos_embed, cls_token


def no_weight_decay(name: str, parameter: torch.nn.Parameter, decay_embeddings: bool = True) -> bool:
    exempt = parameter.ndim < 2 or any(part in name for part in ("bn", "ln", "bias", "logit_scale"))
    return exempt or (not decay_embeddings and any(part in name for part in EMBEDDINGS))


def build_optimizer(cfg: OptimConfig, model: torch.nn.Module) -> torch.optim.AdamW:
    import torch  # here, not at the top: OptimConfig is read without torch (clipforge.config)

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    exempt = {n for n, p in named if no_weight_decay(n, p, cfg.weight_decay_embeddings)}
    if cfg.layer_decay == 1.0:
        groups = [
            {"params": [p for n, p in named if n in exempt], "weight_decay": 0.0},
            {"params": [p for n, p in named if n not in exempt], "weight_decay": cfg.weight_decay},
        ]
    else:
        groups = layer_decay_groups(cfg, model, named, exempt)
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if cfg.fused:
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except RuntimeError as exn:  # e.g. a device without the fused kernel
            log.info("fused AdamW unavailable (%s); using the foreach implementation", exn)
    return torch.optim.AdamW(groups, foreach=True, **kwargs)


def layer_decay_groups(
    cfg: OptimConfig, model: torch.nn.Module, named: list[tuple[str, torch.nn.Parameter]], exempt: set[str]
) -> list[dict]:
    """The parameter groups of layer-wise decay: one per (layer depth k, weight decay or none), top first, each at
    ``cfg.lr × cfg.layer_decay**k`` (see the module docstring)."""
    from clipforge.models import layer_depths

    try:
        depths = layer_depths(model)
    except ValueError as exn:  # a timm or Hugging Face tower
        raise ValueError(f"optim.layer_decay: {exn}; use 1.0") from None
    keys = sorted({(depths[n], n not in exempt) for n, _ in named})
    return [
        {
            "params": [p for n, p in named if (depths[n], n not in exempt) == (depth, decayed)],
            "weight_decay": cfg.weight_decay if decayed else 0.0,
            "lr": cfg.lr * cfg.layer_decay**depth,
            "layer_depth": depth,
        }
        for depth, decayed in keys
    ]


def group_lr(cfg: OptimConfig, group: dict) -> float:
    """A group's peak rate under ``cfg``: ``optim.lr``, times ``layer_decay**k`` for a group of layer depth k."""
    return cfg.lr * cfg.layer_decay ** group.get("layer_depth", 0)


@dataclass
class SampleClock:
    """Steps → samples → reference steps. ``global_batch`` is this run's; ``reference_batch`` the global batch the
    configured step counts are in (the run's first); ``base_step`` / ``base_samples`` where this run resumed."""

    global_batch: int = 1
    reference_batch: int = 0  # 0: this run's global batch (a fresh start)
    base_step: int = 0
    base_samples: int = 0

    def __post_init__(self) -> None:
        self.reference_batch = self.reference_batch or self.global_batch

    def samples(self, step: int) -> int:
        """Samples trained on before the update made at ``step``."""
        return self.base_samples + (step - self.base_step) * self.global_batch

    def position(self, step: int) -> float:
        """``step`` in steps of the reference batch."""
        return self.samples(step) / self.reference_batch

    def last_step(self, reference_steps: int) -> int:
        """The step at which ``reference_steps`` steps of the reference batch are done (the run's end)."""
        remaining = max(0, reference_steps * self.reference_batch - self.samples(self.base_step))
        return self.base_step + math.ceil(remaining / self.global_batch)

    def lr_scale(self, scaling: str) -> float:
        ratio = self.global_batch / self.reference_batch
        return {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[scaling]


def lr_factor(step: float, cfg: OptimConfig, total_steps: int, step_size: float = 1.0) -> float:
    """Multiplier of cfg.lr for the update made at ``step`` (0-based; in reference steps, of which this update makes
    ``step_size``)."""
    if step < cfg.warmup_steps:
        return min(1.0, (step + step_size) / cfg.warmup_steps)
    if cfg.schedule == "constant":
        return 1.0
    floor = cfg.min_lr / cfg.lr
    if cfg.schedule == "constant-cooldown":
        start = total_steps - cfg.cooldown_steps
        if step < start:
            return 1.0
        decay = (1 - min(1.0, (step - start) / cfg.cooldown_steps)) ** cfg.cooldown_power
        return decay * (1 - floor) + floor
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def schedule_factor(step: int, cfg: OptimConfig, total_steps: int, clock: SampleClock) -> float:
    """Multiplier of cfg.lr for the update made at optimizer step ``step`` of this run (``total_steps`` in reference
    steps), with ``optim.lr_scaling`` applied."""
    step_size = clock.global_batch / clock.reference_batch
    return clock.lr_scale(cfg.lr_scaling) * lr_factor(clock.position(step), cfg, total_steps, step_size)


def build_scheduler(
    cfg: OptimConfig, optimizer: torch.optim.Optimizer, total_steps: int, clock: SampleClock | None = None
):
    """LambdaLR over ``schedule_factor``; ``clock`` (shared with ``TrainState``) is read at every step, so a resume
    that moves it moves the schedule. None: every step is one reference step."""
    import torch

    clock = clock or SampleClock()
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule_factor(step, cfg, total_steps, clock))


def load_schedule_state(
    scheduler,
    optimizer: torch.optim.Optimizer,
    state: dict,
    cfg: OptimConfig,
    total_steps: int,
    clock: SampleClock | None = None,
) -> None:
    """Resume the schedule's position (its step count) from a checkpoint, after ``optimizer.load_state_dict``. The
    learning rate itself follows this run's config (optim.lr, warmup, schedule, train.steps), as open_clip_train
    recomputes it from its arguments every step; with an unchanged config it is the same number."""
    scheduler.load_state_dict({k: v for k, v in state.items() if k not in ("base_lrs", "_last_lr")})
    scheduler.base_lrs = [group_lr(cfg, group) for group in optimizer.param_groups]
    factor = schedule_factor(scheduler.last_epoch, cfg, total_steps, clock or SampleClock())
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
        group["initial_lr"], group["lr"] = base, base * factor
