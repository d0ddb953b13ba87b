"""CLIP's symmetric InfoNCE, distributed and optionally tiled, with its multi-positive and hard-negative options.

``ClipLoss`` takes L2-normalised features (B_local, D) and the *multiplier* ``logit_scale`` (= exp of the model's
learnable log inverse temperature), as open_clip's loss does; everything is computed in fp32 whatever the dtype of
the features. ``ClipObjective`` is the same loss under the objective contract (``clipforge.losses.objective``).

Distributed (``world_size > 1``): features are all-gathered with gradient and only this rank's rows and columns are
computed (open_clip's "local loss"), so the gradients averaged by DDP equal those of one process holding the whole
global batch; the loss is the mean over the global batch. Tiled (``tile_size > 0``): the logits are never
materialised (``clipforge.losses.tiled``).

Options of the CLIP loss, each off by default (the default path is the plain loss above, unchanged):

* Multi-positive (``positives`` = caption / image / caption_or_image): samples of the *global* batch
  whose caption (image, either) is identical are positives of each other, not negatives. The loss
  takes per-sample int64 ids (``caption_ids`` / ``image_ids``, e.g. 63-bit hashes from the data
  pipeline), all-gathered without gradient, and replaces each row's cross-entropy by the
  supervised-contrastive "L_out" of Khosla et al. (2020): with P(i) the positive columns of row i,

      loss_i = -1/|P(i)| Σ_{p ∈ P(i)} log softmax(logits_i)_p = LSE_j(logits_ij) - mean_{p ∈ P(i)} logits_ip,

  symmetric (image→text and text→image rows, the same mask) and averaged over the global batch
  exactly as CLIP's cross-entropy is, so distinct ids give the plain CLIP loss.
* Hard negatives (``hard_negative_beta`` = β, ``debias_tau_plus`` = τ⁺): Robinson et al. (2021),
  "Contrastive Learning with Hard Negative Samples", in the form of their official code with
  CLIP's logits s_ij = t · cos(x_i, y_j), t = logit_scale (their s = cos / temperature). Row i has
  the positive s_ii and N = B_global - 1 negatives j ≠ i:

      w_ij   = exp(β s_ij) = exp(β t cos_ij)                      importance weights (not detached)
      R_i    = N Σ_j w_ij exp(s_ij) / Σ_j w_ij                    reweighted negative term
      log R_i = log N + LSE_j((1 + β) s_ij) - LSE_j(β s_ij)
      Ng_i   = max((R_i - N τ⁺ exp(s_ii)) / (1 - τ⁺), N exp(-t))   debiased; the floor is N · min exp(s_ij)
      loss_i = -log(exp(s_ii) / (exp(s_ii) + Ng_i)) = logaddexp(s_ii, log Ng_i) - s_ii

  symmetric and averaged like CLIP. Everything is in log space (LSE; log R - N τ⁺ exp(s_ii) as
  log R + log(1 - exp(d)), d < 0), so β t cos never overflows. β = 0, τ⁺ = 0 is the CLIP loss.
  Note the concentration on the cosine is β · t: as CLIP's learned t grows towards 100, a fixed β
  weights the hardest negatives ever more sharply.

Both options need the (B_local, B_global) logits: loss.kind=clip with tile_size=0 only, one of them
at a time (``LossConfig``, in ``clipforge.losses.config``, refuses other combinations, naming the keys).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from clipforge.distributed import all_gather, gather_with_grad
from clipforge.losses.config import check_clip_options
from clipforge.losses.objective import Objective
from clipforge.losses.tiled import symmetric_tiled_logsumexp, tiled_logsumexp


def _gather_ids(ids: torch.Tensor, world_size: int, group) -> torch.Tensor:
    """All-gather per-sample ids (B_local,) → (B_global,), no gradient."""
    return all_gather(ids, world_size, group)


def hard_negative_loss(
    logits: torch.Tensor,
    diagonal: torch.Tensor,
    labels: torch.Tensor,
    scale: torch.Tensor,
    beta: float,
    tau_plus: float,
) -> torch.Tensor:
    """Mean over rows of Robinson et al.'s loss for logits (R, C) whose positive of row r is column labels[r]."""
    positive = logits.gather(1, labels[:, None]).squeeze(1)  # (R,)
    num_negatives = logits.shape[1] - 1
    if num_negatives == 0:  # a global batch of one: no negatives, Ng = 0, loss = -log 1
        return (positive * 0).mean()
    log_n = math.log(num_negatives)
    if beta:
        log_reweighted = (
            log_n
            + torch.logsumexp(((1 + beta) * logits).masked_fill(diagonal, -math.inf), dim=1)
            - torch.logsumexp((beta * logits).masked_fill(diagonal, -math.inf), dim=1)
        )
    else:  # uniform weights: R = Σ_j exp(s_ij)
        log_reweighted = torch.logsumexp(logits.masked_fill(diagonal, -math.inf), dim=1)
    floor = log_n - scale  # log(N exp(-t)): every negative at cosine -1
    if tau_plus:
        gap = math.log(num_negatives * tau_plus) + positive - log_reweighted  # log(N τ⁺ exp(s_ii) / R)
        valid = gap < 0  # else the debiased term is not positive and the floor applies
        safe_gap = torch.where(valid, gap, torch.full_like(gap, -1.0))  # no NaN in the branch not taken
        debiased = log_reweighted + torch.log(-torch.expm1(safe_gap)) - math.log1p(-tau_plus)
        log_ng = torch.where(valid, torch.maximum(debiased, floor), floor)
    else:
        log_ng = torch.maximum(log_reweighted, floor)
    return (torch.logaddexp(positive, log_ng) - positive).mean()


