"""Contrastive losses: CLIP's symmetric InfoNCE and SigLIP's sigmoid loss, distributed, optionally tiled.

Both take L2-normalised features (B_local, D) and the *multiplier* ``logit_scale`` (= exp of the
model's learnable log inverse temperature), as open_clip's losses do; SigLIP also takes
``logit_bias``. Everything is computed in fp32 whatever the dtype of the features.

Distributed (``world_size > 1``): ``ClipLoss`` all-gathers features with gradient and computes
only this rank's rows and columns (open_clip's "local loss"), so the gradients averaged by DDP
equal those of one process holding the whole global batch. ``SigLipLoss`` either all-gathers the
text features or passes them around a ring of neighbour exchanges (no all-gather; each rank sees
every text block once, as in the SigLIP paper). Normalisation: CLIP takes the mean over the global
batch; SigLIP sums over all pairs and divides by the local batch (open_clip's convention), which
DDP's average turns into the sum over the global batch divided by it.

Tiled (``tile_size > 0``): the logits are never materialised. InfoNCE keeps only a per-row
log-sum-exp in forward and recomputes (tile × tile) blocks in backward (Inf-CL, Cheng et al.
2024); the sigmoid loss is a sum of elementwise terms and is tiled the same way. Peak memory is
O(tile²) instead of O(B_local × B_global); results equal the untiled loss to float rounding.

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
at a time (``LossConfig``, in ``loss_config.py``, refuses other combinations, naming the keys).

Distillation (``distill_weight`` = λ > 0; MobileCLIP, Vasu et al. 2024, "multi-modal reinforced training"): with
a teacher's embeddings of the same samples (stored by ``clipforge prep score`` and read with ``data.teacher``, or
computed online by ``loss.distill_model``), the student's image→text and text→image similarity distributions over
the global batch are pulled towards the teacher's, at the teacher's temperature τ_T:

    p^T_ij = softmax_j(cos(u_i, v_j) / τ_T)      p^S_ij = softmax_j(t · cos(x_i, y_j))      (teacher u, v; student x, y)
    L_distill = 1/2 [ mean_i KL(p^T_i· || p^S_i·)  +  the same over the transposed matrices (text → image) ]
    L = (1 - λ) L_CLIP + λ L_distill

as MobileCLIP weighs them (λ = 1: distillation alone). Teacher embeddings are all-gathered without gradient;
the student's with gradient, so each rank's rows give exactly one process's gradients (tested at 2 gloo ranks).
The loss returns the two weighted terms, ``contrastive`` and ``distill``; their sum is what is minimised.

``naive_clip_loss`` and ``naive_siglip_loss`` are the single-process references of the tests (and
``naive_distillation_loss``);
``clamp_logit_scale`` is the post-step temperature clamp (CLIP: logit scale ≤ 100).
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.distributed as dist
import torch.nn.functional as F

from clipforge.distributed import all_gather, gather_with_grad
from clipforge.loss_config import LOSS_KINDS, SIGLIP_EXCHANGES, LossConfig, check_clip_options

# ---------------------------------------------------------------------------------------------
# Tiled (memory-flat) primitives, in the manner of Inf-CL (Cheng et al., 2024): the (rows, columns)
# logits are never materialised; forward keeps only a per-row log-sum-exp, backward recomputes
# each (tile × tile) block. Peak memory is O(tile²), not O(B_local × B_global).


def _tiles(size: int, tile: int):
    return [(start, min(start + tile, size)) for start in range(0, size, tile)]


class _TiledLogSumExp(torch.autograd.Function):
    """lse_i = log Σ_j exp(scale · q_i · k_j) for queries (R, D), keys (C, D) → (R,)."""

    @staticmethod
    def forward(ctx, queries, keys, scale, tile):
        lse = torch.empty(queries.shape[0], device=queries.device, dtype=torch.float32)
        for r0, r1 in _tiles(queries.shape[0], tile):
            scaled = queries[r0:r1] * scale
            parts = [
                torch.logsumexp(scaled @ keys[c0:c1].T, dim=1)  # (tile_r,)
                for c0, c1 in _tiles(keys.shape[0], tile)
            ]
            lse[r0:r1] = torch.logsumexp(torch.stack(parts), dim=0)
        ctx.save_for_backward(queries, keys, scale, lse)
        ctx.tile = tile
        return lse

    @staticmethod
    def backward(ctx, grad_lse):
        queries, keys, scale, lse = ctx.saved_tensors
        grad_queries, grad_keys = torch.zeros_like(queries), torch.zeros_like(keys)
        grad_scale = torch.zeros((), device=queries.device, dtype=torch.float32)
        for r0, r1 in _tiles(queries.shape[0], ctx.tile):
            q, g, row_lse = queries[r0:r1], grad_lse[r0:r1, None], lse[r0:r1, None]
            scaled = q * scale
            for c0, c1 in _tiles(keys.shape[0], ctx.tile):
                k = keys[c0:c1]
                weights = (scaled @ k.T).sub_(row_lse).exp_().mul_(g)  # softmax × upstream gradient, (tile_r, tile_c)
                weighted_keys = weights @ k
                grad_queries[r0:r1] += scale * weighted_keys
                grad_keys[c0:c1] += weights.T @ scaled
                grad_scale += (q * weighted_keys).sum()  # Σ weights ⊙ (q kᵀ), without a tile-sized product
        return grad_queries, grad_keys, grad_scale, None


def tiled_logsumexp(queries: torch.Tensor, keys: torch.Tensor, scale: torch.Tensor, tile: int) -> torch.Tensor:
    return _TiledLogSumExp.apply(queries, keys, scale, tile)


class _SymmetricTiledLogSumExp(torch.autograd.Function):
    """Row and column log-sum-exp of scale · A Bᵀ for square (N, D) inputs, sharing every tile's product.

    One process holding the whole batch needs both directions of the same matrix: each tile is
    multiplied once in forward and once in backward (four products in all, against six for
    materialised logits).
    """

    @staticmethod
    def forward(ctx, rows, cols, scale, tile):
        row_lse = torch.full((rows.shape[0],), -math.inf, device=rows.device)
        col_lse = torch.full((cols.shape[0],), -math.inf, device=rows.device)
        for r0, r1 in _tiles(rows.shape[0], tile):
            scaled = rows[r0:r1] * scale
            for c0, c1 in _tiles(cols.shape[0], tile):
                logits = scaled @ cols[c0:c1].T  # (tile_r, tile_c)
                row_lse[r0:r1] = torch.logaddexp(row_lse[r0:r1], torch.logsumexp(logits, dim=1))
                col_lse[c0:c1] = torch.logaddexp(col_lse[c0:c1], torch.logsumexp(logits, dim=0))
        ctx.save_for_backward(rows, cols, scale, row_lse, col_lse)
        ctx.tile = tile
        return row_lse, col_lse

    @staticmethod
    def backward(ctx, grad_row_lse, grad_col_lse):
        rows, cols, scale, row_lse, col_lse = ctx.saved_tensors
        grad_rows, grad_cols = torch.zeros_like(rows), torch.zeros_like(cols)
        grad_scale = torch.zeros((), device=rows.device, dtype=torch.float32)
        for r0, r1 in _tiles(rows.shape[0], ctx.tile):
            q = rows[r0:r1]
            scaled = q * scale
            for c0, c1 in _tiles(cols.shape[0], ctx.tile):
                k = cols[c0:c1]
                logits = scaled @ k.T
                weights = torch.exp(logits - row_lse[r0:r1, None]).mul_(grad_row_lse[r0:r1, None])
                weights += logits.sub_(col_lse[None, c0:c1]).exp_().mul_(grad_col_lse[None, c0:c1])
                weighted_cols = weights @ k
                grad_rows[r0:r1] += scale * weighted_cols
                grad_cols[c0:c1] += weights.T @ scaled
                grad_scale += (q * weighted_cols).sum()
        return grad_rows, grad_cols, grad_scale, None


class _TiledSoftplusSum(torch.autograd.Function):
    """Σ_ij softplus(scale · q_i · k_j + bias) for queries (R, D), keys (C, D), in (tile × tile) blocks.

    The sigmoid loss of a negative pair is -log σ(-logit) = softplus(logit); a positive pair's
    -log σ(logit) = softplus(logit) - logit, so the caller subtracts the positive logits.
    """

    @staticmethod
    def forward(ctx, queries, keys, scale, bias, tile):
        total = torch.zeros((), device=queries.device, dtype=torch.float32)
        for r0, r1 in _tiles(queries.shape[0], tile):
            scaled = queries[r0:r1] * scale
            for c0, c1 in _tiles(keys.shape[0], tile):
                total += F.softplus(torch.addmm(bias, scaled, keys[c0:c1].T)).sum()
        ctx.save_for_backward(queries, keys, scale, bias)
        ctx.tile = tile
        return total

    @staticmethod
    def backward(ctx, grad_total):
        queries, keys, scale, bias = ctx.saved_tensors
        grad_queries, grad_keys = torch.zeros_like(queries), torch.zeros_like(keys)
        grad_scale = torch.zeros((), device=queries.device, dtype=torch.float32)
        grad_bias = torch.zeros((), device=queries.device, dtype=torch.float32)
        for r0, r1 in _tiles(queries.shape[0], ctx.tile):
            q = queries[r0:r1]
            scaled = q * scale
            for c0, c1 in _tiles(keys.shape[0], ctx.tile):
                k = keys[c0:c1]
                grad_logits = torch.addmm(bias, scaled, k.T).sigmoid_().mul_(grad_total)  # softplus' = sigmoid
                weighted_keys = grad_logits @ k
                grad_queries[r0:r1] += scale * weighted_keys
                grad_keys[c0:c1] += grad_logits.T @ scaled
                grad_scale += (q * weighted_keys).sum()
                grad_bias += grad_logits.sum()
        return grad_queries, grad_keys, grad_scale, grad_bias, None


def _sigmoid_loss_sum(queries, keys, scale, bias, positive_offset, tile_size: int) -> torch.Tensor:
    """Σ -log σ(z · logits) over all (query, key) pairs, z = +1 at (i, i + positive_offset), else -1;
    positive_offset None = negatives only."""
    if tile_size:
        total = _TiledSoftplusSum.apply(queries, keys, scale, bias, tile_size)
        if positive_offset is not None:
            partners = keys[positive_offset : positive_offset + queries.shape[0]]
            total = total - (scale * (queries * partners).sum(dim=1) + bias).sum()
        return total
    logits = scale * queries @ keys.T + bias  # (R, C)
    signs = -torch.ones_like(logits)
    if positive_offset is not None:
        rows = torch.arange(queries.shape[0], device=queries.device)
        signs[rows, rows + positive_offset] = 1.0
    return -F.logsigmoid(signs * logits).sum()


def _gather_ids(ids: torch.Tensor, world_size: int, group) -> torch.Tensor:
    """All-gather per-sample ids (B_local,) → (B_global,), no gradient."""
    return all_gather(ids, world_size, group)


def _hard_negative_loss(
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
                image_lse, text_lse = _SymmetricTiledLogSumExp.apply(
                    image_features, text_features, scale, self.tile_size
                )
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
            _hard_negative_loss(scale * image_features @ all_text.T, *options)
            + _hard_negative_loss(scale * text_features @ all_image.T, *options)
        ) / 2


class _NeighbourExchange(torch.autograd.Function):
    """Send ``tensor`` to rank ``to``, receive one of the same shape from rank ``source``; gradients go back."""

    @staticmethod
    def forward(ctx, tensor, to, source, group):
        ctx.to, ctx.source, ctx.group = to, source, group
        return _exchange(tensor, to, source, group)

    @staticmethod
    def backward(ctx, grad):
        return _exchange(grad, ctx.source, ctx.to, ctx.group), None, None, None


def _exchange(tensor: torch.Tensor, to: int, source: int, group) -> torch.Tensor:
    """Send ``tensor`` (B, D) to ``to`` and receive a (B, D) one from ``source`` in one batched P2P call.

    Under NCCL a lone send may hold its stream until the peer's matching receive runs; when every rank of the ring
    posts its send first, the receives queue behind the sends and the ring can deadlock. ``batch_isend_irecv``
    launches the pair as one NCCL group (open_clip's ``neighbour_exchange``)."""
    tensor = tensor.contiguous()
    received = torch.empty_like(tensor, memory_format=torch.contiguous_format)
    operations = [
        dist.P2POp(dist.isend, tensor, to, group=group),
        dist.P2POp(dist.irecv, received, source, group=group),
    ]
    for request in dist.batch_isend_irecv(operations):
        request.wait()
    return received


class SigLipLoss(torch.nn.Module):
    """Pairwise sigmoid loss (Zhai et al., 2023) with learnable temperature and bias."""

    def __init__(
        self, rank: int = 0, world_size: int = 1, exchange: str = "all_gather", tile_size: int = 0, group=None
    ) -> None:
        super().__init__()
        if exchange not in SIGLIP_EXCHANGES:
            raise ValueError(f"loss.siglip_exchange: {exchange!r} is not one of {SIGLIP_EXCHANGES}")
        self.rank, self.world_size, self.exchange = rank, world_size, exchange
        self.tile_size, self.group = tile_size, group

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        image_features, text_features = image_features.float(), text_features.float()
        scale, bias = logit_scale.float(), logit_bias.float()
        local_batch = image_features.shape[0]
        if self.world_size == 1 or self.exchange == "all_gather":
            all_text = gather_with_grad(text_features, self.rank, self.world_size, self.group)  # (B_global, D)
            total = _sigmoid_loss_sum(image_features, all_text, scale, bias, local_batch * self.rank, self.tile_size)
            return {"contrastive": total / local_batch}
        total = _sigmoid_loss_sum(image_features, text_features, scale, bias, 0, self.tile_size)
        right, left = (self.rank + 1) % self.world_size, (self.rank - 1) % self.world_size
        passing = text_features
        for _ in range(self.world_size - 1):  # every other rank's texts, one hop at a time: negatives only
            passing = _NeighbourExchange.apply(passing, right, left, self.group)
            total = total + _sigmoid_loss_sum(image_features, passing, scale, bias, None, self.tile_size)
        return {"contrastive": total / local_batch}


def queue_contrastive_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    image_keys: torch.Tensor,
    text_keys: torch.Tensor,
    image_queue: torch.Tensor,
    text_queue: torch.Tensor,
    logit_scale: torch.Tensor,
    rank: int = 0,
) -> torch.Tensor:
    """Online (B_local, D) embeddings against momentum keys of the global batch (B_global, D) and the queues
    (Q, D); row i's positive is global key ``rank · B_local + i``."""
    labels = torch.arange(image.shape[0], device=image.device) + rank * image.shape[0]
    logits_per_image = logit_scale * image.float() @ torch.cat([text_keys, text_queue]).float().T
    logits_per_text = logit_scale * text.float() @ torch.cat([image_keys, image_queue]).float().T
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


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


