"""Dense evaluation sets on disk, and the one resizing rule that puts their masks and boxes on the model's crop.

Two layouts (what ``clipforge eval --dataset`` is pointed at with one's own data):

Semantic segmentation, ADE20K-style folders (``load_segmentation_set``)::

    ROOT/classnames.txt                          one class name per line; line i (0-based) is pixel value i
    ROOT/zeroshot_classification_templates.txt   optional, one template per line with {c}; default: OpenAI's 80
                                                 ImageNet templates (openai_imagenet)
    ROOT/images/{split}/NAME.{jpg,jpeg,png,webp}
    ROOT/annotations/{split}/NAME.png            8-bit single channel (mode L or P); value = class index

``ignore_index`` (255) marks pixels no metric counts. ``reduce_zero_label`` is ADE20K's convention: value 0 is
"other" and ignored, value v ≥ 1 is class v - 1 (classnames.txt then names the classes of values 1, 2, ...).
Splits: ``train`` (the linear probe's fit) and ``test`` (scored). An image without an annotation of the same name
is an error naming the file; so is a mask whose size differs from its image's, or with a value that names no class.

Referring expressions, RefCOCO-style flat JSON (``load_referring_set``)::

    ROOT/images/NAME.{jpg,png,...}
    ROOT/refs_{split}.json   [{"image": "images/NAME.jpg", "expression": "the red circle at the top left",
                               "box": [x0, y0, x1, y1], "candidates": [[x0, y0, x1, y1], ...]}, ...]

Boxes are in pixels of the stored image, xyxy, x1/y1 exclusive; ``candidates`` holds every object's box in the
image (RefCOCO's ground-truth-proposal setting) and ``box`` is one of them.

The resizing rule. An image reaches the tower through its model's eval transform: resize (the shorter side to S,
bicubic) and centre crop (S×S). Its mask goes through the same geometry: the same resized size and the same crop
offsets, which ``CropGeometry`` reads from the transform's own ``Resize`` and ``CenterCrop`` steps and computes as
torchvision does, with nearest-neighbour sampling, so mask and crop align pixel for pixel and every value is one
the file holds. Where the crop reaches past the resized image (a crop larger than the image: torchvision pads with
black), the mask is ignore. Boxes go through the same scale and offset and are clipped to the crop. EXIF
orientation is not applied: masks and boxes are drawn on the stored pixels.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from clipforge.data.images import IMAGE_EXTENSIONS, to_rgb
from clipforge.evaluation.datasets import read_classnames, read_templates, resolve_names

SEGMENTATION, REFERRING = "segmentation", "referring"
IGNORE = -1  # a mask pixel no metric counts, once read (whatever ignore_index the file used)
MASK_MODES = ("L", "P")
DEFAULT_TEMPLATES = "openai_imagenet"
UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)  # a file PIL cannot read, a bad mask
# Transforms that move pixels and that CropGeometry cannot follow: a transform named so is refused, not skipped.
_GEOMETRIC_WORDS = ("Resize", "Crop", "Pad", "Flip", "Rotat", "Affine", "Perspective")


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)


def read_rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return to_rgb(image)


@dataclass
class SegmentationSet:
    """One split of a segmentation set: ``images[i]`` is annotated by ``annotations[i]``."""

    root: Path
    split: str
    classnames: list[str]
    templates: list[str] | dict[str, list[str]]
    images: list[Path]
    annotations: list[Path]
    ignore_index: int = 255
    reduce_zero_label: bool = False

    def __len__(self) -> int:
        return len(self.images)

    def image(self, index: int) -> Image.Image:
        return read_rgb(self.images[index])

    def mask(self, index: int) -> np.ndarray:
        """(H, W) int64 class indices, ``IGNORE`` where the file says ignore; a ValueError naming the file for a
        mode other than L/P or a value that names no class."""
        path = self.annotations[index]
        with Image.open(path) as image:
            if image.mode not in MASK_MODES:
                raise ValueError(
                    f"{path}: mask mode {image.mode}, expected an 8-bit single-channel PNG (mode L or P) whose "
                    "values are class indices"
                )
            values = np.asarray(image).astype(np.int64)
        ignored = values == self.ignore_index
        if self.reduce_zero_label:
            ignored |= values == 0
            values = values - 1
        values[ignored] = IGNORE
        bad = values >= len(self.classnames)
        if bad.any():
            value = int(values[bad].max()) + (1 if self.reduce_zero_label else 0)
            raise ValueError(
                f"{path}: pixel value {value} names no class: {len(self.classnames)} class names "
                f"({self.root / 'classnames.txt'}){' with reduce_zero_label' if self.reduce_zero_label else ''}, "
                f"ignore_index {self.ignore_index}"
            )
        return values


def load_segmentation_set(
    root: str | Path,
    split: str = "test",
    classnames: list[str] | None = None,
    templates: list[str] | dict[str, list[str]] | None = None,
    ignore_index: int = 255,
    reduce_zero_label: bool = False,
) -> SegmentationSet:
    """Open one split of a segmentation set (layout: module docstring). ``classnames``/``templates`` given here
    override the set's files. Pixels are read when an item is loaded; names and pairing are checked now."""
    root = Path(root)
    images_dir, annotations_dir = root / "images" / split, root / "annotations" / split
    for folder in (images_dir, annotations_dir):
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{folder} does not exist (segmentation layout: {root}/images/{split}/NAME.jpg with "
                f"{root}/annotations/{split}/NAME.png, and {root}/classnames.txt)"
            )
    if classnames is None:
        if not (root / "classnames.txt").is_file():
            raise FileNotFoundError(
                f"{root / 'classnames.txt'} does not exist: one class name per line, line i naming pixel value i"
            )
        classnames = read_classnames(root / "classnames.txt")
    if templates is None:
        own = root / "zeroshot_classification_templates.txt"
        templates = read_templates(own) if own.is_file() else resolve_names(DEFAULT_TEMPLATES, "templates")
    images = _image_files(images_dir)
    if not images:
        raise ValueError(f"{images_dir}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    seen: dict[str, Path] = {}
    annotations = []
    for image in images:
        if image.stem in seen:
            raise ValueError(f"{image} and {seen[image.stem]}: two images named {image.stem!r}; a mask names one")
        seen[image.stem] = image
        annotation = annotations_dir / f"{image.stem}.png"
        if not annotation.is_file():
            raise FileNotFoundError(f"{image}: no annotation {annotation}")
        annotations.append(annotation)
    return SegmentationSet(
        root, split, list(classnames), templates, images, annotations, ignore_index, reduce_zero_label
    )


Box = tuple[float, float, float, float]


@dataclass
class ReferringSample:
    image: Path
    expression: str
    box: Box
    candidates: list[Box]


@dataclass
class ReferringSet:
    root: Path
    split: str
    samples: list[ReferringSample]

    def __len__(self) -> int:
        return len(self.samples)

    def image_paths(self) -> list[Path]:
        """The distinct images, in order of first use."""
        return list(dict.fromkeys(sample.image for sample in self.samples))


def _box(value, where: str) -> Box:
    if not (isinstance(value, list) and len(value) == 4 and all(isinstance(v, (int, float)) for v in value)):
        raise ValueError(f"{where}: expected [x0, y0, x1, y1] in pixels, got {value!r}")
    x0, y0, x1, y1 = (float(v) for v in value)
    if not (x1 > x0 and y1 > y0):
        raise ValueError(f"{where}: {value!r} is empty (x1 and y1 are exclusive and must exceed x0 and y0)")
    return x0, y0, x1, y1


def _referring_sample(root: Path, entry, where: str) -> ReferringSample:
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected an object with image, expression, box, candidates")
    missing = [key for key in ("image", "expression", "box", "candidates") if key not in entry]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(missing)}")
    if not isinstance(entry["image"], str) or not (root / entry["image"]).is_file():
        raise FileNotFoundError(f"{where}: image {entry['image']!r} is not a file under {root}")
    if not isinstance(entry["expression"], str) or not entry["expression"].strip():
        raise ValueError(f"{where}: expression {entry['expression']!r} is not a non-empty string")
    box = _box(entry["box"], f"{where}: box")
    if not isinstance(entry["candidates"], list) or not entry["candidates"]:
        raise ValueError(f"{where}: candidates must be a non-empty list of boxes")
    candidates = [_box(c, f"{where}: candidates[{i}]") for i, c in enumerate(entry["candidates"])]
    if box not in candidates:
        raise ValueError(f"{where}: box {entry['box']!r} is not one of its candidates")
    return ReferringSample(root / entry["image"], entry["expression"], box, candidates)


