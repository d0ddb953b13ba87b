"""AdamW with open_clip_train's parameter groups, and a warmup + cosine learning-rate schedule.

No weight decay on what open_clip_train exempts (its ``main.py``: parameters with fewer than 2 dimensions, or
"bn", "ln", "bias" or "logit_scale" in the name), so a recipe copied from OpenCLIP decays exactly the same
tensors; the 2-D token and positional embeddings are decayed, as there. ``optim.weight_decay_embeddings: false``
also exempts the embeddings (any name with "embedding"; timm's ``pos_embed`` and ``cls_token``): the rule of
clipforge checkpoints written before 2026-11-30, which resume only with it (the optimizer's groups must match).
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

    def __post_init__(self) -> None:
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


EMBEDDINGS = ("embedding", "pos_embed", "cls_token")  # open_clip/HF "*embedding*", timm's pos_embed, cls_token


def no_weight_decay(name: str, parameter: torch.nn.Parameter, decay_embeddings: bool = True) -> bool:
    exempt = parameter.ndim < 2 or any(part in name for part in ("bn", "ln", "bias", "logit_scale"))
    return exempt or (not decay_embeddings and any(part in name for part in EMBEDDINGS))


def build_optimizer(cfg: OptimConfig, model: torch.nn.Module) -> torch.optim.AdamW:
    import torch  # here, not at the top: OptimConfig is read without torch (clipforge.config)

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    exempt = {n for n, p in named if no_weight_decay(n, p, cfg.weight_decay_embeddings)}
    groups = [
        {"params": [p for n, p in named if n in exempt], "weight_decay": 0.0},
        {"params": [p for n, p in named if n not in exempt], "weight_decay": cfg.weight_decay},
    ]
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if cfg.fused:
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except RuntimeError as exn:  # e.g. a device without the fused kernel
            log.info("fused AdamW unavailable (%s); using the foreach implementation", exn)
    return torch.optim.AdamW(groups, foreach=True, **kwargs)


def lr_factor(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Multiplier of cfg.lr for the update made at ``step`` (0-based)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
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


def build_scheduler(cfg: OptimConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    import torch

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, total_steps))


def load_schedule_state(
    scheduler, optimizer: torch.optim.Optimizer, state: dict, cfg: OptimConfig, total_steps: int
) -> None:
    """Resume the schedule's position (its step count) from a checkpoint, after ``optimizer.load_state_dict``. The
    learning rate itself follows this run's config (optim.lr, warmup, schedule, train.steps), as open_clip_train
    recomputes it from its arguments every step; with an unchanged config it is the same number."""
    scheduler.load_state_dict({k: v for k, v in state.items() if k not in ("base_lrs", "_last_lr")})
    scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
    lr = cfg.lr * lr_factor(scheduler.last_epoch, cfg, total_steps)  # LambdaLR's own expression: base * factor
    for group in optimizer.param_groups:
        group["initial_lr"], group["lr"] = cfg.lr, lr
