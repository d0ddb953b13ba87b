"""The fast decode + crop agrees with open_clip's PIL transforms, and decodes JPEGs at reduced size."""

from __future__ import annotations

import io
import random

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from clipforge.data.images import DecompressionBomb, ImageTransform

CFG = {
    "size": (224, 224),
    "mean": (0.48145466, 0.4578275, 0.40821073),
    "std": (0.26862954, 0.26130258, 0.27577711),
    "interpolation": "bicubic",
}


def photo(width, height, fmt="JPEG", seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.linspace(0, 1, width), np.linspace(0, 1, height))
    image = np.stack([x * 200 + 30, y * 180 + 40, (x * y) * 220 + 20], -1) + rng.normal(0, 6, (height, width, 3))
    image[height // 4 : height // 2, width // 3 : width // 2] = (220, 40, 60)  # a sharp-edged object
    buffer = io.BytesIO()
    Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(buffer, format=fmt, quality=92)
    return buffer.getvalue()


@pytest.mark.parametrize("width,height,fmt", [(256, 256, "JPEG"), (512, 384, "JPEG"), (300, 200, "PNG")])
def test_eval_crop_matches_open_clip(width, height, fmt):
    data = photo(width, height, fmt)
    ours = ImageTransform.from_preprocess_cfg(CFG, train=False)
    reference = open_clip.image_transform(224, is_train=False)(Image.open(io.BytesIO(data)).convert("RGB"))
    got = ours.normalize(ours(data).unsqueeze(0))[0]
    assert got.shape == reference.shape == (3, 224, 224)
    # same geometry and filter: sub-pixel crop rounding and IDCT differences, visible only at hard edges
    difference = (got - reference).abs() * 0.27 * 255  # back to grey levels
    assert difference.mean() < 1.0 and difference.max() < 16


def test_large_jpeg_is_decoded_at_reduced_size_without_losing_what_the_output_needs(monkeypatch):
    import simplejpeg

    seen = []
    decode = simplejpeg.decode_jpeg
    monkeypatch.setattr(
        simplejpeg, "decode_jpeg", lambda *a, **k: seen.append(decode(*a, **k).shape) or decode(*a, **k)
    )
    data = photo(1024, 768)
    transform = ImageTransform.from_preprocess_cfg(CFG, train=True)
    out = transform(data, random.Random(0))
    assert out.shape == (3, 224, 224) and out.dtype == torch.uint8
    assert seen[0][:2] == (384, 512)  # decoded at half size: the ~1000 px crop still covers 224 px
    left, top, crop_w, crop_h = transform.crop_box(1024, 768, random.Random(0))
    assert crop_w * seen[0][1] / 1024 >= 224 - 1 and crop_h * seen[0][0] / 768 >= 224 - 1  # crop still covers
    # and it matches decoding at full size (Pillow path) with the same crop to within a few grey levels
    monkeypatch.setattr(simplejpeg, "decode_jpeg_header", lambda data: (_ for _ in ()).throw(ValueError("off")))
    monkeypatch.setattr(Image.Image, "draft", lambda self, mode, size: None)  # no Pillow draft either
    reference = transform(data, random.Random(0))
    assert (out.float() - reference.float()).abs().mean() < 2.0


def test_train_crop_is_random_but_reproducible():
    data = photo(320, 240)
    transform = ImageTransform.from_preprocess_cfg(CFG, train=True)
    a, b = transform(data, random.Random(5)), transform(data, random.Random(5))
    c = transform(data, random.Random(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    boxes = [transform.crop_box(320, 240, random.Random(i)) for i in range(200)]
    areas = [w * h / (320 * 240) for _, _, w, h in boxes]
    assert 0.9 - 1e-2 <= min(areas) and max(areas) <= 1.0  # open_clip's scale=(0.9, 1.0)


def test_pixel_limit_is_checked_from_the_header_before_decoding():
    transform = ImageTransform.from_preprocess_cfg(CFG, train=True, max_pixels=500 * 500)
    for fmt in ("JPEG", "PNG"):
        with pytest.raises(DecompressionBomb, match="600x600 = 360000 pixels exceeds the limit of 250000"):
            transform(photo(600, 600, fmt))
    assert transform(photo(400, 400)).shape == (3, 224, 224)


def test_grayscale_cmyk_and_alpha_images_become_rgb():
    transform = ImageTransform.from_preprocess_cfg(CFG, train=False)
    for mode, fmt in (("L", "JPEG"), ("CMYK", "JPEG"), ("RGBA", "PNG"), ("P", "PNG")):
        buffer = io.BytesIO()
        Image.new(mode, (240, 240), 100 if mode in ("L", "P") else (100, 50, 20, 200)[: len(mode)]).save(
            buffer, format=fmt
        )
        out = transform(buffer.getvalue())
        assert out.shape == (3, 224, 224), mode
