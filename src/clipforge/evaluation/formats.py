"""The benchmark formats on disk, each read as a map-style source of images and targets.

Formats (``format:`` in a suite entry; detected from the files when left out, ``detect_format``):

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

A set is a classification or a retrieval set (``dataset_kind``): a CLIP_benchmark directory says so in
``dataset_type.txt``, an image folder classifies, an HF dataset has a label column or a caption column.
Opening a split as a ``Benchmark`` with its class names and templates: ``clipforge.evaluation.datasets``.
"""

from __future__ import annotations

import io
import logging
import os
import tarfile
from pathlib import Path
from typing import Any

from PIL import Image

from clipforge.data.samples import split_member_name

log = logging.getLogger(__name__)

# data.images.IMAGE_EXTENSIONS, in the order CLIP_benchmark's to_tuple tries them when a sample has several
# (tests/test_evaluation_formats.py checks that the two name the same extensions)
CLIP_BENCHMARK_IMAGE_ORDER = ("webp", "png", "jpg", "jpeg")
CLASSIFICATION, RETRIEVAL = "classification", "retrieval"
HF_CAPTION_COLUMNS = ("captions", "caption", "sentences", "text", "texts")
HF_LABEL_COLUMNS = ("label", "labels", "fine_label", "class", "target")

Target = int | list[str]


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


def class_folders(root: Path) -> tuple[list[str], list[str]]:
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

    classes, skipped = class_folders(root)
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


def imagefolder_split(root: Path, split: str) -> Path:
    """The folder of an image folder's ``split``: ``DIR/SPLIT``, or ``DIR`` for the test split when it has no split
    folders."""
    if (root / split).is_dir():
        return root / split
    if split != "test" or any((root / name).is_dir() for name in ("train", "val", "validation")):
        raise FileNotFoundError(f"{root}: image folder without a {split!r} sub-folder")
    return root  # DIR/CLASS/*.jpg is the test split


def hf_split(root: Path, split: str):
    """The ``datasets.Dataset`` saved at ``root``, or its ``split`` when it is a ``DatasetDict``."""
    import datasets

    loaded = datasets.load_from_disk(str(root))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(f"{root}: no split {split!r} in this DatasetDict (it has {sorted(loaded)})")
        loaded = loaded[split]
    return loaded


def hf_target_column(features, kind: str, label_column: str | None, caption_column: str | None) -> str | None:
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

        loaded = hf_split(root, split)
        features = loaded.features
        image_column = image_column or next(
            (name for name, feature in features.items() if isinstance(feature, datasets.Image)), None
        )
        if image_column is None or image_column not in features:
            raise ValueError(f"{root}: no image column (columns: {sorted(features)}); set image_column")
        if not isinstance(features[image_column], datasets.Image):
            loaded = loaded.cast_column(image_column, datasets.Image())  # paths or bytes
        self.kind, self.classes, self.root = kind, None, root
        target_column = hf_target_column(features, kind, label_column, caption_column)
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
    features = hf_split(root, split).features
    for kind in (CLASSIFICATION, RETRIEVAL):
        if hf_target_column(features, kind, label_column, caption_column) in features:
            return kind
    raise ValueError(f"{root}: neither a label column nor a caption column (columns: {sorted(features)})")