def load_referring_set(root: str | Path, split: str = "test") -> ReferringSet:
    """Open ``refs_{split}.json`` of a referring-expression set (layout: module docstring); every entry is checked
    now, an error naming the file and the entry."""
    root = Path(root)
    path = root / f"refs_{split}.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist (referring layout: {root}/refs_{split}.json and {root}/images/)"
        )
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: expected a non-empty JSON list of referring expressions")
    samples = [_referring_sample(root, entry, f"{path}: entry {index}") for index, entry in enumerate(entries)]
    return ReferringSet(root, split, samples)


def dense_kind(root: str | Path, split: str = "test") -> str | None:
    """``SEGMENTATION`` or ``REFERRING`` when ``root`` holds that layout's files for ``split``, else None."""
    root = Path(root)
    if (root / "images" / split).is_dir() and (root / "annotations" / split).is_dir():
        return SEGMENTATION
    if (root / f"refs_{split}.json").is_file():
        return REFERRING
    return None


# --- the resizing rule --------------------------------------------------------------------------------------------


def _resized_size(width: int, height: int, size, max_size: int | None) -> tuple[int, int]:
    """torchvision ``Resize``'s output (width, height): an int (or one-element sequence) is the shorter side, the
    longer one scaled and truncated; an (h, w) sequence is the size."""
    if isinstance(size, int) or len(size) == 1:
        requested = size if isinstance(size, int) else size[0]
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = requested, int(requested * long / short)
        if max_size is not None and new_long > max_size:
            new_short, new_long = int(max_size * new_short / new_long), max_size
        return (new_short, new_long) if width <= height else (new_long, new_short)
    return size[1], size[0]


