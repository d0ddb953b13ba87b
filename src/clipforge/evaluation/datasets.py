"""Benchmark datasets from local files: one split opened as a ``Benchmark`` (``load_benchmark``) and its images
loaded in ``DataLoader`` workers (``benchmark_loader``).

The formats (CLIP_benchmark WebDataset directories, image folders, HF datasets) and how each is read:
``clipforge.evaluation.formats``; class names and templates and their checks against the labels:
``clipforge.evaluation.classnames``. Both modules' public names are importable from here too.

Images are loaded in index order, so results never depend on the worker count.

An image that does not decode (a zero-byte or corrupt file) is skipped, not scored, and counted: the loader's
batches carry the skipped samples (``Batch.skipped``), ``embed_images`` logs a warning naming the first few, and the
suite reports ``num_unreadable`` beside ``num_images`` (the metrics' denominator is the images that were read).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from clipforge.evaluation.classnames import (
    DatasetClasses,
    check_class_count,
    check_class_names,
    check_labels_fit,
    dataset_classes,
    dataset_templates,
    read_classnames,
    read_lines,
    read_templates,
    resolve_names,
)
from clipforge.evaluation.config import FORMATS
from clipforge.evaluation.formats import (
    CLASSIFICATION,
    CLIP_BENCHMARK_IMAGE_ORDER,
    HF_CAPTION_COLUMNS,
    HF_LABEL_COLUMNS,
    RETRIEVAL,
    HFSource,
    ImageFolderSource,
    Source,
    Target,
    WdsSource,
    dataset_kind,
    detect_format,
    imagefolder_split,
    scan_image_folder,
    wds_kind,
)

__all__ = [
    "CLASSIFICATION",
    "CLIP_BENCHMARK_IMAGE_ORDER",
    "HF_CAPTION_COLUMNS",
    "HF_LABEL_COLUMNS",
    "RETRIEVAL",
    "UNREADABLE_IMAGE_ERRORS",
    "UNREADABLE_LISTED",
    "Batch",
    "Benchmark",
    "DatasetClasses",
    "HFSource",
    "ImageFolderSource",
    "Source",
    "Target",
    "WdsSource",
    "benchmark_loader",
    "check_class_count",
    "check_class_names",
    "check_labels_fit",
    "dataset_classes",
    "dataset_kind",
    "dataset_templates",
    "detect_format",
    "load_benchmark",
    "read_classnames",
    "read_lines",
    "read_templates",
    "reopen",
    "resolve_names",
    "scan_image_folder",
    "wds_kind",
]

# What a file that is not a decodable image raises in PIL (UnidentifiedImageError and truncated files are OSErrors,
# some plugins raise SyntaxError or ValueError for broken headers) or in its size check.
UNREADABLE_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
UNREADABLE_LISTED = 5  # unreadable files named in a warning and in the results


@dataclass
class Benchmark:
    """A benchmark split ready to load: ``kind`` is "classification" or "retrieval"."""

    name: str
    kind: str
    source: Source
    format: str
    path: str
    split: str
    classnames: list[str] | None = None
    templates: list[str] | dict[str, list[str]] | None = None
    unreadable: list[tuple[int, str]] | None = None  # (index, what failed) per image skipped, once embedded

    def __len__(self) -> int:
        return len(self.source)

    def scored(self) -> list[int]:
        """The indices of the images that were scored: all but the unreadable ones."""
        skipped = {index for index, _ in self.unreadable or ()}
        return [index for index in range(len(self)) if index not in skipped]

    def image(self, index: int) -> Image.Image:
        return self.source.image(index)

    def keys(self) -> list[str]:
        """Every sample's id, in index order (what a key is in each format: ``clipforge.evaluation.formats``)."""
        return [self.source.key(index) for index in range(len(self))]

    def describe(self) -> dict[str, Any]:
        """What identifies the split (``reopen`` takes it back), and its size."""
        described = {
            "format": self.format,
            "path": self.path,
            "split": self.split,
            "kind": self.kind,
            "num_images": len(self),
        }
        if self.unreadable is not None:
            described["num_scored"] = len(self) - len(self.unreadable)  # the metrics' denominator
            described["num_unreadable"] = len(self.unreadable)
            if self.unreadable:
                described["unreadable"] = [note for _, note in self.unreadable[:UNREADABLE_LISTED]]
        if isinstance(self.source, ImageFolderSource):
            described["skipped_links"] = len(self.source.skipped_links)
        if isinstance(self.source, HFSource):
            target = "caption_column" if self.kind == RETRIEVAL else "label_column"
            described.update({"image_column": self.source.image_column, target: self.source.target_column})
        return described


