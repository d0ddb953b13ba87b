"""The one count of a training step's model FLOPs: ``clipforge train --dry-run`` reports it, MFU in the logs uses it.

``count_train_flops(model_cfg, learn_temperature, pooled_last_block)`` builds the model on the meta device (no
memory, no arithmetic: ``torch.utils.flop_counter`` only reads shapes), applies the training options that change
the work (tower locks, patch dropout: ``clipforge.train.parallel.apply_training_options``; text trimming and the
pooled last block: ``clipforge.models.shortcuts``) and counts, for one sample, each tower's forward pass in train
mode and the backward pass autograd really runs:

* a fully trainable tower: backward = 2 × forward (a gradient for each matmul's input and one for its weight), so
  the tower costs 3 × its forward, the usual convention (Kaplan et al. 2020; PaLM's MFU, Chowdhery et al. 2022);
  the first layer's input gradient (pixels, token ids) is not computed and not counted;
* a locked tower (LiT): no parameter needs a gradient and nothing upstream does, so autograd skips its backward:
  1 × forward; a partly locked tower pays weight gradients only for its unlocked layers and input gradients only
  down to the first unlocked one;
* patch dropout: the train-mode forward drops the patches, so the image tower is counted on the tokens it keeps;
* text trimming: the text tower's cost is a quadratic in the caption length L (projections ∝ L, attention ∝ L²,
  the pooled projection constant); it is counted at three lengths and the quadratic is exact at every L, so the
  loop charges each batch for its own trimmed length.
* the pooled last block (``speed.pooled_last_block``): the last block's work on the tokens pooling discards is not
  done, and not counted (open_clip, which does it, is counted in full: ``pooled_last_block=False``), unless an
  objective reads every image token (the run then keeps the block whole);
* the objectives' own work (``loss``: a LocCa decoder; the self-distillation's teacher and student views): each
  objective's ``train_flops`` for the image tokens the train-mode tower gives it, added per sample
  (``TrainFlops.objectives``); a term switched on later in training (``start``) is charged from its start step on
  (``TrainFlops.staged``, ``train(step=...)``), so MFU before the switch is not inflated; ``--dry-run``'s per-sample
  figure is the full recipe's step, its run total the mean over the run (``run_mean``).

Attention is counted as its matmuls (forward 2, backward 4 per head: scores and weighted sum; the backward kernels'
recomputation of the scores is hardware work, not model work, and so is gradient checkpointing's re-forward:
neither is counted). Model FLOPs per second over the peak is MFU.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from clipforge.losses import ObjectiveContext, build_objectives
from clipforge.losses.config import LossConfig
from clipforge.models import ModelConfig, build_model, enable_pooled_last_block, enable_text_trimming
from clipforge.models.flop_rules import ATTENTION_FLOPS
from clipforge.models.outputs import OutputCapture, needs_every_token
from clipforge.train.parallel import apply_training_options


@dataclass(frozen=True)
class TrainFlops:
    """Model FLOPs of one sample, by tower; the text tower's as ``a·L² + b·L + c`` in the caption length L."""

    image_forward: float
    image_train: float  # forward + the backward autograd runs (0 backward for a locked tower)
    text_forward: float  # at the full context length
    text_train_quadratic: tuple[float, float, float]
    context_length: int
    objectives: float = 0.0  # forward + backward of the objectives' own work (a decoder), independent of L
    staged: tuple[tuple[int, float], ...] = ()  # (start step, FLOPs) of the terms switched on later in training

    def text_train(self, length: int | None = None) -> float:
        a, b, c = self.text_train_quadratic
        length = self.context_length if length is None else length
        return a * length**2 + b * length + c

    def train(self, text_length: int | None = None, step: int | None = None) -> float:
        """One sample's forward + backward FLOPs, with its captions cut to ``text_length`` tokens (None: full), at
        the step after ``step`` optimizer steps (None: with every term on, the recipe's full step)."""
        later = sum(flops for start, flops in self.staged if step is None or step >= start)
        return self.image_train + self.text_train(text_length) + self.objectives + later

    def run_mean(self, total_steps: int) -> float:
        """One sample's FLOPs averaged over a run of ``total_steps`` (terms switched on later count from their
        start), at the full caption length."""
        later = sum(flops * max(total_steps - start, 0) for start, flops in self.staged) / max(total_steps, 1)
        return self.train(step=-1) + later


def count_train_flops(
    model_cfg: ModelConfig,
    learn_temperature: bool = True,
    pooled_last_block: bool = True,
    loss: LossConfig | None = None,
    total_steps: int = 0,
) -> TrainFlops:
    """Count one sample's model FLOPs in training (see the module docstring), on a meta-device copy of the model;
    with ``loss``, its objectives' own work too, a term with a ``start`` as of its start step in a run of
    ``total_steps``."""
    model_cfg = dataclasses.replace(model_cfg, init_from=None, grad_checkpointing=False)  # no weights, no recompute
    try:
        return _count(model_cfg, learn_temperature, pooled_last_block, loss, "meta", total_steps)
    except (NotImplementedError, RuntimeError):  # a tower that cannot be built or run without data: count on the CPU
        return _count(model_cfg, learn_temperature, pooled_last_block, loss, "cpu", total_steps)


