"""A negative queue from a momentum copy of the encoders (MoCo, He et al. 2020; ALBEF's image–text contrastive loss).

With ``loss.queue_size = K > 0`` each step contrasts this rank's online image (text) embeddings against the
*momentum* text (image) embeddings of the whole global batch plus the K most recent ones of earlier steps::

    logits_i2t = t · q_img @ [k_txt(global batch); queue_txt]ᵀ      target: the sample's own k_txt
    logits_t2i = t · q_txt @ [k_img(global batch); queue_img]ᵀ      loss = (CE(i2t) + CE(t2i)) / 2

``queue_contrastive_loss`` is the loss, ``MomentumQueue`` its state, ``QueueObjective`` both under the objective
contract (``clipforge.losses.objective``). The keys ``k`` come
from a copy of the model whose weights (and floating buffers, e.g. batch-norm statistics) follow the trained
ones by an exponential moving average with ``loss.queue_momentum`` m after every update
(θ_k ← m θ_k + (1 − m) θ), run in train mode (batch statistics, as MoCo's key encoder) without gradient;
slow-moving keys keep the queue consistent. Keys carry no gradient, so every rank computes only its own rows
and DDP's average equals one process on the global batch. The queue starts empty and fills (first in, first
out); it, the momentum weights and the write position are in every checkpoint, so a resumed run continues
exactly.

Meant for small batches (a few hundred or less), where in-batch negatives are too few; it costs one more
forward pass of both towers per step and K × D floats per modality.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from clipforge.distributed import all_gather
from clipforge.losses.objective import Objective


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


class MomentumQueue:
    """The momentum encoder and the two queues of one rank (every rank holds the same ones)."""

    def __init__(
        self, model: torch.nn.Module, size: int, momentum: float, rank: int = 0, world_size: int = 1, group=None
    ) -> None:
        """``model``: the plain (unwrapped) model, whose parameters are the ones the optimizer updates."""
        online = model
        # train mode, as MoCo's key encoder: batch-norm towers normalise keys with the batch's statistics, like the
        # online model's queries (running statistics of a fast-changing network lag behind it)
        attached = online._modules.pop("objectives", None)  # objectives the trainer attached: not the encoders'
        try:
            self.encoder = copy.deepcopy(online).train().requires_grad_(False)
        finally:
            if attached is not None:
                online._modules["objectives"] = attached
        self.size, self.momentum = size, momentum
        self.rank, self.world_size, self.group = rank, world_size, group
        device = next(online.parameters()).device
        dim = self._embed_dim(online, device)
        self.image_queue = torch.zeros(size, dim, device=device)
        self.text_queue = torch.zeros(size, dim, device=device)
        self.filled, self.pointer = 0, 0

    @staticmethod
    def _embed_dim(model: torch.nn.Module, device) -> int:
        projection = getattr(model, "text_projection", None)
        if isinstance(projection, torch.nn.Linear):
            return projection.out_features
        if projection is not None:
            return projection.shape[1]
        raise ValueError("loss.queue_size: cannot tell the model's embedding size (no text_projection)")

    @torch.no_grad()
    def keys(self, images: torch.Tensor, texts: torch.Tensor, autocast) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised momentum embeddings of this batch, gathered over the ranks: (B_global, D) each."""
        with autocast():
            image = self.encoder.encode_image(images)
            text = self.encoder.encode_text(texts)
        return (
            all_gather(F.normalize(image.float(), dim=-1), self.world_size, self.group),
            all_gather(F.normalize(text.float(), dim=-1), self.world_size, self.group),
        )

    def queued(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.image_queue[: self.filled], self.text_queue[: self.filled]

    @torch.no_grad()
    def update_encoder(self, model: torch.nn.Module) -> None:
        """θ_k ← m θ_k + (1 − m) θ for every parameter and floating buffer; integer buffers are copied."""
        online = model.state_dict()
        for name, value in self.encoder.state_dict().items():
            if value.is_floating_point():
                value.mul_(self.momentum).add_(online[name].detach(), alpha=1 - self.momentum)
            else:
                value.copy_(online[name])

    @torch.no_grad()
    def enqueue(self, image_keys: torch.Tensor, text_keys: torch.Tensor) -> None:
        """Write the newest keys over the oldest (a ring of ``size`` rows)."""
        count = min(len(image_keys), self.size)
        image_keys, text_keys = image_keys[-count:], text_keys[-count:]
        rows = (self.pointer + torch.arange(count, device=self.image_queue.device)) % self.size
        self.image_queue[rows] = image_keys.to(self.image_queue.dtype)
        self.text_queue[rows] = text_keys.to(self.text_queue.dtype)
        self.pointer = (self.pointer + count) % self.size
        self.filled = min(self.size, self.filled + count)

    def state_dict(self) -> dict:
        return {
            "encoder": self.encoder.state_dict(),
            "image_queue": self.image_queue,
            "text_queue": self.text_queue,
            "filled": self.filled,
            "pointer": self.pointer,
        }

    def load_state_dict(self, state: dict) -> None:
        self.encoder.load_state_dict(state["encoder"])
        self.image_queue.copy_(state["image_queue"])
        self.text_queue.copy_(state["text_queue"])
        self.filled, self.pointer = int(state["filled"]), int(state["pointer"])


class QueueObjective(Objective):
    """The queue loss as an objective: the term ``contrastive``. Before the model's forward, the momentum encoder
    makes the batch's keys (under the step's autocast); after an applied update the encoder follows the model and
    the keys are enqueued (one host sync per step for the skip flag). The momentum encoder is a copy of the model
    taken when it is bound (``bind``); its restart state is the queue's."""

    term_names = ("contrastive",)

    def __init__(self, size: int, momentum: float, autocast, rank: int = 0, world_size: int = 1, group=None) -> None:
        super().__init__()
        self.size, self.momentum, self.autocast = size, momentum, autocast
        self.rank, self.world_size, self.group = rank, world_size, group
        self.queue: MomentumQueue | None = None
        self.online: list[torch.nn.Module] = []  # a list, so the model is not registered as a submodule
        self._keys = None

    def bind(self, model: torch.nn.Module) -> None:
        self.queue = MomentumQueue(model, self.size, self.momentum, self.rank, self.world_size, self.group)
        self.online = [model]

    def before_forward(self, batch):
        self._keys = self._bound().keys(batch["images"], batch["texts"], self.autocast)

    def _bound(self) -> MomentumQueue:
        if self.queue is None:
            raise RuntimeError("the queue objective was never bound to a model (Objectives.bind)")
        return self.queue

    def forward(self, outputs, batch):
        loss = queue_contrastive_loss(
            outputs["image_features"],
            outputs["text_features"],
            *self._keys,
            *self._bound().queued(),
            outputs["logit_scale"],
            self.rank,
        )
        return {"contrastive": loss}

    @property
    def needs_host_sync(self) -> bool:
        return True

    def after_update(self, applied):
        if bool(applied):  # the queue's one host sync: only an applied update is enqueued
            self.queue.update_encoder(self.online[0])
            self.queue.enqueue(*self._keys)

    def restart_pieces(self) -> dict:
        return {"queue": self._bound()}
