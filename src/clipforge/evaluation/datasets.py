"""Benchmark datasets from local files: CLIP_benchmark WebDataset directories, image folders, HF datasets.

Formats (``format:`` in a suite entry; detected from the files when left out):

``wds`` — CLIP_benchmark's layout (as ``clip_benchmark.datasets.builder.build_wds_dataset`` reads it)::

    DIR/test/nshards.txt, DIR/test/0.tar ...      samples: KEY.{webp,png,jpg,jpeg} + KEY.cls | KEY.txt
    DIR/classnames.txt                            one class name per line (classification)
    DIR/zeroshot_classification_templates.txt     one template per line, with {c} (or {}); blank lines skipped
    DIR/dataset_type.txt                          "retrieval" for image–caption sets (one caption per line)

``imagefolder`` — torchvision's ``ImageFolder``: ``DIR/SPLIT/CLASS/*.jpg`` (or ``DIR/CLASS/*.jpg`` for the
test split), the same files in the same order, except that a symbolic link to a folder inside a class folder
(or a class folder linking to the split folder or above it) is not followed but counted (``skipped_links``): a
link such as ``circle/loop -> ..`` would otherwise put every class's images under ``circle``, many times over.
Class names are the folder names with ``_`` read as a space, unless ``DIR/classnames.txt`` lists them (in sorted
folder order); templates come from ``DIR/zeroshot_classification_templates.txt``.

``hf`` — a Hugging Face ``datasets`` directory written by ``save_to_disk`` (a ``Dataset``, or a
``DatasetDict`` whose split is chosen): an image column plus a label column (``ClassLabel`` names are the
class names) or a caption column (a string or a list of strings per image).

Every format becomes a map-style source with ``image(index)`` (PIL), ``target(index)`` (class
index or list of captions) and ``key(index)`` (the sample's id: its webdataset key, its path under the
split's folder, or its row number in an HF dataset), so loading runs in ``DataLoader`` workers, in index
order, and results never depend on the worker count. WebDataset tars are indexed once (member headers only)
and read by offset, so a 6 GB ImageNet split is never held in memory.

Class names must fit the labels (``check_class_names``): one per class, unique, none blank (blank lines of a
names file are skipped); as many as the dataset's own count of classes where it has one (its ``classnames.txt``,
its class folders, its ``ClassLabel``), and more than its largest label. Anything else is a ``ValueError`` naming
both counts or the duplicate, raised when a benchmark is opened (and, cheaply, by the suite's ``check_data``
before any model is built), never a silent score over the wrong classes.

An image that does not decode (a zero-byte or corrupt file) is skipped, not scored, and counted: the loader's
batches carry the skipped samples (``Batch.skipped``), ``embed_images`` logs a warning naming the first few, and the
suite reports ``num_unreadable`` beside ``num_images`` (the metrics' denominator is the images that were read).
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from clipforge.data.samples import split_member_name
from clipforge.evaluation.config import FORMATS
from clipforge.evaluation.zeroshot import check_templates

log = logging.getLogger(__name__)

# data.images.IMAGE_EXTENSIONS, in the order CLIP_benchmark's to_tuple tries them when a sample has several
# (tests/test_evaluation_formats.py checks that the two name the same extensions)
CLIP_BENCHMARK_IMAGE_ORDER = ("webp", "png", "jpg", "jpeg")
CLASSIFICATION, RETRIEVAL = "classification", "retrieval"
HF_CAPTION_COLUMNS = ("captions", "caption", "sentences", "text", "texts")
HF_LABEL_COLUMNS = ("label", "labels", "fine_label", "class", "target")

Target = int | list[str]
# What a file that is not a decodable image raises in PIL (UnidentifiedImageError and truncated files are OSErrors,
# some plugins raise SyntaxError or ValueError for broken headers) or in its size check.
UNREADABLE_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
UNREADABLE_LISTED = 5  # unreadable files named in a warning and in the results


def read_lines(path: Path) -> list[str]:
    """One entry per line, stripped; blank lines (trailing ones too) are skipped."""
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_templates(path: Path) -> list[str]:
    """One template per line, stripped; blank lines are skipped (an empty prompt is never meant). Every template
    must hold a placeholder (``check_templates``)."""
    templates = read_lines(path)
    check_templates(templates, str(path))
    return templates


def read_classnames(path: Path) -> list[str]:
    """One class name per line, in label order, stripped; blank lines are skipped; checked (``check_class_names``)."""
    return check_class_names(read_lines(path), str(path))


def check_class_names(names: list[str], where: str) -> list[str]:
    """``names``, unless one is blank or listed twice (two classes would share a prompt and one entry of
    ``per_class_accuracy`` would overwrite the other): a ValueError naming ``where`` and the name."""
    blank = [index for index, name in enumerate(names) if not name.strip()]
    if blank:
        raise ValueError(f"{where}: class name number {blank[0] + 1} (of {len(names)}) is blank")
    repeated = [(name, count) for name, count in Counter(names).items() if count > 1]
    if repeated:
        name, count = repeated[0]
        more = f" (and {len(repeated) - 1} more repeated names)" if len(repeated) > 1 else ""
        raise ValueError(
            f"{where}: class name {name!r} is listed {count} times{more}; each class needs its own name, in label order"
        )
    return names


def check_class_count(names: list[str], names_from: str, num_classes: int, classes_from: str) -> None:
    """One name per class: a ValueError naming both counts and where each comes from."""
    if len(names) != num_classes:
        raise ValueError(
            f"{len(names)} class names ({names_from}) for {num_classes} classes ({classes_from}): give one name per "
            "class, in label order"
        )


def check_labels_fit(labels: list[int], names: list[str], names_from: str, where: str) -> None:
    """Every label indexes a name: a ValueError naming the largest label and the number of names."""
    if not labels:
        return
    low, high = min(labels), max(labels)
    if low < 0 or high >= len(names):
        bad = low if low < 0 else high
        raise ValueError(
            f"{where}: label {bad} has no class name: {len(names)} class names ({names_from}) cover labels 0 to "
            f"{len(names) - 1}"
        )


class WdsSource:
    """Random access to the samples of CLIP_benchmark WebDataset shards.

    Samples are grouped as webdataset groups them: consecutive members sharing the name up to the
    first dot of the basename; the extension is lower-cased.
    """

    def __init__(self, root: Path, split: str) -> None:
        nshards_file = root / split / "nshards.txt"
        if not nshards_file.is_file():
            raise FileNotFoundError(
                f"{root}: no split {split!r} in CLIP_benchmark WebDataset layout ({nshards_file} is missing)"
            )
        self.kind = wds_kind(root)
        self.shards = [str(root / split / f"{index}.tar") for index in range(int(nshards_file.read_text().strip()))]
        self.samples: list[tuple[int, dict[str, tuple[int, int]]]] = []  # (shard, {extension: (offset, size)})
        self.keys: list[str] = []
        for shard, url in enumerate(self.shards):
            for key, members in _index_tar(url):
                self.samples.append((shard, members))
                self.keys.append(key)
        self._files: dict[int, Any] = {}
        self._pid = -1

    def __len__(self) -> int:
        return len(self.samples)

    def _read(self, index: int, extension: str) -> bytes:
        if self._pid != os.getpid():  # a DataLoader worker: open its own file handles
            self._files, self._pid = {}, os.getpid()
        shard, members = self.samples[index]
        if shard not in self._files:
            self._files[shard] = open(self.shards[shard], "rb")  # kept open for the run
        offset, size = members[extension]
        stream = self._files[shard]
        stream.seek(offset)
        return stream.read(size)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_files": {}, "_pid": -1}

    def image(self, index: int) -> Image.Image:
        members = self.samples[index][1]
        extension = next((ext for ext in CLIP_BENCHMARK_IMAGE_ORDER if ext in members), None)
        if extension is None:
            shard = self.shards[self.samples[index][0]]
            raise ValueError(f"{shard}: sample {index} has no image ({', '.join(CLIP_BENCHMARK_IMAGE_ORDER)})")
        return Image.open(io.BytesIO(self._read(index, extension))).convert("RGB")

    def key(self, index: int) -> str:
        return self.keys[index]

    def location(self, index: int) -> str:
        """The shard and member name of the sample's image, for messages."""
        shard, members = self.samples[index]
        extension = next((ext for ext in CLIP_BENCHMARK_IMAGE_ORDER if ext in members), "?")
        return f"{self.shards[shard]}:{self.keys[index]}.{extension}"

    def target(self, index: int) -> Target:
        extension = "txt" if self.kind == RETRIEVAL else "cls"
        if extension not in self.samples[index][1]:
            raise ValueError(f"{self.shards[self.samples[index][0]]}: sample {index} has no .{extension}")
        text = self._read(index, extension).decode("utf-8")
        if self.kind == RETRIEVAL:
            return text.splitlines()
        try:
            return int(text.strip())
        except ValueError:
            raise ValueError(
                f"{self.shards[self.samples[index][0]]}: {self.keys[index]}.cls holds {text.strip()[:40]!r}, "
                "not a class index"
            ) from None

    def labels(self) -> list[int]:
        """Every sample's class index (classification sets), in index order: the .cls members, read by offset."""
        return [self.target(index) for index in range(len(self))]


