"""MobileCLIP's distillation (Vasu et al. 2024, "multi-modal reinforced training") beside a contrastive loss.

With ``distill_weight`` = λ > 0 and
a teacher's embeddings of the same samples (stored by ``clipforge prep score`` and read with ``data.teacher``, or
computed online by ``loss.distill_model``), the student's image→text and text→image similarity distributions over
the global batch are pulled towards the teacher's, at the teacher's temperature τ_T:

    p^T_ij = softmax_j(cos(u_i, v_j) / τ_T)      p^S_ij = softmax_j(t · cos(x_i, y_j))      (teacher u, v; student x, y)
    L_distill = 1/2 [ mean_i KL(p^T_i· || p^S_i·)  +  the same over the transposed matrices (text → image) ]
    L = (1 - λ) L_CLIP + λ L_distill

as MobileCLIP weighs them (λ = 1: distillation alone). Teacher embeddings are all-gathered without gradient;
the student's with gradient, so each rank's rows give exactly one process's gradients (tested at 2 gloo ranks).
The loss returns the two weighted terms, ``contrastive`` and ``distill``; their sum is what is minimised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clipforge.distributed import all_gather, gather_with_grad
from clipforge.losses.objective import Objective


def _kl_rows(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(softmax(teacher) ‖ softmax(student)), logits (R, C)."""
    teacher_log_p = F.log_softmax(teacher_logits, dim=1)
    student_log_p = F.log_softmax(student_logits, dim=1)
    return (teacher_log_p.exp() * (teacher_log_p - student_log_p)).sum(dim=1).mean()


def distillation_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    teacher_image: torch.Tensor,
    teacher_text: torch.Tensor,
    teacher_logit_scale: float,
    rank: int = 0,
    world_size: int = 1,
    group=None,
) -> torch.Tensor:
    """MobileCLIP's L_distill for this rank's rows: student features (B_local, D) with gradient, the teacher's
    (B_local, D_T) without; the mean of the two directions' KL over the global batch (DDP's average completes it)."""
    teacher_image, teacher_text = teacher_image.detach().float(), teacher_text.detach().float()
    all_image = gather_with_grad(image_features, rank, world_size, group)  # (B_global, D)
    all_text = gather_with_grad(text_features, rank, world_size, group)  # (B_global, D)
    all_teacher_image = all_gather(teacher_image, world_size, group)  # (B_global, D_T)
    all_teacher_text = all_gather(teacher_text, world_size, group)  # (B_global, D_T)
    image_to_text = _kl_rows(
        teacher_logit_scale * teacher_image @ all_teacher_text.T, logit_scale * image_features @ all_text.T
    )  # (B_local, B_global) logits on both sides
    text_to_image = _kl_rows(
        teacher_logit_scale * teacher_text @ all_teacher_image.T, logit_scale * text_features @ all_image.T
    )
    return (image_to_text + text_to_image) / 2


class DistillationLoss(torch.nn.Module):
    """A contrastive loss plus MobileCLIP's distillation: {"contrastive": (1 - λ) L, "distill": λ L_distill}."""

    def __init__(
        self,
        contrastive: torch.nn.Module,
        weight: float,
        teacher_temperature: float,
        rank: int = 0,
        world_size: int = 1,
        group=None,
    ) -> None:
        super().__init__()
        if not teacher_temperature > 0:
            raise ValueError(f"loss.distill_teacher_temperature: must be positive, got {teacher_temperature}")
        self.contrastive, self.weight, self.teacher_logit_scale = contrastive, weight, 1.0 / teacher_temperature
        self.rank, self.world_size, self.group = rank, world_size, group

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        *,
        teacher_image: torch.Tensor | None = None,
        teacher_text: torch.Tensor | None = None,
        **ids: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """``teacher_image`` / ``teacher_text``: (B_local, D_T) teacher embeddings of the same samples."""
        if teacher_image is None or teacher_text is None:
            raise ValueError(
                "loss.distill_weight needs the teacher's embeddings of each batch: set data.teacher or "
                "loss.distill_model"
            )
        if teacher_image.shape[0] != image_features.shape[0] or teacher_text.shape != teacher_image.shape:
            raise ValueError(
                f"teacher embeddings {tuple(teacher_image.shape)} / {tuple(teacher_text.shape)} do not match the "
                f"batch of {image_features.shape[0]}"
            )
        image_features, text_features, scale = image_features.float(), text_features.float(), logit_scale.float()
        contrastive = self.contrastive(image_features, text_features, scale, **ids)["contrastive"]
        distill = distillation_loss(
            image_features,
            text_features,
            scale,
            teacher_image,
            teacher_text,
            self.teacher_logit_scale,
            self.rank,
            self.world_size,
            self.group,
        )
        return {"contrastive": (1 - self.weight) * contrastive, "distill": self.weight * distill}


class DistillationObjective(Objective):
    """``DistillationLoss`` as an objective: the terms ``contrastive`` and ``distill``. The teacher's embeddings are
    the batch fields ``teacher_image`` / ``teacher_text`` (stored, ``data.teacher``), or come from ``teacher``, an
    online model called on the batch's images and tokens without gradient (``loss.distill_model``)."""

    term_names = ("contrastive", "distill")

    def __init__(self, loss: DistillationLoss, teacher=None) -> None:
        super().__init__()
        self.loss, self.teacher = loss, teacher
        ids = getattr(loss.contrastive, "positives", "pairs")
        own = {"pairs": (), "caption": ("caption_ids",), "image": ("image_ids",)}.get(ids, ("caption_ids", "image_ids"))
        self.batch_fields = own if teacher is not None else (*own, "teacher_image", "teacher_text")
        self._ids = own

    def forward(self, outputs, batch):
        if self.teacher is not None:
            teacher_image, teacher_text = self.teacher(batch["images"], batch["texts"])
        else:
            teacher_image, teacher_text = batch.get("teacher_image"), batch.get("teacher_text")
        return self.loss(
            outputs["image_features"],
            outputs["text_features"],
            outputs["logit_scale"],
            teacher_image=teacher_image,
            teacher_text=teacher_text,
            **{name: batch[name] for name in self._ids},
        )
