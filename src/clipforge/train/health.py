"""Representation health during training: the held-out batch the trainer measures, and the collapse alarms.

``HealthConfig`` (``train/config.py``) says how often the trainer measures a held-out batch and when to alarm;
``HealthProbe`` embeds that batch with the model of the moment and returns ``clipforge.evaluation.health``'s
diagnostics of it; ``CollapseMonitor`` turns them (and the temperature, every step) into warnings logged on
``clipforge.train``, or a ``CollapseError`` when ``stop_on_collapse`` is set.
"""

from __future__ import annotations

import logging

import torch

from clipforge.evaluation.datasets import load_benchmark
from clipforge.evaluation.health import embedding_health
from clipforge.evaluation.suite import load_suite
from clipforge.train.config import HealthConfig

CLAMP_TOLERANCE = 1e-4
"""The temperature is "at its clamp" when logit_scale >= max_logit_scale * (1 - CLAMP_TOLERANCE)."""

logger = logging.getLogger("clipforge.train")


class CollapseError(RuntimeError):
    """Representation collapse detected with ``health.stop_on_collapse`` set; the message names metric and step."""


class CollapseMonitor:
    """Turns health metrics and the temperature into warnings (and a ``CollapseError`` if so configured)."""

    def __init__(self, cfg: HealthConfig, max_logit_scale: float, log_warnings: bool = True) -> None:
        """``log_warnings``: False on every rank but the first, which all check the (shared) temperature."""
        self.cfg, self.max_logit_scale, self.log_warnings = cfg, max_logit_scale, log_warnings
        self.clamped_steps = 0  # as of the last temperature_alarms
        self._clamped: torch.Tensor | None = None  # consecutive clamped steps, on the model's device
        self._reported = 0  # max_clamped_steps multiples already warned about

    def check_embeddings(self, step: int, metrics: dict[str, float]) -> list[str]:
        """Warnings for the effective-rank and std thresholds; ``metrics`` as from ``embedding_health``."""
        warnings = []
        for modality in ("image", "text"):
            if self.cfg.min_effective_rank > 0:
                key = f"health/effective_rank_{modality}"
                if metrics[key] < self.cfg.min_effective_rank:
                    warnings.append(
                        f"step {step}: {key} = {metrics[key]:.4g} < health.min_effective_rank "
                        f"{self.cfg.min_effective_rank:g}: the {modality} embeddings are collapsing "
                        f"(they span about {metrics[key]:.1f} directions)"
                    )
            if self.cfg.min_std > 0:
                key = f"health/std_mean_{modality}"
                if metrics[key] < self.cfg.min_std:
                    warnings.append(
                        f"step {step}: {key} = {metrics[key]:.4g} < health.min_std {self.cfg.min_std:g}: "
                        f"the {modality} embeddings are collapsing (samples barely differ)"
                    )
        return self._report(warnings)

    def count_clamped(self, logit_scale: float | torch.Tensor) -> None:
        """Every step: count consecutive steps with exp(logit_scale) at its clamp, on ``logit_scale``'s device (no
        host sync: the count is read by ``temperature_alarms`` at logging steps)."""
        value = torch.as_tensor(logit_scale).detach()
        at_clamp = value >= self.max_logit_scale * (1 - CLAMP_TOLERANCE)
        self._clamped = at_clamp.long() if self._clamped is None else torch.where(at_clamp, self._clamped + 1, 0)

    def temperature_alarms(self, step: int, logit_scale: float | torch.Tensor) -> list[str]:
        """A warning for each ``max_clamped_steps`` consecutive clamped steps counted since the last call (one host
        sync; the loop calls it at logging steps)."""
        if not self.cfg.max_clamped_steps or self._clamped is None:
            return []
        self.clamped_steps = int(self._clamped)
        multiple = self.clamped_steps // self.cfg.max_clamped_steps
        alarm, self._reported = multiple > self._reported, multiple  # a count that fell back to 0 re-arms it
        if not alarm:
            return []
        return self._report(
            [
                f"step {step}: logit_scale = {float(logit_scale):.4g} has sat at loss.max_logit_scale "
                f"{self.max_logit_scale:g} for {self.clamped_steps} consecutive steps >= health.max_clamped_steps "
                f"{self.cfg.max_clamped_steps}: the temperature is pinned at its clamp (the loss wants "
                "sharper logits than allowed: duplicates, a too-easy task or collapsing embeddings)"
            ]
        )

    def check_temperature(self, step: int, logit_scale: float | torch.Tensor) -> list[str]:
        """``count_clamped`` then ``temperature_alarms``: the check of one step."""
        if not self.cfg.max_clamped_steps:
            return []
        self.count_clamped(logit_scale)
        return self.temperature_alarms(step, logit_scale)

    def _report(self, warnings: list[str]) -> list[str]:
        for warning in warnings if self.log_warnings else ():
            logger.warning(warning)
        if warnings and self.cfg.stop_on_collapse:
            raise CollapseError("\n".join(warnings))
        return warnings


class HealthProbe:
    """The held-out batch, decoded and tokenised once, and its diagnostics for the model of the moment.

    ``measure`` embeds the same ``num_samples`` image–caption pairs (each image with its first caption) in
    eval mode and returns ``embedding_health`` of them. Only rank 0 holds one.
    """

    def __init__(self, images: torch.Tensor, texts: torch.Tensor, source: str, batch_size: int = 256) -> None:
        self.images, self.texts, self.source, self.batch_size = images, texts, source, batch_size

    @classmethod
    def from_config(
        cls, cfg: HealthConfig, suite_path: str | None, transform, tokenizer, batch_size: int = 256
    ) -> HealthProbe:
        if cfg.dataset is not None:
            benchmark = load_benchmark(cfg.dataset, kind="retrieval")
        else:
            entries = (
                [entry for entry in load_suite(suite_path).datasets if entry.task == "zeroshot_retrieval"]
                if suite_path
                else []
            )
            if not entries:
                raise ValueError(
                    "health.every_n_steps needs held-out image–caption pairs: set health.dataset, or "
                    f"an eval.suite with a zeroshot_retrieval dataset (eval.suite={suite_path})"
                )
            entry = entries[0]
            benchmark = load_benchmark(
                entry.path, entry.name, entry.split, entry.format, "retrieval", **entry.columns()
            )
        count = min(cfg.num_samples, len(benchmark))
        if count < 2:
            raise ValueError(f"health: {benchmark.path} has {count} image(s); the diagnostics need at least 2")
        images = torch.stack([transform(benchmark.image(index)) for index in range(count)])
        captions = [benchmark.source.target(index)[0] for index in range(count)]
        return cls(images, tokenizer(captions), f"{benchmark.path} ({count} pairs)", batch_size)

    @torch.no_grad()
    def measure(self, encoder) -> dict[str, float]:
        """``encoder``: anything with ``encode_image`` / ``encode_text`` returning normalised embeddings."""
        chunks = range(0, len(self.images), self.batch_size)
        image = torch.cat([encoder.encode_image(self.images[i : i + self.batch_size]).float().cpu() for i in chunks])
        text = torch.cat([encoder.encode_text(self.texts[i : i + self.batch_size]).float().cpu() for i in chunks])
        return embedding_health(image, text)
