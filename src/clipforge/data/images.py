"""Image decoding and the training/eval crop, done cheaply in the loader workers.

What OpenCLIP does per sample (PIL decode at full size, PIL bicubic RandomResizedCrop, ToTensor,
Normalize) costs ~2 ms for a 256 px JPEG and ~6 ms for a 512 px one on a CPU core. Here:

* JPEGs are decoded by libjpeg-turbo (``simplejpeg``) with DCT-domain scaling: the crop is drawn
  first from the header's size, then the image is decoded at the smallest of 1, 1/2, 1/4, 1/8 at
  which the crop still covers the output size, so no resolution the output needs is thrown away and
  a 512 px image bound for 224 px decodes at half size (a 256 px one decodes in full). Other formats
  (and JPEGs libjpeg-turbo cannot convert, e.g. CMYK) go through Pillow, with its JPEG draft mode.
* The crop is resized by torch's uint8 antialiased bicubic kernel (within ±2 grey levels of
  Pillow's bicubic, ~4× faster).
* For an accelerator, workers ship uint8 tensors (a quarter of float32's bytes through shared
  memory) and normalisation is one vectorised op on the whole batch on the device
  (``ImageTransform.normalize``). When training on the CPU the workers normalise each batch
  themselves, so the main process, which trains, does none of it.

The crop is open_clip's: train = RandomResizedCrop(size, scale=(0.9, 1.0), ratio=(3/4, 4/3)),
eval = resize the shorter side to ``size`` and centre-crop; mean, std and interpolation come from
the model's ``preprocess_cfg``. Random draws come from a ``random.Random`` the caller seeds per
sample, so a sample gets the same crop whether or not the run was interrupted.

Images over ``max_pixels`` are refused from their header, before any pixel is decoded.
"""

from __future__ import annotations

import io
import math
import random
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import simplejpeg
import torch
import torch.nn.functional as F
from PIL import Image

JPEG_MAGIC = b"\xff\xd8\xff"


class DecompressionBomb(ValueError):
    """The image's header declares more pixels than the configured limit."""


