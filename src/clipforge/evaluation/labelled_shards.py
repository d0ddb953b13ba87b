"""A labelled classification set → training shards whose captions are its class prompts (FLYP).

FLYP (Goyal et al., 2023, "Finetune like you pretrain") fine-tunes a CLIP model on a classification set with the
contrastive loss it was pretrained with, the texts being the class prompts: every template filled with the
sample's class name. ``write_from_labelled`` opens the set exactly as ``clipforge eval`` does
(``clipforge.evaluation.datasets.load_benchmark``: a CLIP_benchmark WebDataset directory, an image folder or a saved
Hugging Face dataset, the split named), with the class names and templates ``clipforge eval`` reads (the set's own
``classnames.txt`` / class folders / ``ClassLabel`` and ``zeroshot_classification_templates.txt``, or the ones given,
resolved by ``clipforge.evaluation.classnames.resolve_names``; filled by ``clipforge.evaluation.zeroshot``'s
``class_prompts``), and writes each sample as ``KEY.jpg|png|webp`` (the image's bytes as stored, or resized),
``KEY.txt`` (the class's prompts, one per line, in template order), ``KEY.cls`` (the class index) and ``KEY.json``
(with ``label``). Training with ``data.caption_key: txt:lines`` takes one line per sample, seeded by its place in
the stream, so each sample meets a random template each epoch.

The shard layout, resume, refusals and skip counts are ``clipforge.data.prep``'s: an image that does not decode is
skipped and counted (``corrupt_image``). The class prompts are part of the settings an earlier run's shards must
match to be kept.

It lives beside the readers it shares with ``clipforge eval`` (``clipforge.data``, which writes the shards, is below
``clipforge.evaluation`` and never imports it).

Entry point: ``clipforge prep labelled FOLDER --out DIR [--split train] [--classnames FILE] [--templates NAME|FILE]``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipforge.data.prep import write_shards
from clipforge.data.prep_output import check_output_folder
from clipforge.data.prep_rows import Row, RowList, WriteOptions, image_reference
from clipforge.evaluation.classnames import resolve_names
from clipforge.evaluation.datasets import load_benchmark
from clipforge.evaluation.formats import (
    CLASSIFICATION,
    CLIP_BENCHMARK_IMAGE_ORDER,
    HFSource,
    ImageFolderSource,
    WdsSource,
)
from clipforge.evaluation.zeroshot import class_prompts

__all__ = ["HFLabelledRows", "MemberRows", "class_captions", "write_from_labelled"]


@dataclass
class MemberRows:
    """Rows of a CLIP_benchmark WebDataset split, shipped as (row, shard path, offset, size, key, label) and read by
    offset in the writer process, as ``WdsSource`` reads them: the member's bytes, never decoded here."""

    members: list[tuple[int, str | None, int, int, str, int]]
    captions: dict[int, str]

    def __iter__(self) -> Iterator[Row]:
        handles: dict[str, Any] = {}
        try:
            for index, shard, offset, size, key, label in self.members:
                image = None
                if shard is not None:
                    if shard not in handles:
                        handles[shard] = open(shard, "rb")  # closed below
                    handles[shard].seek(offset)
                    image = handles[shard].read(size)
                yield Row(index, image, self.captions[label], key, label)
        finally:
            for handle in handles.values():
                handle.close()


@dataclass
class HFLabelledRows:
    """Rows ``start:stop`` of a saved HF dataset (its image column undecoded), read in the writer process
    (memory-mapped datasets pickle by path)."""

    dataset: Any
    image_column: str
    labels: list[int]
    """The labels of rows ``start:stop``."""
    captions: dict[int, str]
    start: int
    stop: int

    def __iter__(self) -> Iterator[Row]:
        for offset in range(self.start, self.stop, 256):
            values = self.dataset[offset : min(offset + 256, self.stop)][self.image_column]
            for index, value in enumerate(values, start=offset):
                image, url = image_reference(value, None)
                label = self.labels[index - self.start]
                yield Row(index, image, self.captions[label], url or f"row {index}", label)


