"""The configured objectives: the contrastive loss of ``loss.kind`` (or the queue, or with distillation) and the
extra ``loss.terms``, built once with the runtime objects they need."""

from __future__ import annotations

import importlib
import math
from dataclasses import replace

import torch

from clipforge.losses.clip import ClipLoss, ClipObjective
from clipforge.losses.config import LOSS_KINDS, TERMS, LossConfig
from clipforge.losses.distill import DistillationLoss, DistillationObjective
from clipforge.losses.objective import Objective, ObjectiveContext, Objectives, Weighted
from clipforge.losses.queue import QueueObjective
from clipforge.losses.siglip import SigLipLoss, SigLipObjective


def build_loss(
    cfg: LossConfig, rank: int = 0, world_size: int = 1, teacher_temperature: float | None = None, group=None
) -> torch.nn.Module:
    """The configured loss, gathering over ``group`` (the run's mesh's, ``ObjectiveContext.group``; None: the
    default group); with ``cfg.distill_weight``, wrapped in ``DistillationLoss`` at
    ``cfg.distill_teacher_temperature`` or else ``teacher_temperature`` (the teacher's own, found by the caller)."""
    if cfg.distill_weight:
        temperature = cfg.distill_teacher_temperature or teacher_temperature
        if temperature is None:
            raise ValueError(
                "loss.distill_weight: the teacher's temperature is unknown (its teacher.json has none): set "
                "loss.distill_teacher_temperature"
            )
        plain = build_loss(replace(cfg, distill_weight=0.0, distill_model=None), rank, world_size, group=group)
        return DistillationLoss(plain, cfg.distill_weight, temperature, rank, world_size, group)
    if cfg.kind == "clip":
        return ClipLoss(
            rank,
            world_size,
            cfg.tile_size,
            group,
            positives=cfg.positives,
            hard_negative_beta=cfg.hard_negative_beta,
            debias_tau_plus=cfg.debias_tau_plus,
        )
    if cfg.kind == "siglip":
        return SigLipLoss(rank, world_size, cfg.siglip_exchange, cfg.tile_size, group)
    raise ValueError(f"loss.kind: {cfg.kind!r} is not one of {LOSS_KINDS}")


@torch.no_grad()
def clamp_logit_scale(log_scale: torch.nn.Parameter, max_logit_scale: float) -> None:
    """Keep exp(log_scale) in [1, max_logit_scale] (in place, after the optimizer step)."""
    log_scale.clamp_(0, math.log(max_logit_scale))


def objective_for(loss: torch.nn.Module, teacher=None) -> Objective:
    """A contrastive loss module (``build_loss``'s) under the objective contract; an objective as it is."""
    if isinstance(loss, Objective | Objectives):
        return loss
    if isinstance(loss, DistillationLoss):
        return DistillationObjective(loss, teacher)
    if isinstance(loss, SigLipLoss):
        return SigLipObjective(loss)
    if isinstance(loss, ClipLoss):
        return ClipObjective(loss)
    raise TypeError(f"not a loss clipforge knows how to call: {type(loss).__name__}")


def build_objectives(cfg: LossConfig, context: ObjectiveContext, total_steps: int = 0) -> Objectives:
    """The run's objectives: the contrastive one, then each of ``cfg.terms`` with its weight, switched on after
    ``start × total_steps`` optimizer steps (``context.step`` tells the current one). Bind them to the model
    (``Objectives.bind``) once it is ready to train."""
    if cfg.queue_size:
        if context.autocast is None:
            raise ValueError("loss.queue_size: the queue needs the step's autocast to make its keys")
        members: list[Objective] = [
            QueueObjective(
                cfg.queue_size, cfg.queue_momentum, context.autocast, context.rank, context.world_size, context.group
            )
        ]
    else:
        loss = build_loss(cfg, context.rank, context.world_size, context.teacher_temperature, context.group)
        members = [objective_for(loss, context.teacher)]
    for index, term in enumerate(cfg.terms):
        module_name, _, function = TERMS[term.name].partition(":")
        build = getattr(importlib.import_module(module_name), function)
        try:
            member = build(dict(term.options), context)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"loss.terms[{index}] ({term.name}): {exc}") from exc
        members.append(Weighted(member, term.weight, math.ceil(term.start * total_steps), context.step))
    return Objectives(members)
