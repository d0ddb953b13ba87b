"""The ``loss`` section of the run config, the rules its options obey, and the registry of extra loss terms.

It imports no torch (the package's other modules are imported on first use), so that reading and validating a
config (``clipforge train --help``, ``clipforge submit``) stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

LOSS_KINDS = ("clip", "siglip")
SIGLIP_EXCHANGES = ("all_gather", "ring")
POSITIVES = ("pairs", "caption", "image", "caption_or_image")

TERMS: dict[str, str] = {
    "locca": "clipforge.losses.locca:build",
    "self_distillation": "clipforge.losses.self_distillation:build",
}
"""Extra loss terms by name (``loss.terms``): the ``module:function`` that builds each, called as
``function(options: dict, context: ObjectiveContext) -> Objective``. Adding an objective is its module plus one line
here."""


@dataclass
class TermConfig:
    """One extra loss term: a registered objective, its weight, when it starts, and its own options."""

    name: str = "???"
    """The objective's name in ``clipforge.losses.config.TERMS``."""
    weight: float = 1.0
    """Multiplies every term the objective returns."""
    start: float = 0.0
    """Fraction of train.steps after which the term is switched on (0: from the first step)."""
    options: dict[str, Any] = field(default_factory=dict)
    """The objective's own options; it refuses unknown ones by name."""

    def __post_init__(self) -> None:
        if self.name not in TERMS:
            known = ", ".join(sorted(TERMS)) or "none registered"
            raise ValueError(f"loss.terms: unknown objective {self.name!r} (known: {known})")
        if not 0 <= self.start < 1:
            raise ValueError(
                f"loss.terms {self.name}: start must be a fraction of training in [0, 1), got {self.start}"
            )
        if not self.weight >= 0:
            raise ValueError(f"loss.terms {self.name}: weight must be >= 0, got {self.weight}")


def check_clip_options(
    kind: str, tile_size: int, positives: str, hard_negative_beta: float, debias_tau_plus: float
) -> None:
    """Refuse invalid values and combinations of the CLIP-only options (messages name the loss.* keys)."""
    if positives not in POSITIVES:
        raise ValueError(f"loss.positives: {positives!r} is not one of {POSITIVES}")
    if not hard_negative_beta >= 0:
        raise ValueError(f"loss.hard_negative_beta: must be >= 0 (0 = off), got {hard_negative_beta}")
    if not 0 <= debias_tau_plus < 1:
        raise ValueError(f"loss.debias_tau_plus: must be in [0, 1) (0 = off), got {debias_tau_plus}")
    options = [
        name
        for name, on in (
            ("loss.positives", positives != "pairs"),
            ("loss.hard_negative_beta", hard_negative_beta > 0),
            ("loss.debias_tau_plus", debias_tau_plus > 0),
        )
        if on
    ]
    if not options:
        return
    if kind != "clip":
        raise ValueError(f"{' and '.join(options)} apply to loss.kind=clip only, not loss.kind={kind}")
    if tile_size:
        raise ValueError(
            f"{' and '.join(options)} need the materialised logits: set loss.tile_size=0 (got {tile_size})"
        )
    if positives != "pairs" and len(options) > 1:
        raise ValueError(
            f"loss.positives={positives} cannot be combined with {' and '.join(options[1:])}: "
            "use multi-positive or hard negatives, not both"
        )


