"""Class names and zero-shot templates of a benchmark: read, resolved and checked against its labels.

They come from the dataset's own files (``classnames.txt``, its class folders, its ``ClassLabel``;
``zeroshot_classification_templates.txt``: ``dataset_classes``, ``dataset_templates``) or are named in a suite or
on the command line (``openai_imagenet``, a file, an inline list: ``resolve_names``).

Class names must fit the labels (``check_class_names``): one per class, unique, none blank (blank lines of a
names file are skipped); as many as the dataset's own count of classes where it has one (its ``classnames.txt``,
its class folders, its ``ClassLabel``), and more than its largest label. Anything else is a ``ValueError`` naming
both counts or the duplicate, raised when a benchmark is opened (and, cheaply, by the suite's ``check_data``
before any model is built), never a silent score over the wrong classes.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from clipforge.evaluation.formats import (
    CLASSIFICATION,
    class_folders,
    detect_format,
    hf_split,
    hf_target_column,
    imagefolder_split,
)
from clipforge.evaluation.zeroshot import check_templates


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
        folder = imagefolder_split(root, split)
        folders, _ = class_folders(folder)
        count, count_from = len(folders), f"the class folders of {folder}"
        if names is None:
            names_from = f"the class folder names of {folder}, '_' read as a space"
            names = [name.replace("_", " ") for name in folders]
    elif format == "hf":
        import datasets

        features = hf_split(root, split).features
        column = hf_target_column(features, CLASSIFICATION, label_column, None)
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
