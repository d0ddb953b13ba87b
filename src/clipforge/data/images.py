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

Images over ``max_pixels`` (``data.max_image_pixels``) are refused from their header, before any pixel is
decoded, whatever the format: that setting is the one limit (Pillow's own bomb check, which would refuse a PNG
over its default limit whatever the setting says, is off while we open an image).

What an image looks like is one rule, ``to_rgb`` + EXIF orientation, shared by this stream, ``clipforge prep``
(``--resize``) and ``clipforge prep inspect``: the picture a viewer shows. EXIF orientation is applied;
transparent pixels are composited over white; 16-bit and 32-bit integer greyscale (``I;16*``, ``I``) is scaled
from 0–65535 to 0–255 (Pillow's own conversion clips it, so mid-grey would become white); float greyscale
(``F``) is read as 0.0–1.0; premultiplied alpha (``La``, ``RGBa``) is un-premultiplied first; CMYK, YCbCr,
palette and 1-bit images are converted by Pillow.

torch is imported inside the functions that make tensors: decoding and checking images (``ImageTransform.crop``,
``clipforge prep inspect``) needs none.
"""

from __future__ import annotations

import io
import math
import random
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import simplejpeg
from PIL import Image, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:
    import torch

JPEG_MAGIC = b"\xff\xd8\xff"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # the image members a training sample may have (img2dataset's)
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's default decompression-bomb limit
_TRANSPARENT_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_INTEGER_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class DecompressionBomb(ValueError):
    """The image's header declares more pixels than the configured limit."""


def decode_error(exc: Exception) -> str:
    """A decoder's exception as one line (Pillow's "cannot identify" names an anonymous BytesIO)."""
    if isinstance(exc, UnidentifiedImageError):
        return "not an image format Pillow can identify"
    return f"{type(exc).__name__}: {exc}"


def check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise DecompressionBomb(
            f"{width}x{height} = {width * height} pixels exceeds the limit of {max_pixels} (data.max_image_pixels)"
        )


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Pillow's lazy image (header read, no pixels decoded), refused as a ``DecompressionBomb`` over ``max_pixels``.

    Pillow's global check is off for the ``open`` itself: it would refuse a PNG over its own default whatever the
    setting (and call a bomb a corrupt image); ``max_pixels`` is checked right after instead. Loader workers are
    single-threaded, so switching the global for the call does not leak into other images."""
    saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        image = Image.open(io.BytesIO(data))
    finally:
        Image.MAX_IMAGE_PIXELS = saved
    check_pixels(*image.size, max_pixels)
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """The RGB picture a viewer shows for ``image`` in any Pillow mode (see the module docstring for the rule)."""
    mode = image.mode
    if mode in _INTEGER_GREY_MODES:  # Pillow's convert clips these at 255
        values = np.asarray(image).astype(np.float64)
        grey = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode == "F":
        grey = np.clip(np.rint(np.nan_to_num(np.asarray(image), nan=0.0) * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode == "La":  # premultiplied: Pillow un-premultiplies only on the way to LA
        image, mode = image.convert("LA"), "LA"
    if (
        mode in _TRANSPARENT_MODES
        or (mode == "P" and "transparency" in image.info)
        or (mode in ("L", "RGB") and "transparency" in image.info)
    ):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def jpeg_orientation(data: bytes) -> int:
    """The EXIF orientation (1–8) of a JPEG, read from its APP1 segment without decoding; 1 when absent.

    Pillow's ``getexif`` gives the same answer at about 10× the cost, which the training stream pays per image."""
    position = 2
    while position + 4 <= len(data) and data[position] == 0xFF:
        marker = data[position + 1]
        if marker in (0xDA, 0xD9):  # start of scan / end of image: no more metadata
            return 1
        length = struct.unpack(">H", data[position + 2 : position + 4])[0]
        if marker == 0xE1 and data[position + 4 : position + 10] == b"Exif\x00\x00":
            return _tiff_orientation(data[position + 10 : position + 2 + length])
        position += 2 + length
    return 1


def _tiff_orientation(tiff: bytes) -> int:
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return 1
    order = "<" if tiff[:2] == b"II" else ">"
    offset = struct.unpack(order + "I", tiff[4:8])[0]
    if offset + 2 > len(tiff):
        return 1
    (count,) = struct.unpack(order + "H", tiff[offset : offset + 2])
    for entry in range(count):
        start = offset + 2 + 12 * entry
        if start + 12 > len(tiff):
            return 1
        tag, kind = struct.unpack(order + "HH", tiff[start : start + 4])
        if tag == 0x0112 and kind == 3:  # Orientation, SHORT
            value = struct.unpack(order + "H", tiff[start + 8 : start + 10])[0]
            return value if 1 <= value <= 8 else 1
    return 1


def decode_rgb(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The whole image as a viewer shows it (EXIF orientation applied, ``to_rgb``), in full resolution."""
    image = open_image(data, max_pixels)
    image.load()  # a truncated or corrupt file fails here
    return to_rgb(ImageOps.exif_transpose(image))


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
    max_pixels: int = DEFAULT_MAX_PIXELS

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
        return cls(
            size=cfg["size"],
            mean=tuple(cfg["mean"]),
            std=tuple(cfg["std"]),
            interpolation="bilinear" if interpolation == "bilinear" else "bicubic",
            train=train,
            **overrides,
        )

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

    def _decode_jpeg(self, data: bytes, rng: random.Random | None) -> tuple[np.ndarray, tuple, tuple] | None:
        """libjpeg-turbo's decode at a DCT-domain reduction: (array, crop box in its pixels as (left, top, width,
        height), the array's size over the image's as (w, h)); None where Pillow must do it (CMYK, a rotated
        image)."""
        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError:
            return None  # let Pillow have a go (and produce the error if it is corrupt)
        check_pixels(width, height, self.max_pixels)
        if jpeg_orientation(data) != 1:
            return None  # the crop is drawn in the upright frame, which Pillow's path builds
        left, top, crop_w, crop_h = self.crop_box(width, height, rng)
        reduction = self.reduction(crop_w, crop_h)
        try:
            array = simplejpeg.decode_jpeg(
                data, colorspace="RGB", min_width=math.ceil(width * reduction), min_height=math.ceil(height * reduction)
            )
        except ValueError:
            return None
        factor_w, factor_h = array.shape[1] / width, array.shape[0] / height
        box = (left * factor_w, top * factor_h, crop_w * factor_w, crop_h * factor_h)
        return array, box, (factor_w, factor_h)

    def _decode_pil(self, data: bytes, rng: random.Random | None) -> tuple[np.ndarray, tuple, tuple]:
        image = open_image(data, self.max_pixels)
        if image.format == "JPEG" and image.getexif().get(0x0112, 1) == 1:
            width, height = image.size
            left, top, crop_w, crop_h = self.crop_box(width, height, rng)
            reduction = self.reduction(crop_w, crop_h)
            if reduction < 1:
                image.draft(image.mode, (math.ceil(width * reduction), math.ceil(height * reduction)))
            image = to_rgb(image)
        else:  # upright first (EXIF orientation), then the crop is drawn in the frame a viewer shows
            image.load()
            image = to_rgb(ImageOps.exif_transpose(image))
            width, height = image.size
            left, top, crop_w, crop_h = self.crop_box(width, height, rng)
        array = np.array(image)  # a writable copy (torch refuses to wrap Pillow's read-only buffer)
        factor_w, factor_h = array.shape[1] / width, array.shape[0] / height
        return array, (left * factor_w, top * factor_h, crop_w * factor_w, crop_h * factor_h), (factor_w, factor_h)

    def crop(self, data: bytes, rng: random.Random | None = None) -> np.ndarray:
        """Encoded image bytes → the uint8 crop (h, w, 3), decoded as training decodes it, before the resize.

        Needs no torch: ``clipforge prep inspect`` checks images with it."""
        return self.crop_and_box(data, rng)[0]

    def crop_and_box(
        self, data: bytes, rng: random.Random | None = None
    ) -> tuple[np.ndarray, tuple[float, float, float, float]]:
        """``crop``'s array, and the part of the image it shows: (x0, y0, x1, y1) in the pixels of the image as a
        viewer shows it (EXIF orientation applied), x1 and y1 exclusive. Where the image was decoded at a reduced
        size the crop is a whole-pixel slice of the smaller image, and the box is that slice's edges scaled back, so
        a box given in the image's pixels lands on the pixels the output shows of it."""
        decoded = self._decode_jpeg(data, rng) if data[:3] == JPEG_MAGIC else None
        if decoded is None:
            decoded = self._decode_pil(data, rng)
        array, (left, top, crop_w, crop_h), (factor_w, factor_h) = decoded
        x0, y0 = int(round(left)), int(round(top))
        x1 = min(array.shape[1], max(x0 + 1, int(round(left + crop_w))))
        y1 = min(array.shape[0], max(y0 + 1, int(round(top + crop_h))))
        return array[y0:y1, x0:x1], (x0 / factor_w, y0 / factor_h, x1 / factor_w, y1 / factor_h)

    def with_crop_box(
        self, data: bytes, rng: random.Random | None = None
    ) -> tuple[torch.Tensor, tuple[float, float, float, float]]:
        """``self(data, rng)`` and the crop's box in the image's pixels (``crop_and_box``): what the loader uses to move
        a sample's region boxes into the training crop. The same ``rng`` gives the same crop as ``self(data, rng)``."""
        crop, box = self.crop_and_box(data, rng)
        return self._resize(crop), box

    def __call__(self, data: bytes, rng: random.Random | None = None) -> torch.Tensor:
        """Encoded image bytes → uint8 tensor (3, H, W) of the output size."""
        return self._resize(self.crop(data, rng))

    def _resize(self, array: np.ndarray) -> torch.Tensor:
        """A uint8 crop (h, w, 3) → uint8 tensor (3, H, W) of the output size."""
        import torch
        import torch.nn.functional as F

        crop = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)
        if tuple(crop.shape[1:]) == self.size:
            return crop.contiguous()
        return F.interpolate(
            crop.unsqueeze(0), size=self.size, mode=self.interpolation, antialias=True, align_corners=False
        )[0]

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) → float32 normalised with the model's mean and std (on images' device).

        One float allocation, then in place: allocating a new batch-sized tensor per operation costs more
        in page faults than the arithmetic (3× slower on a CPU)."""
        import torch

        if images.dtype != torch.uint8:
            return images  # already normalised (in the loader workers)
        mean, scale = _normalize_constants(tuple(self.mean), tuple(self.std), images.device)
        return images.to(torch.float32).sub_(mean).mul_(scale)


_NORMALIZE_CONSTANTS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _normalize_constants(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, C, 1, 1) float32 ``255 · mean`` and ``1 / (255 · std)`` on ``device``, made on its first batch and reused:
    ``torch.tensor(..., device=cuda)`` is a blocking host-to-device copy, a host sync on every step."""
    import torch

    key = (mean, std, device)
    if key not in _NORMALIZE_CONSTANTS:
        _NORMALIZE_CONSTANTS[key] = (
            torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255.0,
            1.0 / (torch.tensor(std, device=device).view(1, -1, 1, 1) * 255.0),
        )
    return _NORMALIZE_CONSTANTS[key]