def _count(
    model_cfg: ModelConfig,
    learn_temperature: bool,
    pooled_last_block: bool,
    loss: LossConfig | None,
    device: str,
    total_steps: int = 0,
) -> TrainFlops:
    with torch.device(device):
        built = build_model(model_cfg, device=device)
        model = built.model
        apply_training_options(model, model_cfg, learn_temperature)
        objectives = None
        if loss is not None and loss.terms:  # only the extra terms hold modules worth counting
            # the contrastive member (a queue, a distillation teacher) needs runtime objects and adds no FLOPs here
            terms_only = dataclasses.replace(loss, queue_size=0, distill_weight=0.0, distill_model=None)
            context = ObjectiveContext(model=model, autocast=contextlib.nullcontext, total_steps=total_steps)
            objectives = build_objectives(terms_only, context, total_steps)
        every_token = objectives is not None and needs_every_token(objectives.model_outputs)
        trims = enable_text_trimming(model)  # the caption lengths training may give it
        if pooled_last_block and not every_token:
            enable_pooled_last_block(model)
        model.train()
        size = built.preprocess_cfg["size"]
        height, width = (size, size) if isinstance(size, int) else size
        context = built.model_cfg["text_cfg"].get("context_length", 77)
        # two samples (a train-mode BatchNorm needs more than one value per channel), halved: the count is linear
        image = _forward_and_train(lambda: model.encode_image(torch.zeros(2, 3, height, width)), per=2)
        text = {}
        lengths = sorted({context, max(1, context // 2), max(1, context // 4)}) if trims else [context]
        for length in lengths:
            tokens = torch.zeros(2, length, dtype=torch.long)
            text[length] = _forward_and_train(lambda tokens=tokens: model.encode_text(tokens), per=2)
        extra, staged = _objective_flops(model, objectives, (2, 3, height, width)) if objectives else (0.0, ())
    return TrainFlops(*image, text[context][0], _quadratic(text, lengths), context, extra, staged)


def _objective_flops(
    model: torch.nn.Module, objectives, image_shape: tuple[int, ...]
) -> tuple[float, tuple[tuple[int, float], ...]]:
    """The objectives' ``train_flops`` for the number of image tokens the train-mode tower gives (patch dropout
    applied) and whether they need a gradient (not from a locked tower): those on from the first step summed, and
    (start step, FLOPs) of each switched on later."""
    tokens = 0  # an objective that reads no image tokens is charged for none
    if "image_tokens" in objectives.model_outputs:
        capture = OutputCapture(model, ("image_tokens",))
        with torch.no_grad():
            model.encode_image(torch.zeros(image_shape))
        tokens = capture.take()["image_tokens"].shape[1]
        capture.remove()
    trainable = any(parameter.requires_grad for parameter in model.visual.parameters())
    always, staged = 0.0, []
    for member in objectives.members:
        flops = float(member.train_flops(tokens, trainable))
        start = getattr(member, "start_step", 0)
        if start > 0:
            staged.append((start, flops))
        else:
            always += flops
    return always, tuple(staged)


def _forward_and_train(run, per: int = 1) -> tuple[float, float]:
    """FLOPs of ``run()``'s forward, and of forward + backward of its output's sum (when anything needs a gradient),
    divided by ``per`` (the samples in the batch ``run`` makes)."""
    with FlopCounterMode(display=False, custom_mapping=ATTENTION_FLOPS) as counter:
        run()
    forward = counter.get_total_flops()
    with FlopCounterMode(display=False, custom_mapping=ATTENTION_FLOPS) as counter:
        out = run()
        if out.requires_grad:
            out.sum().backward()
    return forward / per, counter.get_total_flops() / per


def _quadratic(counts: dict[int, tuple[float, float]], lengths: list[int]) -> tuple[float, float, float]:
    """The quadratic through the train counts at the given lengths (a line, or a constant, with fewer of them)."""
    points = [(float(length), counts[length][1]) for length in lengths]
    if len(points) == 1:
        return 0.0, 0.0, points[0][1]
    if len(points) == 2:
        (x0, y0), (x1, y1) = points
        slope = (y1 - y0) / (x1 - x0)
        return 0.0, slope, y0 - slope * x0
    matrix = torch.tensor([[x * x, x, 1.0] for x, _ in points], dtype=torch.float64)
    values = torch.tensor([y for _, y in points], dtype=torch.float64)
    a, b, c = torch.linalg.solve(matrix, values).tolist()
    return a, b, c
