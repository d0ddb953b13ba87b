"""A sample's grounded regions as training reads them: boxes moved into the training crop, region captions
tokenised, collated to fixed shapes. The loader makes them when an objective asks for the batch field ``regions``
(``clipforge.losses.objective.RegionsField``, the LocCa decoder's referring and grounded tasks); otherwise the member
is never parsed.

The member is ``KEY.regions.json`` beside the image and caption: ``{"boxes": [[x0, y0, x1, y1], ...], "captions":
[...]}`` (other fields, such as ``clipforge prep synthetic --scenes``' ``names``, are ignored): one box per region in
the pixels of the image as a viewer shows it (EXIF orientation applied), x1 and y1 exclusive, and the region's caption.
A sample without the member has no regions (every web dataset today); a member that does not parse, or whose boxes
or captions are malformed, is a ``bad_regions`` skip (``clipforge.data.samples.SKIP_KINDS``).

In the crop: each box is clipped to the training crop (``ImageTransform.crop_and_box``, the crop the image itself
got) and given in [0, 1] of it, (x0, y0, x1, y1); a box of which less than ``MIN_VISIBLE`` of the area is inside the
crop is dropped, and so is one whose caption is empty after cleaning. The first ``max_regions`` of the rest, in the
member's order, are kept.

Batch fields (B = batch size, R = ``max_regions``, L = the tokenizer's context length): ``region_boxes`` float32
(B, R, 4), ``region_captions`` int64 (B, R, L) (the run's tokenizer, as the captions), ``region_count`` int64 (B,);
rows past a sample's count are zeros.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from typing import Any

from clipforge.data.samples import clean_caption

MIN_VISIBLE = 0.5  # share of a box's area that must lie inside the crop for the region to be kept
DEFAULT_MAX_REGIONS = 8  # regions kept per sample when an objective asks for them by the plain name
Box = tuple[float, float, float, float]


class RegionsProblem(ValueError):
    """A ``KEY.regions.json`` that cannot be read as regions (the message says why)."""


def requested_regions(fields: Sequence[Any]) -> int | None:
    """``max_regions`` of the ``regions`` field among an objective set's batch fields (a plain ``"regions"`` asks for
    ``DEFAULT_MAX_REGIONS``), or None when no objective asks for regions."""
    for field in fields:
        if getattr(field, "name", field) == "regions":
            return int(getattr(field, "max_regions", DEFAULT_MAX_REGIONS))
    return None


def parse_regions(data: bytes) -> list[tuple[Box, str]]:
    """The (box in pixels, cleaned caption) pairs of a ``KEY.regions.json`` member; ``RegionsProblem`` if malformed."""
    try:
        record = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exn:
        raise RegionsProblem(f".regions.json does not parse ({exn})") from None
    if not isinstance(record, dict) or not isinstance(record.get("boxes"), list):
        raise RegionsProblem('.regions.json is not an object with a list "boxes"')
    boxes, captions = record["boxes"], record.get("captions")
    if not isinstance(captions, list) or len(captions) != len(boxes):
        raise RegionsProblem(f'.regions.json: "captions" must be a list of {len(boxes)} strings, one per box')
    regions = []
    for index, (box, caption) in enumerate(zip(boxes, captions)):
        if not isinstance(caption, str):
            raise RegionsProblem(f".regions.json: caption {index} is a {type(caption).__name__}, not a string")
        if (
            not isinstance(box, list)
            or len(box) != 4
            or not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in box)
            or not (box[0] < box[2] and box[1] < box[3])
        ):
            raise RegionsProblem(f".regions.json: box {index} is not [x0, y0, x1, y1] with x0 < x1, y0 < y1: {box}")
        regions.append((tuple(float(v) for v in box), clean_caption(caption)))
    return regions


def crop_regions(regions: list[tuple[Box, str]], crop: Box, max_regions: int) -> tuple[list[Box], list[str]]:
    """The regions of the training crop ``crop`` (x0, y0, x1, y1 in the image's pixels): boxes in [0, 1] of the crop,
    clipped; those mostly outside it (``MIN_VISIBLE``) or without a caption dropped; at most ``max_regions``."""
    left, top, right, bottom = crop
    width, height = right - left, bottom - top
    boxes, captions = [], []
    for (x0, y0, x1, y1), caption in regions:
        if len(boxes) == max_regions:
            break
        inside_w = min(x1, right) - max(x0, left)
        inside_h = min(y1, bottom) - max(y0, top)
        if not caption or inside_w <= 0 or inside_h <= 0:
            continue
        if inside_w * inside_h < MIN_VISIBLE * (x1 - x0) * (y1 - y0):
            continue
        boxes.append(
            (
                min(max((x0 - left) / width, 0.0), 1.0),
                min(max((y0 - top) / height, 0.0), 1.0),
                min(max((x1 - left) / width, 0.0), 1.0),
                min(max((y1 - top) / height, 0.0), 1.0),
            )
        )
        captions.append(caption)
    return boxes, captions


def collate_regions(
    regions: list[tuple[list[Box], list[str]]], max_regions: int, tokenizer: Callable
) -> dict[str, Any]:
    """Each sample's (boxes, captions) → the batch fields of the module docstring, padded to ``max_regions``; the
    captions tokenised in one call, at the tokenizer's full context length."""
    import torch

    count = torch.tensor([len(boxes) for boxes, _ in regions], dtype=torch.int64)
    flat = [caption for _, captions in regions for caption in captions]
    tokens = tokenizer(flat) if flat else tokenizer([""])[:0]  # (n, L)
    boxes = torch.zeros(len(regions), max_regions, 4, dtype=torch.float32)
    captions = torch.zeros(len(regions), max_regions, tokens.shape[1], dtype=torch.int64)
    start = 0
    for index, (sample_boxes, _) in enumerate(regions):
        number = len(sample_boxes)
        if number:
            boxes[index, :number] = torch.tensor(sample_boxes, dtype=torch.float32)
            captions[index, :number] = tokens[start : start + number]
            start += number
    return {"region_boxes": boxes, "region_captions": captions.contiguous(), "region_count": count}
