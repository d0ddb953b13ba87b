"""Step strategies: how one batch becomes one optimizer update. Chosen once, at build time.

``PlainStep``: the objectives' ``before_forward`` hooks, forward both towers under autocast (with the extra outputs
the objectives ask for), the objectives' terms in fp32 and their sum, backward, clip the gradient norm, AdamW step,
schedule step, clamp the temperature, the objectives' ``after_update`` hooks. Every strategy calls the objectives the
same way (``clipforge.losses.objective``): the step knows no loss by name and no batch field but the images and texts.

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
FSDP-sharded model and an objective whose ``after_update`` depends on the skip (the negative queue's enqueue) read
the flag on the host: one sync per step there.
Everything returned is a detached tensor.

Profiling: each strategy marks its parts (forward, loss, backward, optimizer) on the recorder it is called with
(``clipforge.train.profile``), and within the loss each objective's forward as ``loss/NAME`` (``Objectives.forward``),
so the breakdown shows what each one costs; the default recorder, ``OFF``, does nothing.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from clipforge.losses import Objectives, clamp_logit_scale, objective_for
from clipforge.models.outputs import OutputCapture
from clipforge.train.config import PRECISIONS
from clipforge.train.parallel import is_sharded, no_gradient_sync, unwrap
from clipforge.train.profile import OFF, OffRecorder, StepRecorder

AUTOCAST_DTYPES = {name: getattr(torch, dtype) if dtype else None for name, dtype in PRECISIONS.items()}


def autocast_for(device: str, precision: str):
    """A function returning the autocast context of ``train.precision`` on ``device`` (a null one for fp32)."""
    dtype, device_type = AUTOCAST_DTYPES[precision], torch.device(device).type
    if dtype is None:
        return nullcontext
    return lambda: torch.autocast(device_type, dtype=dtype)


class PlainStep:
    def __init__(
        self,
        model: torch.nn.Module,
        objectives: Objectives,
        optimizer: torch.optim.Optimizer,
        scheduler,
        device: str,
        precision: str,
        grad_clip_norm: float | None,
        max_logit_scale: float,
    ) -> None:
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.objectives = objectives if isinstance(objectives, Objectives) else Objectives([objective_for(objectives)])
        self.capture = OutputCapture(unwrap(model), self.objectives.model_outputs)
        self.device = torch.device(device)
        self._autocast = autocast_for(device, precision)
        self.grad_clip_norm, self.max_logit_scale = grad_clip_norm, max_logit_scale
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" else None
        # fused AdamW takes the skip as a device flag; its kernel on DTensor shards is left to the host check, and an
        # objective that reads the flag after the update needs it on the host anyway
        self.skips_on_device = (
            optimizer.defaults.get("fused") is True and not is_sharded(model) and not self.objectives.needs_host_sync
        )

    def _inputs(self, batch: dict) -> dict[str, torch.Tensor]:
        """The batch on the device: images, texts and every field the objectives declared (the loader made them)."""
        return {key: value.to(self.device, non_blocking=True) for key, value in batch.items() if key != "keys"}

    def _forward(self, model, images: torch.Tensor, texts: torch.Tensor) -> dict[str, torch.Tensor]:
        """The model's outputs in fp32: pooled features, scale, bias, and what the objectives asked for."""
        with self._autocast():
            out = model(images, texts)
        outputs = {key: value.float() for key, value in out.items() if value is not None}
        outputs.update({key: value.float() for key, value in self.capture.take().items()})
        return outputs

    def backward(self, batch: dict, recorder: OffRecorder | StepRecorder = OFF) -> dict[str, torch.Tensor]:
        """Gradients of the batch's loss in ``.grad``; returns the loss, the scale used and each term (``terms``)."""
        with recorder.part("copy"):
            inputs = self._inputs(batch)
        with recorder.part("loss"):  # e.g. a momentum encoder's keys: part of an objective, not of the model
            self.objectives.before_forward(inputs)
        with recorder.forward(self.model):
            outputs = self._forward(self.model, inputs["images"], inputs["texts"])
        with recorder.part("loss"):
            terms = self.objectives(outputs, inputs, part=recorder.part)
            loss = sum(terms.values())
        with recorder.part("backward"):
            self._backward(loss)
        return {
            "loss": loss.detach(),
            "logit_scale": outputs["logit_scale"].detach(),
            "terms": {name: value.detach() for name, value in terms.items()},
        }

    def _backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def __call__(self, batch: dict, recorder: OffRecorder | StepRecorder = OFF) -> dict[str, torch.Tensor]:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        metrics = self.backward(batch, recorder)
        with recorder.part("optimizer"):
            result = self._update(metrics)
            self.objectives.after_update(~result["nonfinite"])
            return result

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


