"""``ImageTransform.normalize``: the same numbers as building mean and std per call, from constants made once per
device (on a GPU, building them per call was a blocking host-to-device copy every step; tests/test_cuda.py checks
that no sync is left)."""

from __future__ import annotations

import torch

from clipforge.data.images import ImageTransform, _normalize_constants

MEAN, STD = (0.1, 0.2, 0.3), (0.25, 0.5, 0.125)  # this test's own, so the first call below makes the constants


def per_call_reference(images: torch.Tensor) -> torch.Tensor:
    """The expression normalize used before the cache, evaluated on every call."""
    mean = torch.tensor(MEAN, device=images.device).view(1, -1, 1, 1) * 255.0
    scale = 1.0 / (torch.tensor(STD, device=images.device).view(1, -1, 1, 1) * 255.0)
    return images.to(torch.float32).sub_(mean).mul_(scale)


def test_normalize_equals_the_per_call_constants_and_reuses_its_own(monkeypatch):
    transform = ImageTransform(size=8, mean=MEAN, std=STD)
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    expected = per_call_reference(images)
    first = transform.normalize(images)
    assert first.dtype == torch.float32 and torch.equal(first, expected)
    exact = (images.double() / 255 - torch.tensor(MEAN, dtype=torch.float64).view(1, -1, 1, 1)) / torch.tensor(
        STD, dtype=torch.float64
    ).view(1, -1, 1, 1)
    torch.testing.assert_close(first.double(), exact, rtol=1e-6, atol=1e-6)
    constants = _normalize_constants(MEAN, STD, images.device)

    def no_new_tensors(*args, **kwargs):
        raise AssertionError("normalize built its constants again")

    monkeypatch.setattr(torch, "tensor", no_new_tensors)
    assert torch.equal(transform.normalize(images), expected)
    again = _normalize_constants(MEAN, STD, images.device)
    assert again[0] is constants[0] and again[1] is constants[1]


def test_normalized_input_passes_through():
    floats = torch.randn(2, 3, 8, 8)
    assert ImageTransform(size=8).normalize(floats) is floats


def test_list_mean_and_std_are_accepted_as_tuples_are():
    """The constants are keyed by value: a transform built with lists (not hashable) works and matches."""
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    from_lists = ImageTransform(size=8, mean=list(MEAN), std=list(STD)).normalize(images)
    assert torch.equal(from_lists, per_call_reference(images))