def build_loss(
    cfg: LossConfig, rank: int = 0, world_size: int = 1, teacher_temperature: float | None = None
) -> torch.nn.Module:
    """The configured loss; with ``cfg.distill_weight``, wrapped in ``DistillationLoss`` at
    ``cfg.distill_teacher_temperature`` or else ``teacher_temperature`` (the teacher's own, found by the caller)."""
    if cfg.distill_weight:
        temperature = cfg.distill_teacher_temperature or teacher_temperature
        if temperature is None:
            raise ValueError(
                "loss.distill_weight: the teacher's temperature is unknown (its teacher.json has none): set "
                "loss.distill_teacher_temperature"
            )
        plain = build_loss(replace(cfg, distill_weight=0.0, distill_model=None), rank, world_size)
        return DistillationLoss(plain, cfg.distill_weight, temperature, rank, world_size)
    if cfg.kind == "clip":
        return ClipLoss(
            rank,
            world_size,
            cfg.tile_size,
            positives=cfg.positives,
            hard_negative_beta=cfg.hard_negative_beta,
            debias_tau_plus=cfg.debias_tau_plus,
        )
    if cfg.kind == "siglip":
        return SigLipLoss(rank, world_size, cfg.siglip_exchange, cfg.tile_size)
    raise ValueError(f"loss.kind: {cfg.kind!r} is not one of {LOSS_KINDS}")


@torch.no_grad()
def clamp_logit_scale(log_scale: torch.nn.Parameter, max_logit_scale: float) -> None:
    """Keep exp(log_scale) in [1, max_logit_scale] (in place, after the optimizer step)."""
    log_scale.clamp_(0, math.log(max_logit_scale))