class CachedAccumulationStep(PlainStep):
    def __init__(self, *args, accum_steps: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.objectives.model_outputs:
            raise ValueError(
                f"train.accum_steps > 1 (GradCache) caches the pooled features only; the loss terms need "
                f"{', '.join(self.objectives.model_outputs)} as well: use train.accum_steps=1"
            )
        if self.objectives.runs_towers:
            raise ValueError(
                "train.accum_steps > 1 (GradCache) caches the towers' outputs; a loss term that runs the towers "
                "itself (loss.terms self_distillation) cannot be cached: use train.accum_steps=1"
            )
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
    def cache_features(self, chunks) -> tuple[list, dict[str, torch.Tensor]]:
        """Outputs of every micro-batch without graphs (features concatenated; the scale and bias, the same in every
        micro-batch, from the first), and the RNG state each micro-batch started from."""
        states, parts = [], []
        for images, texts in chunks:
            states.append(self._rng_state())
            parts.append(self._forward(self.model, images, texts))
        cached = {key: torch.cat([part[key] for part in parts]) for key in ("image_features", "text_features")}
        cached.update({key: value for key, value in parts[0].items() if key not in cached})
        return states, cached

    def backward(self, batch: dict, recorder: OffRecorder | StepRecorder = OFF) -> dict[str, torch.Tensor]:
        with recorder.part("copy"):
            inputs = self._inputs(batch)
        self.objectives.before_forward(inputs)
        chunks = list(zip(inputs["images"].chunk(self.accum_steps), inputs["texts"].chunk(self.accum_steps)))
        with recorder.forward(self.model):
            states, cached = self.cache_features(chunks)
        with recorder.part("loss"):
            leaves = {key: value.detach().requires_grad_() for key, value in cached.items()}  # the loss's own leaves
            terms = self.objectives(leaves, inputs, part=recorder.part)
            loss = sum(terms.values())
        with recorder.part("backward"):
            self._backward(loss)
            self._accumulate(chunks, states, leaves)
        return {
            "loss": loss.detach(),
            "logit_scale": leaves["logit_scale"].detach(),
            "terms": {name: value.detach() for name, value in terms.items()},
        }

    def _accumulate(self, chunks, states, leaves: dict[str, torch.Tensor]) -> None:
        """Each micro-batch forwarded again from its RNG state and backpropagated with its cached feature gradients;
        the temperature's and bias's gradients go in with the last one."""
        sizes = [len(chunk_images) for chunk_images, _ in chunks]
        image_grads = leaves["image_features"].grad.split(sizes)
        text_grads = leaves["text_features"].grad.split(sizes)
        end_state = self._rng_state()
        for index, ((chunk_images, chunk_texts), state) in enumerate(zip(chunks, states)):
            last = index == len(chunks) - 1
            self._set_rng_state(state)
            sync = nullcontext() if last else no_gradient_sync(self.model)
            with sync:
                out = self._forward(self.model, chunk_images, chunk_texts)
                surrogate = (out["image_features"] * image_grads[index]).sum() + (
                    out["text_features"] * text_grads[index]
                ).sum()
                if last:  # temperature and bias: their gradient from the one loss evaluation
                    for key in ("logit_scale", "logit_bias"):
                        if key in leaves and leaves[key].grad is not None:
                            surrogate = surrogate + (out[key] * leaves[key].grad).sum()
                surrogate.backward()  # the cached feature gradients already carry the fp16 loss scale
        self._set_rng_state(end_state)


def build_step(
    model,
    objectives,
    optimizer,
    scheduler,
    *,
    device: str,
    precision: str,
    grad_clip_norm,
    max_logit_scale,
    accum_steps: int = 1,
) -> PlainStep:
    """The step strategy: GradCache for ``accum_steps > 1``, else the plain step. ``objectives``: the run's
    ``Objectives``, or one loss module (``build_loss``'s), which is put under the objective contract."""
    args = (model, objectives, optimizer, scheduler, device, precision, grad_clip_norm, max_logit_scale)
    if accum_steps > 1:
        return CachedAccumulationStep(*args, accum_steps=accum_steps)
    return PlainStep(*args)
