"""Extra views of a training image made in the data workers: SigLIP 2's (SILC's, DINO's) local crops, as the
``local_crops`` batch field of ``clipforge.losses.self_distillation``.

The crops' randomness is seeded by a digest of the training image's pixels: that image is itself drawn from the
sample's place in the stream (``clipforge.data.samples``), so the same sample at the same place gives the same crops
after a restart, and the crops differ wherever the training crop does.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

CROP_RATIO = (3 / 4, 4 / 3)  # aspect ratios a local crop may take (torchvision's RandomResizedCrop default)


@dataclass(frozen=True)
class LocalCrops:
    """The ``local_crops`` batch field's function (picklable): ``count`` random resized crops of the uint8 training
    image (3, H, W), each covering ``scale`` of its area at an aspect ratio in ``CROP_RATIO``, resized (bicubic,
    antialiased) to ``size`` × ``size`` and flipped with probability 1/2, as float32 (count, 3, size, size) in the
    image's 0-255 range (rounded, as a uint8 image would hold it)."""

    count: int
    size: int
    scale: tuple[float, float]

    def __call__(self, image: torch.Tensor, caption: str) -> torch.Tensor:
        rng = random.Random(hashlib.blake2b(image.contiguous().numpy().tobytes(), digest_size=16).digest())
        crops = [self._crop(image, rng) for _ in range(self.count)]
        return torch.stack(crops)

    def _crop(self, image: torch.Tensor, rng: random.Random) -> torch.Tensor:
        top, left, height, width = crop_box(image.shape[1], image.shape[2], self.scale, rng)
        patch = image[None, :, top : top + height, left : left + width].float()
        resized = F.interpolate(patch, size=(self.size, self.size), mode="bicubic", antialias=True, align_corners=False)
        resized = resized[0].clamp(0, 255).round()
        return resized.flip(-1) if rng.random() < 0.5 else resized


def crop_box(height: int, width: int, scale: tuple[float, float], rng: random.Random) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random crop covering ``scale`` of the area at a ratio in ``CROP_RATIO``
    (torchvision's RandomResizedCrop rule: ten tries, then the centre crop at the nearest allowed ratio)."""
    area = height * width
    log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        ratio = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    ratio = width / height
    if ratio < CROP_RATIO[0]:
        w, h = width, round(width / CROP_RATIO[0])
    elif ratio > CROP_RATIO[1]:
        h, w = height, round(height * CROP_RATIO[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w