class ClipLoss(torch.nn.Module):
    """Symmetric InfoNCE: mean of image→text and text→image cross-entropy over the global batch.

    ``positives``, ``hard_negative_beta`` and ``debias_tau_plus`` are the options of ``LossConfig``
    (multi-positive needs ``caption_ids`` / ``image_ids`` in ``forward``); their defaults are the plain loss.
    """

    def __init__(
        self,
        rank: int = 0,
        world_size: int = 1,
        tile_size: int = 0,
        group=None,
        *,
        positives: str = "pairs",
        hard_negative_beta: float = 0.0,
        debias_tau_plus: float = 0.0,
    ) -> None:
        super().__init__()
        check_clip_options("clip", tile_size, positives, hard_negative_beta, debias_tau_plus)
        self.rank, self.world_size, self.tile_size, self.group = rank, world_size, tile_size, group
        self.positives, self.hard_negative_beta, self.debias_tau_plus = positives, hard_negative_beta, debias_tau_plus

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        *,
        caption_ids: torch.Tensor | None = None,
        image_ids: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """``caption_ids`` / ``image_ids``: int64 (B_local,) per-sample ids, used only by multi-positive
        (``positives`` other than pairs), which needs the ones its mode compares; ignored otherwise."""
        image_features, text_features = image_features.float(), text_features.float()
        scale = logit_scale.float()
        all_image = gather_with_grad(image_features, self.rank, self.world_size, self.group)  # (B_global, D)
        all_text = gather_with_grad(text_features, self.rank, self.world_size, self.group)  # (B_global, D)
        if self.positives != "pairs":
            return {
                "contrastive": self._multi_positive(
                    image_features, text_features, all_image, all_text, scale, caption_ids, image_ids
                )
            }
        if self.hard_negative_beta or self.debias_tau_plus:
            return {"contrastive": self._hard_negatives(image_features, text_features, all_image, all_text, scale)}
        if self.tile_size:
            positives = scale * (image_features * text_features).sum(dim=1)  # (B_local,)
            if self.world_size == 1:  # one matrix, both directions
                image_lse, text_lse = symmetric_tiled_logsumexp(image_features, text_features, scale, self.tile_size)
            else:  # this rank's rows of two different (B_local, B_global) matrices
                image_lse = tiled_logsumexp(image_features, all_text, scale, self.tile_size)
                text_lse = tiled_logsumexp(text_features, all_image, scale, self.tile_size)
            return {"contrastive": ((image_lse - positives).mean() + (text_lse - positives).mean()) / 2}
        logits_per_image = scale * image_features @ all_text.T  # (B_local, B_global)
        logits_per_text = scale * text_features @ all_image.T  # (B_local, B_global)
        offset = image_features.shape[0] * self.rank
        labels = torch.arange(offset, offset + image_features.shape[0], device=image_features.device)
        loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
        return {"contrastive": loss}

    def _labels(self, local_batch: int, global_batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's diagonal: the global column of each local row, and the (B_local, B_global) mask of it."""
        rows = torch.arange(local_batch, device=device)
        labels = rows + local_batch * self.rank
        diagonal = torch.zeros(local_batch, global_batch, dtype=torch.bool, device=device)
        diagonal[rows, labels] = True
        return labels, diagonal

    def _ids(self, ids: torch.Tensor | None, name: str, local_batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        if ids is None:
            raise ValueError(
                f"loss.positives={self.positives} needs {name}: pass {name}=(B_local,) int64 ids "
                "of each sample to the loss"
            )
        if ids.shape != (local_batch,) or ids.is_floating_point() or ids.is_complex():
            raise ValueError(
                f"{name}: expected integer ids of shape ({local_batch},), got {ids.dtype} {tuple(ids.shape)}"
            )
        ids = ids.to(device=device, dtype=torch.int64)
        return ids, _gather_ids(ids, self.world_size, self.group)

    def _multi_positive(self, image_features, text_features, all_image, all_text, scale, caption_ids, image_ids):
        local_batch, device = image_features.shape[0], image_features.device
        _, positive = self._labels(local_batch, all_text.shape[0], device)  # a sample is always its own positive
        if self.positives in ("caption", "caption_or_image"):
            local_ids, global_ids = self._ids(caption_ids, "caption_ids", local_batch, device)
            positive |= local_ids[:, None] == global_ids[None, :]
        if self.positives in ("image", "caption_or_image"):
            local_ids, global_ids = self._ids(image_ids, "image_ids", local_batch, device)
            positive |= local_ids[:, None] == global_ids[None, :]
        weights = positive / positive.sum(dim=1, keepdim=True)  # 1/|P(i)| on the positives, (B_local, B_global)

        def l_out(logits):  # -1/|P(i)| Σ_p log softmax(logits_i)_p, mean over rows
            return (torch.logsumexp(logits, dim=1) - (weights * logits).sum(dim=1)).mean()

        return (l_out(scale * image_features @ all_text.T) + l_out(scale * text_features @ all_image.T)) / 2

    def _hard_negatives(self, image_features, text_features, all_image, all_text, scale):
        labels, diagonal = self._labels(image_features.shape[0], all_text.shape[0], image_features.device)
        options = (diagonal, labels, scale, self.hard_negative_beta, self.debias_tau_plus)
        return (
            hard_negative_loss(scale * image_features @ all_text.T, *options)
            + hard_negative_loss(scale * text_features @ all_image.T, *options)
        ) / 2


class ClipObjective(Objective):
    """``ClipLoss`` as an objective: the term ``contrastive``; multi-positive reads ``caption_ids`` / ``image_ids``."""

    term_names = ("contrastive",)

    def __init__(self, loss: ClipLoss) -> None:
        super().__init__()
        self.loss = loss
        self.batch_fields = {
            "pairs": (),
            "caption": ("caption_ids",),
            "image": ("image_ids",),
            "caption_or_image": ("caption_ids", "image_ids"),
        }[loss.positives]

    def forward(self, outputs, batch):
        ids = {name: batch[name] for name in self.batch_fields}
        return self.loss(outputs["image_features"], outputs["text_features"], outputs["logit_scale"], **ids)
