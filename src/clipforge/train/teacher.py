"""The teacher of ``loss.distill_weight``: stored embeddings (``data.teacher``) or a model run online.

``build_teacher`` returns the online teacher (None with stored embeddings) and the teacher's temperature: the
``temperature`` of ``data.teacher``'s ``teacher.json``, or 1 / exp(logit_scale) of ``loss.distill_model``
(``loss.distill_teacher_temperature`` overrides either in ``build_loss``).

An online teacher sees the student's batch as it is (images already resized and normalised for the student,
captions tokenized by the student's tokenizer), so it must take the same inputs; ``build_teacher`` compares image
size, normalisation and context length and refuses a teacher that differs (store its embeddings with
``clipforge prep score`` instead, which runs it on its own inputs).
"""

from __future__ import annotations

import math

import torch

from clipforge.data.teacher import read_teacher_info
from clipforge.losses import LossConfig
from clipforge.models import BuiltModel


class OnlineTeacher:
    """(images, tokens) of a batch → the teacher's (B, D_T) image and text embeddings, eval mode, no gradient."""

    def __init__(self, encoder, context_length: int) -> None:
        self.encoder, self.context_length = encoder, context_length

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, texts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Batches may be trimmed after their longest caption (models.enable_text_trimming): padded back with the pad
        # id 0 for the teacher's full-context text tower.
        texts = torch.nn.functional.pad(texts, (0, self.context_length - texts.shape[1]))
        return self.encoder.encode_image(images), self.encoder.encode_text(texts)


def _inputs(preprocess_cfg: dict, context_length: int | None) -> dict:
    size = preprocess_cfg.get("size")
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    mean, std = (tuple(round(float(v), 5) for v in preprocess_cfg.get(k, ())) for k in ("mean", "std"))
    return {"image size": size, "mean": mean, "std": std, "context length": context_length}


def build_teacher(
    cfg: LossConfig, stored: str | None, student: BuiltModel, device: str
) -> tuple[OnlineTeacher | None, float | None]:
    """The online teacher (or None) and the teacher's temperature (None if unknown)."""
    if not cfg.distill_weight:
        return None, None
    if stored is not None:
        return None, read_teacher_info(stored).get("temperature")
    from clipforge.evaluation.loading import load_eval_model

    loaded = load_eval_model(cfg.distill_model, device=device)
    model = getattr(loaded.encoder, "model", None)
    visual = getattr(model, "visual", None)
    if visual is None or not hasattr(visual, "preprocess_cfg"):
        raise ValueError(
            f"loss.distill_model {cfg.distill_model}: an online teacher must be an open_clip model or clipforge "
            "checkpoint taking the student's inputs; store a transformers teacher's embeddings with `clipforge prep "
            "score` and set data.teacher"
        )
    theirs = _inputs(visual.preprocess_cfg, getattr(model, "context_length", None))
    ours = _inputs(student.preprocess_cfg, getattr(student.model, "context_length", None))
    different = [name for name in ours if ours[name] != theirs[name]]
    if different:
        name = different[0]
        raise ValueError(
            f"loss.distill_model {cfg.distill_model}: {name} {theirs[name]} differs from the student's {ours[name]}; "
            "an online teacher sees the student's batches: store its embeddings with `clipforge prep score` instead"
        )
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return OnlineTeacher(loaded.encoder, model.context_length), 1.0 / math.exp(float(model.logit_scale.detach()))
