"""AdamW with CLIP's parameter groups, and a warmup + cosine learning-rate schedule.

No weight decay on biases, norm weights, embeddings (token, positional, class) and the
temperature ``logit_scale`` (what open_clip_train excludes, plus the embeddings).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    lr: float = 5e-4
    """Peak learning rate (after warmup)."""
    weight_decay: float = 0.2
    """AdamW decoupled weight decay on weight matrices (none on biases, norms, embeddings, logit_scale)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.98
    """AdamW beta2 (0.98 as in CLIP)."""
    eps: float = 1e-6
    """AdamW epsilon."""
    warmup_steps: int = 100
    """Linear warmup from 0 to lr over this many steps."""
    schedule: str = "cosine"
    """After warmup: cosine (decay to min_lr at the last step) or constant."""
    min_lr: float = 0.0
    """Final learning rate of the cosine schedule."""
    grad_clip_norm: float | None = 1.0
    """Clip the global gradient norm to this value (null = no clipping)."""
    fused: bool = True
    """Fused AdamW kernel (one kernel for all parameters) where the device supports it; else the foreach one."""

    def __post_init__(self) -> None:
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"optim.schedule: {self.schedule!r} is not one of ('cosine', 'constant')")
        if self.lr <= 0:
            raise ValueError(f"optim.lr: must be positive, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps: must be >= 0, got {self.warmup_steps}")


def no_weight_decay(name: str, parameter: torch.nn.Parameter) -> bool:
    return parameter.ndim < 2 or "embedding" in name or "logit_scale" in name or "logit_bias" in name


def build_optimizer(cfg: OptimConfig, model: torch.nn.Module) -> torch.optim.AdamW:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if no_weight_decay(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not no_weight_decay(n, p)], "weight_decay": cfg.weight_decay},
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
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    floor = cfg.min_lr / cfg.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(cfg: OptimConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, total_steps))