@dataclass
class ImageTransform:
    """Decode + crop + resize to uint8 CHW; ``normalize`` turns a batch into the model's float input."""

    size: tuple[int, int] = (224, 224)
    mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)
    interpolation: str = "bicubic"
    train: bool = True
    scale: tuple[float, float] = (0.9, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    max_pixels: int = 89_478_485  # Pillow's default decompression-bomb limit

    def __post_init__(self) -> None:
        if isinstance(self.size, int):
            self.size = (self.size, self.size)
        self.size = (int(self.size[0]), int(self.size[1]))
        if self.interpolation not in ("bicubic", "bilinear"):
            raise ValueError(f"interpolation: expected bicubic or bilinear, got {self.interpolation!r}")

    @classmethod
    def from_preprocess_cfg(cls, cfg: dict[str, Any], train: bool, **overrides: Any) -> ImageTransform:
        """From open_clip's ``model.visual.preprocess_cfg`` (size, mean, std, interpolation)."""
        interpolation = cfg.get("interpolation", "bicubic")
        return cls(size=cfg["size"], mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                   interpolation="bilinear" if interpolation == "bilinear" else "bicubic", train=train, **overrides)

    # -- crop geometry (header only) --------------------------------------------------------------

    def crop_box(self, width: int, height: int, rng: random.Random | None) -> tuple[int, int, int, int]:
        """(left, top, crop_width, crop_height) in the original image's pixels."""
        out_h, out_w = self.size
        if not self.train:
            # resize shorter side to the output, centre crop: a centred box of the output's aspect ratio
            scale = max(out_w / width, out_h / height)
            crop_w, crop_h = min(width, round(out_w / scale)), min(height, round(out_h / scale))
            return (width - crop_w) // 2, (height - crop_h) // 2, crop_w, crop_h
        rng = rng or random.Random()
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):  # torchvision's RandomResizedCrop.get_params, drawn from our rng
            target_area = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            crop_w = int(round(math.sqrt(target_area * aspect)))
            crop_h = int(round(math.sqrt(target_area / aspect)))
            if 0 < crop_w <= width and 0 < crop_h <= height:
                return rng.randint(0, width - crop_w), rng.randint(0, height - crop_h), crop_w, crop_h
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            crop_w, crop_h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            crop_w, crop_h = int(round(height * self.ratio[1])), height
        else:
            crop_w, crop_h = width, height
        return (width - crop_w) // 2, (height - crop_h) // 2, crop_w, crop_h

    def reduction(self, crop_w: int, crop_h: int) -> float:
        """The DCT-domain scale to decode at: 1/2, 1/4 or 1/8 when the crop still covers the output at that
        scale, else 1 (the output is not much smaller than the crop: decode in full, resample once)."""
        out_h, out_w = self.size
        needed = max(out_w / crop_w, out_h / crop_h)
        reduction = 1.0
        while reduction / 2 >= needed and reduction > 1 / 8:
            reduction /= 2
        return reduction

    # -- decode ------------------------------------------------------------------------------------

    def _check_pixels(self, width: int, height: int) -> None:
        if width * height > self.max_pixels:
            raise DecompressionBomb(f"{width}x{height} = {width * height} pixels exceeds the limit of "
                                    f"{self.max_pixels} (data.max_image_pixels)")

    def _decode_jpeg(self, data: bytes, rng: random.Random | None) -> tuple[np.ndarray, tuple] | None:
        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError:
            return None  # let Pillow have a go (and produce the error if it is corrupt)
        self._check_pixels(width, height)
        left, top, crop_w, crop_h = self.crop_box(width, height, rng)
        reduction = self.reduction(crop_w, crop_h)
        try:
            array = simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=math.ceil(width * reduction),
                                           min_height=math.ceil(height * reduction))
        except ValueError:
            return None
        factor_w, factor_h = array.shape[1] / width, array.shape[0] / height
        box = (left * factor_w, top * factor_h, crop_w * factor_w, crop_h * factor_h)
        return array, box

    def _decode_pil(self, data: bytes, rng: random.Random | None) -> tuple[np.ndarray, tuple]:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            self._check_pixels(width, height)
            left, top, crop_w, crop_h = self.crop_box(width, height, rng)
            reduction = self.reduction(crop_w, crop_h)
            if image.format == "JPEG" and reduction < 1:
                image.draft("RGB", (math.ceil(width * reduction), math.ceil(height * reduction)))
            image = image.convert("RGB")
        array = np.array(image)  # a writable copy (torch refuses to wrap Pillow's read-only buffer)
        factor_w, factor_h = array.shape[1] / width, array.shape[0] / height
        return array, (left * factor_w, top * factor_h, crop_w * factor_w, crop_h * factor_h)

    def __call__(self, data: bytes, rng: random.Random | None = None) -> torch.Tensor:
        """Encoded image bytes → uint8 tensor (3, H, W) of the output size."""
        decoded = self._decode_jpeg(data, rng) if data[:3] == JPEG_MAGIC else None
        if decoded is None:
            decoded = self._decode_pil(data, rng)
        array, (left, top, crop_w, crop_h) = decoded
        x0, y0 = int(round(left)), int(round(top))
        x1 = min(array.shape[1], max(x0 + 1, int(round(left + crop_w))))
        y1 = min(array.shape[0], max(y0 + 1, int(round(top + crop_h))))
        crop = torch.from_numpy(np.ascontiguousarray(array[y0:y1, x0:x1])).permute(2, 0, 1)
        if tuple(crop.shape[1:]) == self.size:
            return crop.contiguous()
        return F.interpolate(crop.unsqueeze(0), size=self.size, mode=self.interpolation, antialias=True,
                             align_corners=False)[0]

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) → float32 normalised with the model's mean and std (on images' device).

        One float allocation, then in place: allocating a new batch-sized tensor per operation costs more
        in page faults than the arithmetic (3× slower on a CPU)."""
        if images.dtype != torch.uint8:
            return images  # already normalised (in the loader workers)
        mean, scale = _normalize_constants(tuple(self.mean), tuple(self.std), images.device)
        return images.to(torch.float32).sub_(mean).mul_(scale)


_NORMALIZE_CONSTANTS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _normalize_constants(mean: tuple[float, ...], std: tuple[float, ...],
                         device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, C, 1, 1) float32 ``255 · mean`` and ``1 / (255 · std)`` on ``device``, made on its first batch and reused:
    ``torch.tensor(..., device=cuda)`` is a blocking host-to-device copy, a host sync on every step."""
    key = (mean, std, device)
    if key not in _NORMALIZE_CONSTANTS:
        _NORMALIZE_CONSTANTS[key] = (torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255.0,
                                     1.0 / (torch.tensor(std, device=device).view(1, -1, 1, 1) * 255.0))
    return _NORMALIZE_CONSTANTS[key]
