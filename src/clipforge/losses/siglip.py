"""SigLIP's pairwise sigmoid loss (Zhai et al., 2023) with learnable temperature and bias, distributed and tiled.

Takes L2-normalised features (B_local, D), the multiplier ``logit_scale`` and ``logit_bias``; fp32 throughout.
Distributed, it either all-gathers the text features or passes them around a ring of neighbour exchanges (no
all-gather; each rank sees every text block once, as in the SigLIP paper). Normalisation: the sum over all pairs
divided by the local batch (open_clip's convention), which DDP's average turns into the sum over the global batch
divided by it. Tiled (``tile_size > 0``): ``clipforge.losses.tiled.sigmoid_loss_sum``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from clipforge.distributed import gather_with_grad
from clipforge.losses.config import SIGLIP_EXCHANGES
from clipforge.losses.objective import Objective
from clipforge.losses.tiled import sigmoid_loss_sum


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
            total = sigmoid_loss_sum(image_features, all_text, scale, bias, local_batch * self.rank, self.tile_size)
            return {"contrastive": total / local_batch}
        total = sigmoid_loss_sum(image_features, text_features, scale, bias, 0, self.tile_size)
        right, left = (self.rank + 1) % self.world_size, (self.rank - 1) % self.world_size
        passing = text_features
        for _ in range(self.world_size - 1):  # every other rank's texts, one hop at a time: negatives only
            passing = _NeighbourExchange.apply(passing, right, left, self.group)
            total = total + sigmoid_loss_sum(image_features, passing, scale, bias, None, self.tile_size)
        return {"contrastive": total / local_batch}


class SigLipObjective(Objective):
    """``SigLipLoss`` as an objective: the term ``contrastive``, from the features, scale and bias."""

    term_names = ("contrastive",)

    def __init__(self, loss: SigLipLoss) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, outputs, batch):
        return self.loss(
            outputs["image_features"], outputs["text_features"], outputs["logit_scale"], outputs["logit_bias"]
        )