@dataclass
class LossConfig:
    """The contrastive objective."""

    kind: str = "clip"
    """clip (symmetric InfoNCE, softmax) or siglip (pairwise sigmoid; the model needs model.init_logit_bias)."""
    max_logit_scale: float = 100.0
    """Upper clamp on exp(logit_scale), applied after every optimizer step (CLIP uses 100)."""
    learn_temperature: bool = True
    """Learn logit_scale (and logit_bias); false keeps them at their initial values."""
    tile_size: int = 0
    """0 = materialise the (B_local, B_global) logits; N > 0 = compute them in N × N tiles (memory-flat)."""
    siglip_exchange: str = "all_gather"
    """How SigLIP sees other ranks' texts: all_gather, or ring (neighbour exchange, no all-gather)."""
    positives: str = "pairs"
    """pairs = each image's positive is its own caption (CLIP). caption / image / caption_or_image = samples
    of the global batch with an identical caption (image, either) are positives of each other, not negatives
    (supervised-contrastive L_out; the data must give per-sample caption_ids / image_ids). Switch on for web
    data with many duplicate captions ("image", product titles, boilerplate alt-text) or several captions per
    image, which plain CLIP pushes apart as negatives. Cost: an all-gather of int64 ids and a
    (B_local, B_global) mask per step. clip only, tile_size=0."""
    hard_negative_beta: float = 0.0
    """Hard-negative concentration β (Robinson et al. 2021): negatives are weighted by exp(β · logit), so the
    ones most similar to the anchor dominate. 0 = off (plain CLIP). The paper's code defaults to β=1, τ⁺=0.1 at
    temperature 0.5 (logit_scale 2); the concentration on the cosine is β × logit_scale, so with CLIP's learned
    scale (up to 100) use much smaller β. For small batches or fine-grained data where most in-batch negatives
    are easy. Cost: one more log-sum-exp over the logits. clip only, tile_size=0."""
    debias_tau_plus: float = 0.0
    """Debiasing class prior τ⁺ in [0, 1) (Chuang et al. 2020, as in Robinson et al. 2021): the expected share
    of in-batch "negatives" that are really positives, subtracted from the negative term. 0 = off. For data
    with many near-duplicates when ids for loss.positives are not available. clip only, tile_size=0."""

    queue_size: int = 0
    """Negative queue (MoCo / ALBEF; clipforge.train.momentum): also contrast against the momentum-encoder
    embeddings of the last K samples of earlier steps. 0 = off. For small batches, where in-batch negatives are
    few; costs one more forward of both towers per step. clip only, tile_size=0, train.accum_steps=1."""
    queue_momentum: float = 0.995
    """EMA factor of the momentum encoder that makes the queue's keys (with loss.queue_size)."""

    distill_weight: float = 0.0
    """λ of MobileCLIP's distillation: loss = (1 - λ) CLIP + λ KL(teacher ‖ student similarity distributions over
    the global batch, both directions). 0 = off; 1 = distillation alone. The teacher's embeddings come from
    data.teacher (a `clipforge prep score` output beside the shards) or loss.distill_model. clip only."""
    distill_teacher_temperature: float | None = None
    """The teacher's softmax temperature τ_T (its logits are cos / τ_T); None = the teacher's own, from the
    teacher.json of data.teacher or the logit_scale of loss.distill_model."""
    terms: list[TermConfig] = field(default_factory=list)
    """Extra loss terms added to the contrastive loss above, each a registered objective (clipforge.losses.config
    TERMS) with a weight, a start fraction and its own options: [{name: NAME, weight: 1.0, start: 0.0, options:
    {...}}]. Each term is logged as train/TERM (docs/architecture.md, 'Add an objective')."""
    distill_model: str | None = None
    """An online teacher when no embeddings are stored: a checkpoint, open_clip folder or transformers folder (as
    `clipforge eval` loads it), run in eval mode without gradient on every batch. It must take the student's
    inputs (image size, normalisation, tokenizer); otherwise store its embeddings with `clipforge prep score`."""

    def __post_init__(self) -> None:
        if not 0 <= self.distill_weight <= 1:
            raise ValueError(f"loss.distill_weight: must be in [0, 1] (0 = off), got {self.distill_weight}")
        if self.distill_teacher_temperature is not None and not self.distill_teacher_temperature > 0:
            raise ValueError(
                f"loss.distill_teacher_temperature: must be positive, got {self.distill_teacher_temperature}"
            )
        if self.distill_weight and (self.kind != "clip" or self.queue_size):
            raise ValueError(
                "loss.distill_weight works with loss.kind=clip without loss.queue_size "
                f"(got kind={self.kind}, queue_size={self.queue_size})"
            )
        if self.distill_model is not None and not self.distill_weight:
            raise ValueError("loss.distill_model is set but loss.distill_weight=0 would not use it; set the weight")
        if self.queue_size < 0:
            raise ValueError(f"loss.queue_size: must be >= 0 (0 = off), got {self.queue_size}")
        if not 0 <= self.queue_momentum < 1:
            raise ValueError(f"loss.queue_momentum: must be in [0, 1), got {self.queue_momentum}")
        if self.queue_size and (
            self.kind != "clip"
            or self.tile_size
            or self.positives != "pairs"
            or self.hard_negative_beta
            or self.debias_tau_plus
        ):
            raise ValueError(
                "loss.queue_size works with the plain CLIP loss only: loss.kind=clip, loss.tile_size=0, "
                "loss.positives=pairs, no loss.hard_negative_beta / loss.debias_tau_plus"
            )
        if self.kind not in LOSS_KINDS:
            raise ValueError(f"loss.kind: {self.kind!r} is not one of {LOSS_KINDS}")
        if not self.max_logit_scale > 0:
            raise ValueError(f"loss.max_logit_scale: must be positive, got {self.max_logit_scale}")
        if self.tile_size < 0:
            raise ValueError(f"loss.tile_size: must be >= 0, got {self.tile_size}")
        if self.siglip_exchange not in SIGLIP_EXCHANGES:
            raise ValueError(f"loss.siglip_exchange: {self.siglip_exchange!r} is not one of {SIGLIP_EXCHANGES}")
        check_clip_options(self.kind, self.tile_size, self.positives, self.hard_negative_beta, self.debias_tau_plus)
