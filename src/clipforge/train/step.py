"""Step strategies: how one batch becomes one optimizer update. Chosen once, at build time.

``PlainStep``: forward both towers under autocast, contrastive loss in fp32, backward, clip the
gradient norm, AdamW step, schedule step, clamp the temperature.

``CachedAccumulationStep`` (``train.accum_steps = k > 1``): GradCache (Gao et al., 2021). The batch
is split into k micro-batches whose features are computed without a graph; the loss is taken
once over all of them, so the negatives are the whole accumulated batch, exactly as one k×
larger batch would see; then each micro-batch is forwarded again, with its RNG state replayed (so
dropout and patch dropout draw the same masks), and backpropagated with the cached feature
gradients. Peak activation memory is one micro-batch's. The temperature and bias gradients come
from the one loss evaluation and are injected through the last re-forward, so DDP reduces every
gradient exactly once.

Precision: fp32; bf16 autocast; fp16 autocast with a dynamic gradient scaler (an overflowing
step is skipped by the scaler and the scale lowered, as usual). The loss is always fp32.

Numerics guard: a non-finite loss (or, without a scaler, a non-finite gradient norm) skips the
optimizer update — weights and optimizer state stay as they were — and the step reports ``nonfinite``
(a bool tensor on the device); the loop counts these at logging steps and aborts after N in a row. The skip
stays on the device with fused AdamW (the default), as GradScaler skips an overflowing step: the optimizer is
handed the flag as ``found_inf`` and its kernel leaves weights, moments and step count untouched, so a plain
step makes no host sync and the CPU runs ahead (tests/test_cuda.py checks it under
``set_sync_debug_mode("error")``). The foreach AdamW (``optim.fused: false``), fp16 with its gradient scaler, an
FSDP-sharded model and the negative queue (whose enqueue depends on the skip) read the flag on the host: one sync
per step there.
Everything returned is a detached tensor.

Profiling: each strategy marks its parts (forward, loss, backward, optimizer) on the recorder it is called with
(``clipforge.train.profile``); the default recorder, ``OFF``, does nothing.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from clipforge.losses import clamp_logit_scale, queue_contrastive_loss
from clipforge.train.config import PRECISIONS
from clipforge.train.parallel import no_gradient_sync, unwrap
from clipforge.train.profile import OFF, OffRecorder, StepRecorder

AUTOCAST_DTYPES = {name: getattr(torch, dtype) if dtype else None for name, dtype in PRECISIONS.items()}


class PlainStep:
    def __init__(
        self,
        model: torch.nn.Module,
        loss_fn: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler,
        device: str,
        precision: str,
        grad_clip_norm: float | None,
        max_logit_scale: float,
        teacher=None,
    ) -> None:
        self.model, self.loss_fn, self.optimizer, self.scheduler = model, loss_fn, optimizer, scheduler
        self.teacher = teacher  # loss.distill_model: (images, tokens) → teacher embeddings, no gradient
        self.device = torch.device(device)
        self.autocast_dtype = AUTOCAST_DTYPES[precision]
        self.grad_clip_norm, self.max_logit_scale = grad_clip_norm, max_logit_scale
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" else None
        # fused AdamW takes the skip as a device flag; its kernel on DTensor shards is left to the host check
        self.skips_on_device = optimizer.defaults.get("fused") is True and not any(
            type(p).__name__ == "DTensor" for p in unwrap(model).parameters()
        )

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _loss(self, image_features, text_features, logit_scale, logit_bias, extras=None) -> dict[str, torch.Tensor]:
        if logit_bias is None:
            return self.loss_fn(image_features, text_features, logit_scale, **(extras or {}))
        return self.loss_fn(image_features, text_features, logit_scale, logit_bias)

    def _extras(self, batch: dict, images: torch.Tensor, texts: torch.Tensor) -> dict[str, torch.Tensor]:
        """What the loss takes besides features, for the whole batch (also under GradCache): per-sample caption /
        image ids for loss.positives, the teacher's embeddings for loss.distill_weight (stored or online)."""
        keys = ("caption_ids", "image_ids", "teacher_image", "teacher_text")
        extras = {key: batch[key].to(self.device, non_blocking=True) for key in keys if key in batch}
        if self.teacher is not None:
            extras["teacher_image"], extras["teacher_text"] = self.teacher(images, texts)
        return extras

    def backward(self, batch: dict, recorder: OffRecorder | StepRecorder = OFF) -> dict[str, torch.Tensor]:
        """Gradients of the batch's loss in ``.grad``; returns the loss terms and the scale used."""
        with recorder.part("copy"):
            images = batch["images"].to(self.device, non_blocking=True)
            texts = batch["texts"].to(self.device, non_blocking=True)
        with recorder.forward(self.model), self._autocast():
            out = self.model(images, texts)
        with recorder.part("loss"):
            losses = self._loss(
                out["image_features"].float(),
                out["text_features"].float(),
                out["logit_scale"].float(),
                None if out.get("logit_bias") is None else out["logit_bias"].float(),
                self._extras(batch, images, texts),
            )
            loss = sum(losses.values())
        with recorder.part("backward"):
            self._backward(loss)
        return {
            "loss": loss.detach(),
            "logit_scale": out["logit_scale"].detach().float(),
            **{k: v.detach() for k, v in losses.items()},
        }

    def _backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def __call__(self, batch: dict, recorder: OffRecorder | StepRecorder = OFF) -> dict[str, torch.Tensor]:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        metrics = self.backward(batch, recorder)
        with recorder.part("optimizer"):
            return self._update(metrics)

    def _update(self, metrics: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Unscale, clip, the optimizer step (skipped for a non-finite loss or gradient), schedule, clamp."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.grad_clip_norm:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip_norm)
        else:  # the norm is still logged; clipping to inf would multiply every gradient by 1, a pass for nothing
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None])
        if hasattr(grad_norm, "full_tensor"):  # FSDP: the whole gradient's norm, replicated; the plain tensor of it
            grad_norm = grad_norm.full_tensor()
        loss_finite = torch.isfinite(metrics["loss"])
        finite = loss_finite if self.scaler is not None else loss_finite & torch.isfinite(grad_norm)
        if self.scaler is not None:
            if not bool(finite):  # an infinite loss can have finite gradients the scaler would apply (a host sync)
                self.optimizer.zero_grad(set_to_none=True)
            self.scaler.step(self.optimizer)  # skips the update itself when a gradient overflowed
            self.scaler.update()
        elif self.skips_on_device:
            self.optimizer.found_inf = (~finite).to(torch.float32)  # fused AdamW's skip flag (GradScaler's protocol)
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
        elif bool(finite):  # the host sync of the foreach optimizer
            self.optimizer.step()
        self.scheduler.step()
        clamp_logit_scale(unwrap(self.model).logit_scale, self.max_logit_scale)
        return {**metrics, "grad_norm": grad_norm.detach(), "nonfinite": ~finite}


