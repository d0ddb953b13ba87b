"""Step strategies: how one batch becomes one optimizer update. Chosen once, at build time.

``PlainStep``: forward both towers under autocast, contrastive loss in fp32, backward, clip the
gradient norm, AdamW step, schedule step, clamp the temperature. It returns detached tensors
only: nothing here forces a host sync.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from clipforge.losses import clamp_logit_scale
from clipforge.train.parallel import unwrap

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16}


class PlainStep:
    def __init__(self, model: torch.nn.Module, loss_fn: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler, device: str, precision: str, grad_clip_norm: float | None, max_logit_scale: float) -> None:
        self.model, self.loss_fn, self.optimizer, self.scheduler = model, loss_fn, optimizer, scheduler
        self.device = torch.device(device)
        self.autocast_dtype = AUTOCAST_DTYPES[precision]
        self.grad_clip_norm, self.max_logit_scale = grad_clip_norm, max_logit_scale

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def __call__(self, batch: dict) -> dict[str, torch.Tensor]:
        images = batch["images"].to(self.device, non_blocking=True)
        texts = batch["texts"].to(self.device, non_blocking=True)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            out = self.model(images, texts)
        losses = self.loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        loss = sum(losses.values())
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), self.grad_clip_norm if self.grad_clip_norm else float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        clamp_logit_scale(unwrap(self.model).logit_scale, self.max_logit_scale)
        return {"loss": loss.detach(), "grad_norm": grad_norm.detach(),
                "logit_scale": out["logit_scale"].detach().float(), **{k: v.detach() for k, v in losses.items()}}
