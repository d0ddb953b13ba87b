"""Representation health: diagnostics of paired image/text embeddings.

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

``clipforge eval`` reports them for every retrieval set; during training, ``clipforge.train.health`` measures a
held-out batch with them and raises the collapse alarms.
"""

from __future__ import annotations

import math

import torch

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
RANK_TIE = 1e-6
"""Cosine similarities closer than this count as ties in ``mean_rank`` (fp32 rounding of equal ones)."""


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
