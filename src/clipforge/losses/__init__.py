"""Objectives: the image–text losses and every other loss term, under one contract (``objective.py``).

``clip.py`` (symmetric InfoNCE and its options), ``siglip.py`` (pairwise sigmoid), ``distill.py`` (MobileCLIP's
distillation), ``queue.py`` (a negative queue with a momentum encoder), ``tiled.py`` (the memory-flat kernels they
share), ``config.py`` (the ``loss`` config section and the registry of extra terms), ``build.py`` (the configured
set). The single-process references the tests compare against live in ``tests/references.py``.

The names below are imported on first use (PEP 562), not with the package, so that ``clipforge.losses.config``
(read by every command) imports no torch.
"""

import importlib

_EXPORTS = {
    "ClipLoss": "clipforge.losses.clip",
    "ClipObjective": "clipforge.losses.clip",
    "DistillationLoss": "clipforge.losses.distill",
    "DistillationObjective": "clipforge.losses.distill",
    "LossConfig": "clipforge.losses.config",
    "MomentumQueue": "clipforge.losses.queue",
    "Objective": "clipforge.losses.objective",
    "ObjectiveContext": "clipforge.losses.objective",
    "Objectives": "clipforge.losses.objective",
    "QueueObjective": "clipforge.losses.queue",
    "SampleField": "clipforge.losses.objective",
    "SigLipLoss": "clipforge.losses.siglip",
    "SigLipObjective": "clipforge.losses.siglip",
    "TermConfig": "clipforge.losses.config",
    "build_loss": "clipforge.losses.build",
    "build_objectives": "clipforge.losses.build",
    "clamp_logit_scale": "clipforge.losses.build",
    "distillation_loss": "clipforge.losses.distill",
    "objective_for": "clipforge.losses.build",
    "queue_contrastive_loss": "clipforge.losses.queue",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