def wds_kind(root: Path) -> str:
    """What a CLIP_benchmark directory holds: ``dataset_type.txt`` says, else classification."""
    type_file = root / "dataset_type.txt"
    kind = type_file.read_text().strip().lower() if type_file.is_file() else CLASSIFICATION
    if kind not in (CLASSIFICATION, RETRIEVAL):
        raise ValueError(
            f"{root}: dataset_type.txt says {kind!r}; only classification and retrieval sets are supported"
        )
    return kind


def _index_tar(path: str) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """Per sample, its webdataset key and {extension: (data offset, size)}: tar headers are read, file data is
    skipped."""
    samples: list[tuple[str, dict[str, tuple[int, int]]]] = []
    current_key = None
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            key, extension = split_member_name(member.name)  # the training reader's rule, webdataset's __key__
            if not member.isfile() or key is None or key.startswith("__"):  # and its metadata members
                continue
            if key != current_key:
                samples.append((key, {}))
                current_key = key
            samples[-1][1][extension.lower()] = (member.offset_data, member.size)
    return samples


class ImageFolderSource:
    """torchvision ``ImageFolder``: one sub-folder per class, classes in sorted order (see the module docstring for
    symbolic links)."""

    kind = CLASSIFICATION

    def __init__(self, root: Path) -> None:
        self.root = root
        self.classes, self.samples, self.skipped_links = scan_image_folder(root)

    def __len__(self) -> int:
        return len(self.samples)

    def key(self, index: int) -> str:
        return Path(self.samples[index][0]).relative_to(self.root).as_posix()

    def location(self, index: int) -> str:
        return self.samples[index][0]

    def image(self, index: int) -> Image.Image:
        with open(self.samples[index][0], "rb") as stream:
            return Image.open(stream).convert("RGB")

    def target(self, index: int) -> Target:
        return self.samples[index][1]

    def labels(self) -> list[int]:
        return [label for _, label in self.samples]