class QueueStep(PlainStep):
    """The plain step with a negative queue (``loss.queue_size``; ``clipforge.train.momentum``): the loss takes
    the momentum keys of the batch and the queue; after an applied update the momentum encoder follows the model
    and the batch's keys are enqueued."""

    def __init__(self, *args, queue, rank: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.queue, self.rank = queue, rank
        self._keys = None

    def backward(self, batch: dict, recorder: OffRecorder | StepRecorder = OFF) -> dict[str, torch.Tensor]:
        with recorder.part("copy"):
            images = batch["images"].to(self.device, non_blocking=True)
            texts = batch["texts"].to(self.device, non_blocking=True)
        with recorder.part("loss"):  # the momentum encoder's keys: part of this objective, not of the model
            self._keys = self.queue.keys(images, texts, self._autocast)
        with recorder.forward(self.model), self._autocast():
            out = self.model(images, texts)
        scale = out["logit_scale"].float()
        with recorder.part("loss"):
            loss = queue_contrastive_loss(
                out["image_features"].float(),
                out["text_features"].float(),
                *self._keys,
                *self.queue.queued(),
                scale,
                self.rank,
            )
        with recorder.part("backward"):
            self._backward(loss)
        return {"loss": loss.detach(), "logit_scale": scale.detach(), "contrastive": loss.detach()}

    def __call__(self, batch: dict, recorder: OffRecorder | StepRecorder = OFF) -> dict[str, torch.Tensor]:
        result = super().__call__(batch, recorder)
        with recorder.part("optimizer"):
            if not bool(result["nonfinite"]):  # the queue's one host sync: only an applied update is enqueued
                self.queue.update_encoder(self.model)
                self.queue.enqueue(*self._keys)
        return result


class CachedAccumulationStep(PlainStep):
    def __init__(self, *args, accum_steps: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.accum_steps = accum_steps

    def _rng_state(self):
        if self.device.type == "cuda":
            return torch.get_rng_state(), torch.cuda.get_rng_state(self.device)
        return torch.get_rng_state(), None

    def _set_rng_state(self, state) -> None:
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], self.device)

    @torch.no_grad()
    def cache_features(self, chunks):
        """Features of every micro-batch without graphs, and the RNG state each one started from."""
        states, image_features, text_features = [], [], []
        for images, texts in chunks:
            states.append(self._rng_state())
            with self._autocast():
                out = self.model(images, texts)
            image_features.append(out["image_features"].float())
            text_features.append(out["text_features"].float())
        return states, torch.cat(image_features), torch.cat(text_features)

    def backward(self, batch: dict, recorder: OffRecorder | StepRecorder = OFF) -> dict[str, torch.Tensor]:
        with recorder.part("copy"):
            images = batch["images"].to(self.device, non_blocking=True)
            texts = batch["texts"].to(self.device, non_blocking=True)
        chunks = list(zip(images.chunk(self.accum_steps), texts.chunk(self.accum_steps)))
        with recorder.forward(self.model):
            states, image_features, text_features = self.cache_features(chunks)
        core = unwrap(self.model)
        with recorder.part("loss"):
            image_features.requires_grad_()
            text_features.requires_grad_()
            scale = core.logit_scale.detach().exp().requires_grad_()
            bias = (
                core.logit_bias.detach().clone().requires_grad_()
                if getattr(core, "logit_bias", None) is not None
                else None
            )
            losses = self._loss(image_features, text_features, scale, bias, self._extras(batch, images, texts))
            loss = sum(losses.values())
        with recorder.part("backward"):
            self._backward(loss)
            self._accumulate(chunks, states, image_features.grad, text_features.grad, scale.grad, bias)
        return {"loss": loss.detach(), "logit_scale": scale.detach(), **{k: v.detach() for k, v in losses.items()}}

    def _accumulate(self, chunks, states, image_grad, text_grad, scale_grad, bias) -> None:
        """Each micro-batch forwarded again from its RNG state and backpropagated with its cached feature gradients;
        the temperature's and bias's gradients go in with the last one."""
        sizes = [len(chunk_images) for chunk_images, _ in chunks]
        image_grads, text_grads = image_grad.split(sizes), text_grad.split(sizes)
        end_state = self._rng_state()
        for index, ((chunk_images, chunk_texts), state) in enumerate(zip(chunks, states)):
            last = index == len(chunks) - 1
            self._set_rng_state(state)
            sync = nullcontext() if last else no_gradient_sync(self.model)
            with sync:
                with self._autocast():
                    out = self.model(chunk_images, chunk_texts)
                surrogate = (out["image_features"].float() * image_grads[index]).sum() + (
                    out["text_features"].float() * text_grads[index]
                ).sum()
                if last:  # temperature and bias: their gradient from the one loss evaluation
                    surrogate = surrogate + (out["logit_scale"].float() * scale_grad).sum()
                    if bias is not None:
                        surrogate = surrogate + (out["logit_bias"].float() * bias.grad).sum()
                surrogate.backward()  # the cached feature gradients already carry the fp16 loss scale
        self._set_rng_state(end_state)


def build_step(
    model,
    loss_fn,
    optimizer,
    scheduler,
    device: str,
    precision: str,
    grad_clip_norm,
    max_logit_scale,
    accum_steps: int = 1,
    queue=None,
    rank: int = 0,
    teacher=None,
) -> PlainStep:
    args = (model, loss_fn, optimizer, scheduler, device, precision, grad_clip_norm, max_logit_scale, teacher)
    if queue is not None:
        if accum_steps > 1:
            raise ValueError("loss.queue_size cannot be combined with train.accum_steps > 1")
        return QueueStep(*args, queue=queue, rank=rank)
    if accum_steps > 1:
        return CachedAccumulationStep(*args, accum_steps=accum_steps)
    return PlainStep(*args)
