"""Single-process references the loss tests compare against: the papers' pseudocode on one process holding the whole
batch, written independently of ``clipforge.losses``."""

import torch
import torch.nn.functional as F


def naive_clip_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Reference: the full (B, B) logits of one process, straight from the CLIP paper's pseudocode."""
    logits = logit_scale * image_features.float() @ text_features.float().T  # (B, B)
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def naive_siglip_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor
) -> torch.Tensor:
    """Reference: the SigLIP paper's pseudocode on one process, normalised by the batch size."""
    logits = logit_scale * image_features.float() @ text_features.float().T + logit_bias  # (B, B)
    labels = 2 * torch.eye(logits.shape[0], device=logits.device) - 1
    return -F.logsigmoid(labels * logits).sum() / logits.shape[0]


def naive_distillation_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    teacher_image: torch.Tensor,
    teacher_text: torch.Tensor,
    teacher_logit_scale: float,
) -> torch.Tensor:
    """Reference: the whole (B, B) similarity matrices of one process, KL written out as Σ p log(p / q)."""
    losses = []
    for student, teacher in (
        (logit_scale * image_features.float() @ text_features.float().T, teacher_image @ teacher_text.T),
        (logit_scale * text_features.float() @ image_features.float().T, teacher_text @ teacher_image.T),
    ):
        p = torch.softmax(teacher_logit_scale * teacher.double(), dim=1)
        q = torch.softmax(student.double(), dim=1)
        losses.append((p * (p.log() - q.log())).sum(dim=1).mean())
    return ((losses[0] + losses[1]) / 2).float()