def _crop_offset(size: int, crop: int) -> int:
    """torchvision ``center_crop``'s start along one side; negative where it pads (the crop is larger)."""
    if crop > size:
        return -((crop - size) // 2)
    return int(round((size - crop) / 2.0))


@dataclass(frozen=True)
class Step:
    kind: str  # "resize": to (width, height); "crop": the box (left, top) + (width, height) of the current image
    width: int
    height: int
    left: int = 0
    top: int = 0


class CropGeometry:
    """The ``Resize`` and ``CenterCrop`` steps of an eval transform (a torchvision ``Compose``, as open_clip makes
    it), followed on masks and boxes; other steps (mode conversion, to-tensor, normalisation) move no pixel. A step
    that does move pixels but is neither (a flip, a pad, open_clip's keep-ratio resize) is refused, naming it."""

    def __init__(self, transform: Callable) -> None:
        steps = getattr(transform, "transforms", None)
        if steps is None:
            raise ValueError(
                f"dense evaluation: cannot follow the geometry of a {type(transform).__name__} image transform on "
                "masks and boxes (it reads torchvision Resize and CenterCrop steps of a Compose, as open_clip's "
                "eval transform has)"
            )
        from torchvision.transforms import CenterCrop, Resize

        self.ops = []
        for step in steps:
            if isinstance(step, Resize):
                self.ops.append(("resize", step.size, step.max_size))
            elif isinstance(step, CenterCrop):
                self.ops.append(("crop", step.size, None))
            elif any(word in type(step).__name__ for word in _GEOMETRIC_WORDS):
                raise ValueError(
                    f"dense evaluation: the image transform's {type(step).__name__} moves pixels in a way masks and "
                    "boxes cannot follow (supported: torchvision Resize then CenterCrop)"
                )

    def plan(self, width: int, height: int) -> list[Step]:
        """The concrete steps for a (width, height) image."""
        plan = []
        for kind, size, max_size in self.ops:
            if kind == "resize":
                width, height = _resized_size(width, height, size, max_size)
                plan.append(Step("resize", width, height))
            else:
                crop_h, crop_w = (size, size) if isinstance(size, int) else (size[0], size[-1])
                plan.append(Step("crop", crop_w, crop_h, _crop_offset(width, crop_w), _crop_offset(height, crop_h)))
                width, height = crop_w, crop_h
        return plan

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        plan = self.plan(width, height)
        return (plan[-1].width, plan[-1].height) if plan else (width, height)

    def mask(self, mask: np.ndarray) -> np.ndarray:
        """(H, W) class indices → the crop's (S_h, S_w): nearest-neighbour resize (Pillow's, on the grid the
        image's resize uses), crop at the image's offsets, ``IGNORE`` outside the resized mask."""
        height, width = mask.shape
        for step in self.plan(width, height):
            if step.kind == "resize":
                resized = Image.fromarray(mask.astype(np.int32), mode="I").resize(
                    (step.width, step.height), Image.NEAREST
                )
                mask = np.asarray(resized).astype(np.int64)
            else:
                cropped = np.full((step.height, step.width), IGNORE, dtype=np.int64)
                top, left = step.top, step.left
                rows = slice(max(top, 0), min(top + step.height, mask.shape[0]))
                cols = slice(max(left, 0), min(left + step.width, mask.shape[1]))
                cropped[rows.start - top : rows.stop - top, cols.start - left : cols.stop - left] = mask[rows, cols]
                mask = cropped
        return mask

    def boxes(self, boxes: np.ndarray, width: int, height: int) -> np.ndarray:
        """(N, 4) xyxy boxes in pixels of a (width, height) image → in pixels of its crop, clipped to the crop."""
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).copy()
        for step in self.plan(width, height):
            if step.kind == "resize":
                boxes *= [step.width / width, step.height / height] * 2
            else:
                boxes -= [step.left, step.top] * 2
                boxes = boxes.clip(0, [step.width, step.height] * 2)
            width, height = step.width, step.height
        return boxes


