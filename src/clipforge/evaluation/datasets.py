"""Benchmark datasets in CLIP_benchmark's WebDataset layout, read from a local directory.

Layout (as ``clip_benchmark.datasets.builder.build_wds_dataset`` reads it)::

    DIR/test/nshards.txt, DIR/test/0.tar ...      samples: KEY.{webp,png,jpg,jpeg} + KEY.cls | KEY.txt
    DIR/classnames.txt                            one class name per line (classification)
    DIR/zeroshot_classification_templates.txt     one template per line, with {c}
    DIR/dataset_type.txt                          "retrieval" for image–caption sets

Raw samples are read from the tars in the main process (cheap: bytes only); decoding and the
image transform run in DataLoader workers, in order, so results never depend on worker count.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, Dataset

IMAGE_EXTENSIONS = ("webp", "png", "jpg", "jpeg")


@dataclass
class Benchmark:
    name: str
    task: str  # "zeroshot_classification" or "zeroshot_retrieval"
    samples: list[dict[str, Any]]  # raw: {"__key__", image bytes under its extension, "cls" or "txt"}
    classnames: list[str] | None = None
    templates: list[str] | None = None


def _read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_benchmark(path: str | Path, name: str | None = None, split: str = "test") -> Benchmark:
    root = Path(path)
    nshards_file = root / split / "nshards.txt"
    if not nshards_file.is_file():
        raise FileNotFoundError(f"{root}: not a CLIP_benchmark WebDataset directory ({nshards_file} is missing)")
    nshards = int(nshards_file.read_text().strip())
    type_file = root / "dataset_type.txt"
    dataset_type = type_file.read_text().strip().lower() if type_file.is_file() else "classification"
    urls = [str(root / split / f"{index}.tar") for index in range(nshards)]
    samples = list(wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()))
    if not samples:
        raise ValueError(f"{root}: the benchmark has no samples")
    name = name or root.name
    if dataset_type == "retrieval":
        return Benchmark(name, "zeroshot_retrieval", samples)
    for required in ("classnames.txt", "zeroshot_classification_templates.txt"):
        if not (root / required).is_file():
            raise FileNotFoundError(f"{root}: classification benchmark without {required}")
    return Benchmark(name, "zeroshot_classification", samples, _read_lines(root / "classnames.txt"),
                     _read_lines(root / "zeroshot_classification_templates.txt"))


class _Decoded(Dataset):
    def __init__(self, benchmark: Benchmark, transform: Callable) -> None:
        self.samples, self.transform, self.task = benchmark.samples, transform, benchmark.task

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        sample = self.samples[index]
        extension = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
        if extension is None:
            raise ValueError(f"benchmark sample {sample['__key__']} has no image ({', '.join(IMAGE_EXTENSIONS)})")
        image = self.transform(Image.open(io.BytesIO(sample[extension])).convert("RGB"))
        if self.task == "zeroshot_retrieval":
            return image, sample["txt"].decode("utf-8").splitlines()
        return image, int(sample["cls"].decode("utf-8").strip())


def _collate(batch):
    images = torch.stack([image for image, _ in batch])
    targets = [target for _, target in batch]
    if isinstance(targets[0], int):
        return images, torch.tensor(targets)
    return images, targets


def benchmark_loader(benchmark: Benchmark, transform: Callable, batch_size: int = 256,
                     num_workers: int = 2) -> DataLoader:
    """Batches of (images (B, 3, H, W), labels (B,) or list of caption lists), in file order."""
    return DataLoader(_Decoded(benchmark, transform), batch_size=batch_size, num_workers=num_workers,
                      collate_fn=_collate, shuffle=False)