def _class_folders(root: Path) -> tuple[list[str], list[str]]:
    """The class folders of an image-folder split, sorted (torchvision's ``find_classes``), and the folders left
    out: links to the split folder or above it, which would hold every class."""
    real_root = root.resolve()
    classes, skipped = [], []
    for name in sorted(entry.name for entry in os.scandir(root) if entry.is_dir()):
        real = (root / name).resolve()
        (skipped if real == real_root or real in real_root.parents else classes).append(name)
    if not classes:
        raise FileNotFoundError(f"{root}: no class folders (expected {root}/CLASS/*.jpg)")
    return classes, skipped


def scan_image_folder(root: Path) -> tuple[list[str], list[tuple[str, int]], list[str]]:
    """(classes, [(path, class index)], skipped links) of an image-folder split: torchvision's ``make_dataset``
    (its image extensions, files sorted within sorted folders), except that links to folders are not followed
    inside a class folder, and a class folder that links to the split folder or above it is no class; each such
    link is returned (relative to ``root``) and logged."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    classes, skipped = _class_folders(root)
    samples, empty = [], []
    for label, name in enumerate(classes):
        found = len(samples)
        for folder, subfolders, files in sorted(os.walk(root / name)):  # links to folders: listed, not entered
            skipped += [
                Path(folder, sub).relative_to(root).as_posix() for sub in subfolders if Path(folder, sub).is_symlink()
            ]
            samples += [
                (os.path.join(folder, file), label) for file in sorted(files) if file.lower().endswith(IMG_EXTENSIONS)
            ]
        if len(samples) == found:
            empty.append(name)
    if empty:
        raise FileNotFoundError(
            f"{root}: no images ({', '.join(IMG_EXTENSIONS)}) in the class folder(s) {', '.join(empty[:5])}"
            + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        )
    if skipped:
        log.warning(
            "%s: %d symbolic link(s) to folders not followed (a link out of a class folder can loop or mix "
            "classes): %s",
            root,
            len(skipped),
            ", ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else ""),
        )
    return classes, samples, skipped


def _hf_split(root: Path, split: str):
    """The ``datasets.Dataset`` saved at ``root``, or its ``split`` when it is a ``DatasetDict``."""
    import datasets

    loaded = datasets.load_from_disk(str(root))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(f"{root}: no split {split!r} in this DatasetDict (it has {sorted(loaded)})")
        loaded = loaded[split]
    return loaded


def _hf_target_column(features, kind: str, label_column: str | None, caption_column: str | None) -> str | None:
    """The column named, else the guessed one: a ``ClassLabel`` or a usual label name, or a usual caption name."""
    import datasets

    if kind == CLASSIFICATION:
        return label_column or next(
            (name for name, feature in features.items() if isinstance(feature, datasets.ClassLabel)),
            next((name for name in HF_LABEL_COLUMNS if name in features), None),
        )
    return caption_column or next((name for name in HF_CAPTION_COLUMNS if name in features), None)


class HFSource:
    """A ``datasets.Dataset`` on disk: an image column and a label or caption column."""

    def __init__(
        self,
        root: Path,
        split: str,
        kind: str,
        image_column: str | None = None,
        label_column: str | None = None,
        caption_column: str | None = None,
    ) -> None:
        import datasets

        loaded = _hf_split(root, split)
        features = loaded.features
        image_column = image_column or next(
            (name for name, feature in features.items() if isinstance(feature, datasets.Image)), None
        )
        if image_column is None or image_column not in features:
            raise ValueError(f"{root}: no image column (columns: {sorted(features)}); set image_column")
        if not isinstance(features[image_column], datasets.Image):
            loaded = loaded.cast_column(image_column, datasets.Image())  # paths or bytes
        self.kind, self.classes, self.root = kind, None, root
        target_column = _hf_target_column(features, kind, label_column, caption_column)
        if target_column is None or target_column not in features:
            what = "label" if kind == CLASSIFICATION else "caption"
            raise ValueError(f"{root}: no {what} column (columns: {sorted(features)}); set {what}_column")
        if kind == CLASSIFICATION and isinstance(features[target_column], datasets.ClassLabel):
            self.classes = list(features[target_column].names)
        self.dataset = loaded.select_columns([image_column, target_column])
        self.image_column, self.target_column = image_column, target_column

    def __len__(self) -> int:
        return len(self.dataset)

    def image(self, index: int) -> Image.Image:
        return self.dataset[index][self.image_column].convert("RGB")

    def key(self, index: int) -> str:
        return str(index)

    def location(self, index: int) -> str:
        return f"{self.root} row {index}"

    def target(self, index: int) -> Target:
        value = self.dataset[index][self.target_column]
        if self.kind == CLASSIFICATION:
            return int(value)
        return [value] if isinstance(value, str) else list(value)

    def labels(self) -> list[int]:
        return [int(value) for value in self.dataset[self.target_column]]  # one column read, images not decoded


Source = WdsSource | ImageFolderSource | HFSource


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
        """Every sample's id, in index order (see the module docstring)."""
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


