"""The ``health`` section of the run config: how often the trainer measures a held-out batch and when to alarm.

It lives apart from ``health.py``, whose diagnostics need torch, so that reading and validating a config
(``clipforge train --help``, ``clipforge submit``) imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class HealthConfig:
    """Representation-health diagnostics on a held-out batch, and collapse alarms."""

    every_n_steps: int = 0
    """Measure the embedding diagnostics (health/* metrics) of a held-out batch every N steps; 0 = off."""
    num_samples: int = 512
    """Size of the held-out batch the diagnostics are measured on (the same samples every time)."""
    min_effective_rank: float = 0.0
    """Alarm when health/effective_rank_image or _text falls below this (dimensional collapse); 0 = no alarm."""
    min_std: float = 0.0
    """Alarm when health/std_mean_image or _text (mean per-dimension std; healthy ≈ 1/sqrt(D)) falls below
    this (complete collapse); 0 = no alarm."""
    max_clamped_steps: int = 0
    """Alarm when the temperature sits at loss.max_logit_scale for this many consecutive steps (and every as many
    steps after, while it stays there); 0 = off. Counted every step on the device, without the held-out batch, and
    read at logging steps (logging.log_every), so the alarm comes at the first logging step that sees the count."""
    stop_on_collapse: bool = False
    """Stop the run with a CollapseError at the first alarm instead of only logging a warning."""
    dataset: str | None = None
    """The held-out image–caption pairs: a retrieval benchmark folder as `clipforge eval` reads it (CLIP_benchmark
    WebDataset, or a saved HF dataset with image and caption columns); each image with its first caption.
    Default: the first zeroshot_retrieval dataset of eval.suite."""

    def __post_init__(self) -> None:
        if self.every_n_steps < 0:
            raise ValueError(f"health.every_n_steps: must be >= 0 (0 = off), got {self.every_n_steps}")
        if self.num_samples < 2:
            raise ValueError(f"health.num_samples: must be >= 2, got {self.num_samples}")
        for name in ("min_effective_rank", "min_std", "max_clamped_steps"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"health.{name}: must be >= 0 (0 = no alarm), got {getattr(self, name)}")
        for name in ("min_effective_rank", "min_std"):
            if getattr(self, name) > 0 and self.every_n_steps == 0:
                raise ValueError(
                    f"health.{name} is set but health.every_n_steps=0 never measures the embeddings: "
                    "set health.every_n_steps"
                )
        if self.stop_on_collapse and not (self.min_effective_rank or self.min_std or self.max_clamped_steps):
            raise ValueError(
                "health.stop_on_collapse is set but no alarm is: set health.min_effective_rank, "
                "health.min_std or health.max_clamped_steps"
            )