def reopen(described: dict[str, Any], name: str | None = None) -> Benchmark:
    """The benchmark that ``Benchmark.describe`` described (to fetch images for a report)."""
    columns = {key: described[key] for key in ("image_column", "label_column", "caption_column") if key in described}
    return load_benchmark(
        described["path"], name, described["split"], described["format"], described["kind"], **columns
    )


def load_benchmark(
    path: str | Path,
    name: str | None = None,
    split: str = "test",
    format: str | None = None,
    kind: str | None = None,
    classnames: list[str] | None = None,
    templates: list[str] | dict[str, list[str]] | None = None,
    classnames_from: str = "the class names given",
    **columns: str | None,
) -> Benchmark:
    """Open one split. ``classnames``/``templates`` given here override the dataset's own files; the class names
    must fit the labels (see ``clipforge.evaluation.classnames``; ``classnames_from`` says where they came from in
    errors).

    ``kind`` ("classification"/"retrieval") is required for HF datasets and checked for the others;
    ``columns``: ``image_column``, ``label_column``, ``caption_column`` (HF datasets only).
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"{root} does not exist")
    format = format or detect_format(root, split)
    if format not in FORMATS:
        raise ValueError(f"{root}: format {format!r} is not one of {FORMATS}")
    if format == "wds":
        source: Source = WdsSource(root, split)
    elif format == "imagefolder":
        source = ImageFolderSource(imagefolder_split(root, split))
    else:
        source = HFSource(root, split, kind or CLASSIFICATION, **columns)
    if kind is not None and source.kind != kind:
        raise ValueError(f"{root} holds a {source.kind} set, expected {kind}")
    if len(source) == 0:
        raise ValueError(f"{root}: split {split!r} has no samples")
    benchmark = Benchmark(name or root.name, source.kind, source, format, str(root), split)
    if source.kind == CLASSIFICATION:
        own = dataset_classes(root, split, format, columns.get("label_column"))
        benchmark.classnames = classnames or own.names
        names_from = classnames_from if classnames else own.names_from
        if benchmark.classnames:
            own.check(benchmark.classnames, names_from)
            check_labels_fit(source.labels(), benchmark.classnames, names_from, f"{root} ({split} split)")
        benchmark.templates = templates or dataset_templates(root)
    return benchmark


class Batch(NamedTuple):
    """What a benchmark loader yields: the images that decoded and their targets, and the samples that did not."""

    images: torch.Tensor | None  # (B_decoded, 3, H, W); None when no image of the batch decoded
    targets: torch.Tensor | list  # (B_decoded,) class indices, or B_decoded caption lists
    skipped: list[tuple[int, str]]  # (index, "location (error)") per image that did not decode


class _Decoded(Dataset):
    def __init__(self, benchmark: Benchmark, transform: Callable) -> None:
        self.source, self.transform = benchmark.source, transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        """(image tensor, target, index, None), or (None, None, index, note) when the image does not decode."""
        try:
            image = self.source.image(index)
        except UNREADABLE_IMAGE_ERRORS as exc:
            # PIL's UnidentifiedImageError names the stream object, not the file: the location names the file
            reason = "not an image PIL can read" if isinstance(exc, UnidentifiedImageError) else str(exc)
            reason = " ".join(reason.split()) or type(exc).__name__
            return None, None, index, f"{self.source.location(index)} ({reason[:200]})"
        return self.transform(image), self.source.target(index), index, None


def _collate(batch) -> Batch:
    kept = [(image, target) for image, target, _, _ in batch if image is not None]
    skipped = [(index, note) for image, _, index, note in batch if image is None]
    images = torch.stack([image for image, _ in kept]) if kept else None
    targets = [target for _, target in kept]
    if targets and isinstance(targets[0], int):
        return Batch(images, torch.tensor(targets), skipped)
    return Batch(images, targets, skipped)


def benchmark_loader(
    benchmark: Benchmark, transform: Callable, batch_size: int = 256, num_workers: int = 2
) -> DataLoader:
    """``Batch``es (images (B, 3, H, W), labels (B,) or list of caption lists, skipped samples), in index order;
    a batch unpacks as (images, targets, skipped)."""
    return DataLoader(
        _Decoded(benchmark, transform),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
        shuffle=False,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
    )
