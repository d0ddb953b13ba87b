"""Representation health: diagnostics of paired image/text embeddings and a collapse alarm.

The functions take L2-normalised embeddings ``image`` and ``text`` of shape (N, D) whose row i is a
positive pair (similarities are dot products, i.e. cosines), and are plain, differentiable torch.
``embedding_health(image, text)`` computes everything at once, without gradient, in fp32 (fp64 for
the SVD), and returns python floats under these keys:

``health/alignment``
    mean ||x_i - y_i||² over pairs (Wang & Isola 2020; 0 = every pair identical, 4 = opposite).
``health/uniformity_image``, ``health/uniformity_text``
    log mean_{i<j} exp(-2 ||x_i - x_j||²) within one modality (Wang & Isola 2020; 0 = all samples on
    one point, lower = more uniform on the sphere; about -4 for uniform points in high dimension).
``health/positive_cos``
    mean cosine similarity of the positive pairs.
``health/hardest_negative_cos_i2t``, ``health/hardest_negative_cos_t2i``
    mean over images (texts) of the largest cosine to any text (image) other than its own pair.
``health/mean_rank_i2t``, ``health/mean_rank_t2i``
    mean rank of the positive among all N candidates (1 = best; similarities within 1e-6 are ties and
    share their average rank, so identical embeddings score the chance level (N + 1) / 2).
``health/effective_rank_image``, ``health/effective_rank_text``
    effective rank (Roy & Vetterli 2007) of the centred (N, D) embedding matrix: exp of the entropy of
    its singular values normalised to sum 1; between 1 (one direction, or all samples on one point)
    and min(N - 1, D). Dimensional collapse shows here first.
``health/std_mean_image``, ``health/std_min_image``, ``health/std_mean_text``, ``health/std_min_text``
    per-dimension standard deviation over the samples (population std), mean and min over the D
    dimensions. SimSiam's collapse indicator (Chen & He 2021): about 1/sqrt(D) for well spread
    normalised embeddings, 0 when every sample has the same embedding.

``HealthConfig`` (``health_config.py``) says how often the trainer measures a held-out batch and when to alarm;
``CollapseMonitor`` turns the metrics (and the temperature, every step) into warnings logged on
``clipforge.train``, or a ``CollapseError`` when ``stop_on_collapse`` is set.
"""

from __future__ import annotations

import logging
import math

import torch

from clipforge.health_config import HealthConfig

HEALTH_KEYS = (
    "health/alignment",
    "health/uniformity_image",
    "health/uniformity_text",
    "health/positive_cos",
    "health/hardest_negative_cos_i2t",
    "health/hardest_negative_cos_t2i",
    "health/mean_rank_i2t",
    "health/mean_rank_t2i",
    "health/effective_rank_image",
    "health/effective_rank_text",
    "health/std_mean_image",
    "health/std_min_image",
    "health/std_mean_text",
    "health/std_min_text",
)
CLAMP_TOLERANCE = 1e-4
"""The temperature is "at its clamp" when logit_scale >= max_logit_scale * (1 - CLAMP_TOLERANCE)."""
RANK_TIE = 1e-6
"""Cosine similarities closer than this count as ties in ``mean_rank`` (fp32 rounding of equal ones)."""

logger = logging.getLogger("clipforge.train")


def alignment(x: torch.Tensor, y: torch.Tensor, alpha: float = 2) -> torch.Tensor:
    """mean_i ||x_i - y_i||^alpha over positive pairs (Wang & Isola 2020)."""
    return (x - y).norm(dim=1).pow(alpha).mean()


def uniformity(x: torch.Tensor, t: float = 2) -> torch.Tensor:
    """log mean_{i<j} exp(-t ||x_i - x_j||²) over the N(N-1)/2 pairs of one modality (Wang & Isola 2020)."""
    if x.shape[0] < 2:
        raise ValueError(f"uniformity needs at least 2 samples, got {x.shape[0]}")
    squared = torch.pdist(x, p=2).pow(2)
    return torch.logsumexp(-t * squared, dim=0) - math.log(squared.numel())


def positive_cos(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity of the positive pairs (x_i, y_i)."""
    return (x * y).sum(dim=1).mean()


def hardest_negative_cos(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """mean_i max_{j≠i} x_i · y_j: how close the nearest wrong partner of each x_i is (x→y direction)."""
    if x.shape[0] < 2:
        raise ValueError(f"hardest_negative_cos needs at least 2 samples, got {x.shape[0]}")
    similarity = x @ y.T
    diagonal = torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
    return similarity.masked_fill(diagonal, -math.inf).amax(dim=1).mean()


def mean_rank(x: torch.Tensor, y: torch.Tensor, tie: float = RANK_TIE) -> torch.Tensor:
    """Mean rank of y_i among all y for the query x_i (1 = best). Similarities within ``tie`` of the
    positive's are ties and share their average rank (identical embeddings: (N + 1) / 2, chance level)."""
    similarity = x @ y.T
    positive = similarity.diagonal()[:, None]
    better = (similarity > positive + tie).sum(dim=1)
    tied = ((similarity - positive).abs() <= tie).sum(dim=1) - 1  # the positive itself is not a tie
    return (1 + better + tied / 2).float().mean()


def effective_rank(x: torch.Tensor) -> torch.Tensor:
    """exp(entropy of the normalised singular values) of the centred (N, D) matrix (Roy & Vetterli 2007).

    Singular values below max(N, D) · eps(float32) · ||x||_F count as zero (rounding of the centring);
    with none left (every row the same point) the effective rank is 1, its minimum.
    """
    x = x.double()
    singular = torch.linalg.svdvals(x - x.mean(dim=0))
    tolerance = max(x.shape) * torch.finfo(torch.float32).eps * torch.linalg.matrix_norm(x)
    singular = torch.where(singular > tolerance, singular, torch.zeros_like(singular))
    total = singular.sum()
    p = singular / torch.where(total > 0, total, torch.ones_like(total))
    return torch.exp(-torch.special.xlogy(p, p).sum()).float()  # 0 log 0 = 0


def dimension_std(x: torch.Tensor) -> torch.Tensor:
    """Population standard deviation over the samples of each of the D dimensions, (D,)."""
    return x.std(dim=0, correction=0)


@torch.no_grad()
def embedding_health(image: torch.Tensor, text: torch.Tensor) -> dict[str, float]:
    """All the diagnostics of paired, L2-normalised embeddings (N, D), N >= 2, keyed as in ``HEALTH_KEYS``.

    One host transfer at the end; meant for a held-out batch every few hundred steps.
    """
    if image.ndim != 2 or image.shape != text.shape:
        raise ValueError(
            f"embedding_health: expected two (N, D) tensors of the same shape, got {tuple(image.shape)} "
            f"and {tuple(text.shape)}"
        )
    if image.shape[0] < 2:
        raise ValueError(f"embedding_health: needs at least 2 pairs, got {image.shape[0]}")
    image, text = image.float(), text.float()
    image_std, text_std = dimension_std(image), dimension_std(text)
    values = [
        alignment(image, text),
        uniformity(image),
        uniformity(text),
        positive_cos(image, text),
        hardest_negative_cos(image, text),
        hardest_negative_cos(text, image),
        mean_rank(image, text),
        mean_rank(text, image),
        effective_rank(image),
        effective_rank(text),
        image_std.mean(),
        image_std.min(),
        text_std.mean(),
        text_std.min(),
    ]
    return dict(zip(HEALTH_KEYS, torch.stack(values).tolist()))


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
        from clipforge.evaluation.datasets import load_benchmark
        from clipforge.evaluation.suite import load_suite

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
