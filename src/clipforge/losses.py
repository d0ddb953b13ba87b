"""Contrastive losses: symmetric InfoNCE with a learnable temperature (CLIP).

``ClipLoss(rank, world_size)`` takes L2-normalised features (B_local, D) and the *multiplier*
``logit_scale`` (= exp of the model's learnable log inverse temperature), as open_clip's
``ClipLoss`` does. With ``world_size > 1`` it all-gathers features with gradient and computes
only this rank's rows and columns (the "local loss" of open_clip), so DDP's gradient average
equals the gradient of one process holding the whole global batch. The loss is computed in fp32
whatever the dtype of the features.

``naive_clip_loss`` is the single-process reference the tests compare against; ``clamp_logit_scale``
is the post-step temperature clamp (CLIP paper: logit scale ≤ 100).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from clipforge.distributed import gather_with_grad

LOSS_KINDS = ("clip",)


@dataclass
class LossConfig:
    """The contrastive objective."""

    kind: str = "clip"
    """Which loss: clip (symmetric InfoNCE)."""
    max_logit_scale: float = 100.0
    """Upper clamp on exp(logit_scale), applied after every optimizer step (CLIP uses 100)."""

    def __post_init__(self) -> None:
        if self.kind not in LOSS_KINDS:
            raise ValueError(f"loss.kind: {self.kind!r} is not one of {LOSS_KINDS}")
        if not self.max_logit_scale > 0:
            raise ValueError(f"loss.max_logit_scale: must be positive, got {self.max_logit_scale}")


class ClipLoss(torch.nn.Module):
    """Symmetric InfoNCE: mean of image→text and text→image cross-entropy over the global batch."""

    def __init__(self, rank: int = 0, world_size: int = 1, group=None) -> None:
        super().__init__()
        self.rank, self.world_size, self.group = rank, world_size, group

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor) -> dict[str, torch.Tensor]:
        image_features, text_features = image_features.float(), text_features.float()
        all_image = gather_with_grad(image_features, self.rank, self.world_size, self.group)  # (B_global, D)
        all_text = gather_with_grad(text_features, self.rank, self.world_size, self.group)  # (B_global, D)
        scale = logit_scale.float()
        logits_per_image = scale * image_features @ all_text.T  # (B_local, B_global)
        logits_per_text = scale * text_features @ all_image.T  # (B_local, B_global)
        offset = image_features.shape[0] * self.rank
        labels = torch.arange(offset, offset + image_features.shape[0], device=image_features.device)
        loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
        return {"contrastive": loss}


def naive_clip_loss(image_features: torch.Tensor, text_features: torch.Tensor,
                    logit_scale: torch.Tensor) -> torch.Tensor:
    """Reference: the full (B, B) logits of one process, straight from the CLIP paper's pseudocode."""
    logits = logit_scale * image_features.float() @ text_features.float().T  # (B, B)
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def build_loss(cfg: LossConfig, rank: int = 0, world_size: int = 1) -> torch.nn.Module:
    if cfg.kind == "clip":
        return ClipLoss(rank, world_size)
    raise ValueError(f"loss.kind: {cfg.kind!r} is not one of {LOSS_KINDS}")


@torch.no_grad()
def clamp_logit_scale(log_scale: torch.nn.Parameter, max_logit_scale: float) -> None:
    """Keep exp(log_scale) in [1, max_logit_scale] (in place, after the optimizer step)."""
    log_scale.clamp_(0, math.log(max_logit_scale))