def _rows_for(source: Any, labels: list[int], captions: list[str]) -> Callable[[int, int], Iterable[Row]]:
    """``rows_for(start, stop)`` of ``clipforge.data.prep.write_shards`` for a benchmark source: each shard's rows
    carry what its writer needs (paths, tar offsets or a dataset by path, and the prompts of its classes only)."""

    def prompts(start: int, stop: int) -> dict[int, str]:
        return {label: captions[label] for label in set(labels[start:stop])}

    def rows_for(start: int, stop: int) -> Iterable[Row]:
        if isinstance(source, ImageFolderSource):
            return RowList(
                [
                    Row(index, source.samples[index][0], captions[labels[index]], source.key(index), labels[index])
                    for index in range(start, stop)
                ]
            )
        if isinstance(source, WdsSource):
            members = []
            for index in range(start, stop):
                shard, found = source.samples[index]
                extension = next((ext for ext in CLIP_BENCHMARK_IMAGE_ORDER if ext in found), None)
                offset, size = found[extension] if extension else (0, 0)  # no image: a missing_image skip
                path = source.shards[shard] if extension else None
                members.append((index, path, offset, size, source.location(index), labels[index]))
            return MemberRows(members, prompts(start, stop))
        dataset, column = source
        return HFLabelledRows(dataset, column, labels[start:stop], prompts(start, stop), start, stop)

    return rows_for


def class_captions(classnames: list[str], templates: list[str] | dict[str, list[str]]) -> list[str]:
    """Per class, its prompts one per line (``clipforge eval``'s ``class_prompts``: each template filled with the
    name, or a {class name: [prompts]} dict's own), refusing a prompt that is blank or spans lines: ``txt:lines``
    would drop the one and split the other."""
    captions = []
    for name, prompts in zip(classnames, class_prompts(classnames, templates), strict=True):
        if not prompts:
            raise ValueError(f"class {name!r}: no prompts")
        for prompt in prompts:
            if not prompt.strip() or "\n" in prompt or "\r" in prompt:
                raise ValueError(
                    f"class {name!r}: prompt {prompt!r} is blank or spans lines; each prompt must be one line of "
                    "text, since training picks one line of the caption (data.caption_key: txt:lines)"
                )
        captions.append("\n".join(prompts))
    return captions


def _open(folder: Path, split: str, format: str | None, classnames: Any, templates: Any) -> tuple[Any, list[str], Any]:
    """(the benchmark, its class names, its templates) as ``clipforge eval --dataset`` opens them."""
    names = None if classnames is None else resolve_names(classnames, "classnames")
    chosen = None if templates is None else resolve_names(templates, "templates")
    names_from = classnames if isinstance(classnames, str) else "--classnames"
    benchmark = load_benchmark(folder, None, split, format, CLASSIFICATION, names, chosen, names_from)
    if not benchmark.classnames:
        raise ValueError(
            f"{folder}: no class names (no classnames.txt, class folders or ClassLabel): give them with --classnames "
            "(a file, one per line in label order, or openai_imagenet)"
        )
    if not benchmark.templates:
        raise ValueError(
            f"{folder}: no templates (the set ships no zeroshot_classification_templates.txt): give them with "
            "--templates (openai_imagenet, or a file of templates with {c} where the class name goes)"
        )
    return benchmark, benchmark.classnames, benchmark.templates


def write_from_labelled(
    folder: str | Path,
    out: str | Path,
    split: str = "train",
    format: str | None = None,
    classnames: str | list[str] | None = None,
    templates: str | list[str] | dict[str, list[str]] | None = None,
    samples_per_shard: int | None = None,
    resize_to: int | None = None,
    num_workers: int = 2,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Shards of a classification set's ``split`` with its class prompts as captions (see the module docstring).
    ``classnames`` / ``templates``: what ``clipforge eval`` takes (``openai_imagenet``, a file, a list); None: the
    set's own. Returns the summary also written to ``_stats.json``, with the number of classes and of prompts."""
    options = WriteOptions(
        samples_per_shard=samples_per_shard, resize_to=resize_to, num_workers=num_workers, overwrite=overwrite
    )
    options.check()
    check_output_folder(out)
    root = Path(folder)
    benchmark, names, chosen = _open(root, split, format, classnames, templates)
    captions = class_captions(names, chosen)
    source = benchmark.source
    if isinstance(source, HFSource):
        import datasets

        undecoded = source.dataset.cast_column(source.image_column, datasets.Image(decode=False))  # bytes as stored
        source = (undecoded, source.image_column)
    labels = [int(label) for label in benchmark.source.labels()]
    prompts = json.dumps(captions, ensure_ascii=False).encode()
    extra = {"split": split, "format": benchmark.format, "class_prompts_sha256": hashlib.sha256(prompts).hexdigest()}
    name = f"{root.resolve()} ({split} split)"
    rows_for = _rows_for(source, labels, captions)
    summary = write_shards(out, len(labels), rows_for, options, name, progress, extra_settings=extra)
    counts = sorted({caption.count("\n") + 1 for caption in captions})
    summary.update(classes=len(names), prompts_per_class=counts[0] if len(counts) == 1 else counts)
    return summary