def detect_format(root: Path, split: str = "test") -> str:
    if (root / split / "nshards.txt").is_file() or (root / "dataset_type.txt").is_file():
        return "wds"
    if any((root / name).is_file() for name in ("dataset_dict.json", "state.json", "dataset_info.json")):
        return "hf"
    if root.is_dir() and any(child.is_dir() for child in root.iterdir()):
        return "imagefolder"
    raise ValueError(
        f"{root}: cannot tell the format (no {split}/nshards.txt for wds, no dataset_dict.json or "
        "state.json for a saved HF dataset, no class folders for an image folder); set format:"
    )


def dataset_kind(
    path: str | Path,
    split: str = "test",
    format: str | None = None,
    label_column: str | None = None,
    caption_column: str | None = None,
) -> str:
    """ "classification" or "retrieval": what a dataset holds. A CLIP_benchmark directory says so in
    ``dataset_type.txt`` (classification without it), an image folder classifies, an HF dataset classifies
    when it has a label column and retrieves when it has only a caption column."""
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"{root} does not exist")
    format = format or detect_format(root, split)
    if format == "wds":
        return wds_kind(root)
    if format == "imagefolder":
        return CLASSIFICATION
    features = _hf_split(root, split).features
    for kind in (CLASSIFICATION, RETRIEVAL):
        if _hf_target_column(features, kind, label_column, caption_column) in features:
            return kind
    raise ValueError(f"{root}: neither a label column nor a caption column (columns: {sorted(features)})")