# --- loading ------------------------------------------------------------------------------------------------------


class _SegmentationItems(Dataset):
    def __init__(self, dataset: SegmentationSet, transform: Callable, geometry: CropGeometry) -> None:
        self.dataset, self.transform, self.geometry = dataset, transform, geometry

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        """(pixels (3, S, S), mask (S, S), None), or (None, None, the error naming the file): errors are raised in
        the main process, as one line, whatever the worker count."""
        dataset = self.dataset
        image_path, mask_path = dataset.images[index], dataset.annotations[index]
        try:
            image = dataset.image(index)
        except UNREADABLE as exc:
            return None, None, _unreadable(image_path, exc)
        try:
            mask = dataset.mask(index)
        except UNREADABLE as exc:
            return None, None, _unreadable(mask_path, exc)
        if mask.shape != (image.height, image.width):
            return (
                None,
                None,
                (
                    f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image {image_path.name} is "
                    f"{image.width}x{image.height}"
                ),
            )
        pixels, cropped = self.transform(image), self.geometry.mask(mask)
        if tuple(cropped.shape) != tuple(pixels.shape[-2:]):
            return None, None, _size_mismatch(image_path, pixels, cropped.shape)
        return pixels, torch.from_numpy(cropped), None


def _unreadable(path: Path, exc: Exception) -> str:
    message = " ".join(str(exc).split()) or type(exc).__name__
    return message if str(path) in message else f"{path}: {message}"


def _size_mismatch(path: Path, pixels: torch.Tensor, expected) -> str:
    return (
        f"{path}: the image transform made a {pixels.shape[-1]}x{pixels.shape[-2]} crop where its Resize and "
        f"CenterCrop steps give {expected[1]}x{expected[0]}; dense evaluation follows only those steps"
    )


def _collate(batch):
    errors = [message for _, _, message in batch if message is not None]
    if errors:
        return None, None, errors[0]
    return torch.stack([pixels for pixels, _, _ in batch]), torch.stack([mask for _, mask, _ in batch]), None


def segmentation_batches(
    dataset: SegmentationSet, transform: Callable, batch_size: int = 32, num_workers: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images (B, 3, S, S), masks (B, S, S) int64 with ``IGNORE``) in index order; the first unreadable file is a
    ValueError naming it."""
    loader = DataLoader(
        _SegmentationItems(dataset, transform, CropGeometry(transform)),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
        shuffle=False,
    )
    for images, masks, error in loader:
        if error is not None:
            raise ValueError(error)
        yield images, masks


class _ReferringImages(Dataset):
    def __init__(self, paths: list[Path], transform: Callable, geometry: CropGeometry) -> None:
        self.paths, self.transform, self.geometry = paths, transform, geometry

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        path = self.paths[index]
        try:
            image = read_rgb(path)
        except UNREADABLE as exc:
            return None, None, _unreadable(path, exc)
        pixels = self.transform(image)
        expected = self.geometry.output_size(image.width, image.height)
        if (expected[1], expected[0]) != tuple(pixels.shape[-2:]):
            return None, None, _size_mismatch(path, pixels, (expected[1], expected[0]))
        return pixels, torch.tensor([image.width, image.height]), None


def referring_batches(
    paths: list[Path], transform: Callable, batch_size: int = 32, num_workers: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images (B, 3, S, S), their stored (width, height) (B, 2)) of ``paths`` in order."""
    loader = DataLoader(
        _ReferringImages(paths, transform, CropGeometry(transform)),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
        shuffle=False,
    )
    for images, sizes, error in loader:
        if error is not None:
            raise ValueError(error)
        yield images, sizes
