"""The ``eval`` section of the run config, and the schema of suite files (``eval/*.yaml``).

This module imports no torch and no evaluator (the package imports its evaluators on first use), so that reading
and validating a config or a suite (``clipforge train --help``, ``clipforge submit``) takes a fraction of a second.

A suite file is validated as a run config is (OmegaConf structured configs, ``clipforge.config``): YAML syntax,
unknown keys, wrong types and invalid values stop with one line naming the file, the key
(``datasets[0].recall_k``) and the value. ``read_suite_file`` does it; ``clipforge.evaluation.suite.load_suite``
then resolves paths and class names and checks the data.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

# The evaluation tasks and dataset layouts a suite entry (or `clipforge eval --dataset`) names; here, torch-free,
# so that the CLI's parser can offer them as choices without importing the evaluators.
SEGMENTATION_TASKS = ("zeroshot_segmentation", "segmentation_probe")
DENSE_TASKS = (*SEGMENTATION_TASKS, "referring_expressions")
TASKS = ("zeroshot_classification", "zeroshot_retrieval", "linear_probe", *DENSE_TASKS)
FORMATS = ("wds", "imagefolder", "hf")
# How a dense task's patches reach the text space (clipforge.evaluation.dense.VARIANTS, which imports torch).
DENSE_VARIANTS = ("maskclip", "plain")
# The dense options, the tasks each applies to, and the default a suite entry that leaves it out gets.
DENSE_OPTIONS = {
    "variant": (("zeroshot_segmentation", "referring_expressions"), "maskclip"),
    "ignore_index": (SEGMENTATION_TASKS, 255),
    "reduce_zero_label": (SEGMENTATION_TASKS, False),
    "max_train_patches": (("segmentation_probe",), 100_000),
}


@dataclass
class EvalConfig:
    """Zero-shot evaluation during and after training."""

    suite: str | None = None
    """Suite YAML (eval/*.yaml) run at the end of training and every eval.every_n_steps. None = no evaluation."""
    every_n_steps: int = 0
    """Also evaluate every N optimizer steps (0 = only at the end)."""
    batch_size: int = 256
    """Images per batch when embedding a benchmark."""
    num_workers: int = 2
    """DataLoader workers decoding benchmark images."""

    def __post_init__(self) -> None:
        if self.every_n_steps < 0:
            raise ValueError(f"eval.every_n_steps: must be >= 0, got {self.every_n_steps}")


@dataclass
class SuiteDataset:
    """One dataset of a suite file (an item of ``datasets:``); docs/evaluation.md describes each key."""

    name: str = MISSING
    task: str = MISSING
    path: str = MISSING
    format: str | None = None
    split: str = "test"
    classnames: Any = None  # openai_imagenet, a .txt/.json file, or a list of names
    templates: Any = None  # the same, or a {class name: [prompts]} mapping
    get: str | None = None
    recall_k: list[int] = field(default_factory=lambda: [1, 5, 10])
    train_split: str = "train"
    val_split: str | None = None
    val_proportion: float = 0.2
    seed: int = 0
    image_column: str | None = None
    label_column: str | None = None
    caption_column: str | None = None
    # dense tasks only (DENSE_OPTIONS: which task takes which, and the default where it is left out)
    variant: str | None = None
    ignore_index: int | None = None
    reduce_zero_label: bool | None = None
    max_train_patches: int | None = None

    def __post_init__(self) -> None:
        """Values a type cannot rule out. Messages start with the key; the suite reader puts the file and the entry
        before it (``suite.yaml: datasets[0].task = ...``)."""
        if self.task not in TASKS:
            raise ValueError(f"task = {self.task!r} is not one of {TASKS}")
        if self.format is not None and self.format not in FORMATS:
            raise ValueError(f"format = {self.format!r} is not one of {FORMATS}")
        self._check_dense_options()
        if not 0 < self.val_proportion < 1:
            raise ValueError(f"val_proportion = {self.val_proportion}: must be between 0 and 1")
        if not self.recall_k or any(k < 1 for k in self.recall_k):
            raise ValueError(f"recall_k = {list(self.recall_k)}: expected a list of k >= 1, e.g. [1, 5, 10]")
        if not _is_names(self.classnames):
            raise ValueError(
                f"classnames = {self.classnames!r}: expected openai_imagenet, a .txt/.json file, or a list of names"
            )
        if not (_is_names(self.templates) or _is_prompt_mapping(self.templates)):
            raise ValueError(
                f"templates = {self.templates!r}: expected openai_imagenet, a .txt/.json file, a list of templates, "
                "or a {class name: [prompts]} mapping"
            )

    def option(self, key: str) -> Any:
        """A dense option's value: the entry's, else its default (``DENSE_OPTIONS``)."""
        value = getattr(self, key)
        return DENSE_OPTIONS[key][1] if value is None else value

    def _check_dense_options(self) -> None:
        for key, (tasks, _) in DENSE_OPTIONS.items():
            if getattr(self, key) is not None and self.task not in tasks:
                raise ValueError(
                    f"{key} = {getattr(self, key)!r}: only for {', '.join(tasks)} (this entry's task is {self.task})"
                )
        if self.variant is not None and self.variant not in DENSE_VARIANTS:
            raise ValueError(f"variant = {self.variant!r} is not one of {DENSE_VARIANTS}")
        if self.ignore_index is not None and not 0 <= self.ignore_index <= 255:
            raise ValueError(f"ignore_index = {self.ignore_index}: masks are 8-bit, so 0 to 255")
        if self.max_train_patches is not None and self.max_train_patches < 1:
            raise ValueError(f"max_train_patches = {self.max_train_patches}: must be at least 1")
        if self.task not in DENSE_TASKS:
            return
        unused = {
            "format": "a dense task reads its own layout (docs/evaluation.md)",
            "val_split": "the probe holds out val_proportion of the train images",
            "image_column": "HF datasets only",
            "label_column": "HF datasets only",
            "caption_column": "HF datasets only",
        }
        if self.task == "referring_expressions":
            unused["classnames"] = unused["templates"] = "each expression is its own text"
        for key, why in unused.items():
            if getattr(self, key) is not None:
                raise ValueError(f"{key} = {getattr(self, key)!r}: not for {self.task} ({why})")


@dataclass
class SuiteFile:
    """The top level of a suite file."""

    name: str | None = None
    data_root: str | None = None
    datasets: list[Any] = field(default_factory=list)  # each checked against SuiteDataset, so errors name its index


def _is_names(value: Any) -> bool:
    """None, one name or path, or a list of strings."""
    return (
        value is None
        or isinstance(value, str)
        or (isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value))
    )


def _is_prompt_mapping(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(key, str) and isinstance(prompts, list) and _is_names(prompts) for key, prompts in value.items()
    )


def _fields(schema: type) -> list[str]:
    return [item.name for item in dataclasses.fields(schema)]


def _validated(schema: type, given: DictConfig, source: str, prefix: str = ""):
    """``given`` merged into ``schema``'s structured config, as a ``schema`` instance; every error is a ValueError
    naming ``source``, the dotted key (``prefix`` + the field) and the value."""
    known = _fields(schema)
    lists = [item.name for item in dataclasses.fields(schema) if str(item.type).startswith("list")]
    for key, value in given.items_ex(resolve=False):
        if key not in known:
            raise ValueError(f"{source}: key {prefix + str(key)!r}: unknown (known: {', '.join(known)})")
        if key in lists and value is not None and not isinstance(value, ListConfig):
            # OmegaConf's own message names a node type ("AnyNode is not a ListConfig"), not the value
            raise ValueError(f"{source}: key {prefix + str(key)!r}: expected a list, got {value!r}")
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), given))
    except MissingMandatoryValue as exc:
        raise ValueError(f"{source}: key {prefix + str(exc.full_key)!r}: required, missing") from None
    except ConfigKeyError as exc:
        raise ValueError(f"{source}: key {prefix + str(exc.full_key)!r}: unknown") from None
    except OmegaConfBaseException as exc:
        if isinstance(exc.__cause__, ValueError):  # __post_init__'s message names the key
            raise ValueError(f"{source}: {prefix}{exc.__cause__}") from None
        message = str(exc).splitlines()[0]
        key = getattr(exc, "full_key", None)
        raise ValueError(f"{source}: key {prefix + str(key)!r}: {message}" if key else f"{source}: {message}") from None
    except ValueError as exc:
        raise ValueError(f"{source}: {prefix}{exc}") from None


def read_suite_file(path: str | Path) -> tuple[SuiteFile, list[SuiteDataset]]:
    """A suite file's top level and its datasets, validated (see the module docstring); ``FileNotFoundError`` when
    it is missing, else ``ValueError`` naming the file, key and value."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"eval suite {path} does not exist")
    try:
        raw = OmegaConf.load(path)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
        raise ValueError(f"{path}: not valid YAML{where}: {problem}") from None
    if not isinstance(raw, DictConfig):
        got = "a list" if isinstance(raw, ListConfig) else repr(raw)
        raise ValueError(f"{path}: the top level must be a mapping with {', '.join(_fields(SuiteFile))}; got {got}")
    datasets = raw.get("datasets")
    if datasets is not None and not isinstance(datasets, ListConfig):
        raise ValueError(f"{path}: key 'datasets': expected a list ('- name: ...' per dataset), got {datasets!r}")
    suite = _validated(SuiteFile, raw, str(path))
    entries = []
    for index, item in enumerate(datasets or []):
        where = f"datasets[{index}]."
        if not isinstance(item, DictConfig):
            raise ValueError(f"{path}: key 'datasets[{index}]': expected a mapping with name, task, path; got {item!r}")
        entries.append(_validated(SuiteDataset, item, str(path), where))
    return suite, entries