def _imagefolder_root(root: Path, split: str) -> Path:
    if (root / split).is_dir():
        return root / split
    if split != "test" or any((root / name).is_dir() for name in ("train", "val", "validation")):
        raise FileNotFoundError(f"{root}: image folder without a {split!r} sub-folder")
    return root  # DIR/CLASS/*.jpg is the test split


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
    must fit the labels (see the module docstring; ``classnames_from`` says where they came from in errors).

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
        source = ImageFolderSource(_imagefolder_root(root, split))
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


@dataclass
class DatasetClasses:
    """A classification set's own class names and count of classes, as its files give them (either may be None)."""

    names: list[str] | None
    names_from: str
    count: int | None
    count_from: str

    def check(self, names: list[str], names_from: str) -> None:
        """``names`` (from ``names_from``) name every class: unique, none blank, as many as the dataset has where
        it says."""
        check_class_names(names, names_from)
        if self.count is not None:
            check_class_count(names, names_from, self.count, self.count_from)


def dataset_classes(
    path: str | Path, split: str = "test", format: str | None = None, label_column: str | None = None
) -> DatasetClasses:
    """The class names a classification set brings (``classnames.txt``, else its folder names with ``_`` read as a
    space, else its ``ClassLabel`` names; checked only where used, by ``DatasetClasses.check``), and how many
    classes it has where its files say (its class folders, its ``ClassLabel``, its ``classnames.txt``): cheap, no
    image or label is read."""
    root = Path(path)
    format = format or detect_format(root, split)
    names = names_from = count = None
    count_from = ""
    if (root / "classnames.txt").is_file():
        names, names_from = read_lines(root / "classnames.txt"), str(root / "classnames.txt")
        count, count_from = len(names), names_from
    if format == "imagefolder":
        folder = _imagefolder_root(root, split)
        folders, _ = _class_folders(folder)
        count, count_from = len(folders), f"the class folders of {folder}"
        if names is None:
            names_from = f"the class folder names of {folder}, '_' read as a space"
            names = [name.replace("_", " ") for name in folders]
    elif format == "hf":
        import datasets

        features = _hf_split(root, split).features
        column = _hf_target_column(features, CLASSIFICATION, label_column, None)
        if isinstance(features.get(column), datasets.ClassLabel):
            count, count_from = features[column].num_classes, f"the ClassLabel of column {column!r} in {root}"
            if names is None:
                names, names_from = list(features[column].names), count_from
    return DatasetClasses(names, names_from or "", count, count_from)


def dataset_templates(root: Path) -> list[str] | None:
    """The templates a dataset ships (``zeroshot_classification_templates.txt``), checked, or None."""
    path = root / "zeroshot_classification_templates.txt"
    return read_templates(path) if path.is_file() else None


def resolve_names(
    value: str | list | dict, what: str, base: Path | None = None, where: str | None = None
) -> list[str] | dict[str, list[str]]:
    """Class names (``what="classnames"``) or templates named in a suite or on the command line: ``openai_imagenet``
    (OpenAI's ImageNet names or 80 templates, from ``open_clip.zero_shot_metadata``), a file (.json: a list, or
    for templates a {class name: [prompts]} dict as CuPL's; any other name: one per line), or an inline list.
    Templates are checked (``check_templates``); errors name the file, or ``where`` for an inline list."""
    if value == "openai_imagenet":
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

        if what == "classnames":
            return list(IMAGENET_CLASSNAMES)
        return [template("{c}") for template in OPENAI_IMAGENET_TEMPLATES]
    if isinstance(value, (list, dict)):
        names, where = value, where or what
    else:
        path = Path(value)
        if base is not None and not path.is_absolute() and not path.exists():
            path = base / path
        if not path.is_file():
            raise FileNotFoundError(f"{what}: {value!r} is neither openai_imagenet nor an existing file")
        if path.suffix != ".json":
            return read_templates(path) if what == "templates" else read_classnames(path)
        try:
            names = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
        where = str(path)
    if what == "templates":
        if not isinstance(names, (list, dict)):
            raise ValueError(f"{where}: expected a list of templates (or a dict of per-class prompts)")
        check_templates(names, where)
    elif not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise ValueError(f"{where}: expected a list of class names")
    else:
        check_class_names(names, where)
    return names


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
