"""Benchmark suites (``eval/*.yaml``): which datasets to run, with which task; ``run_suite`` runs them.

A suite file::

    name: imagenet1k
    data_root: data/benchmarks        # what {data_root} means; --data-root or CLIPFORGE_DATA_ROOT override it
    datasets:
      - name: imagenet1k
        task: zeroshot_classification # or zeroshot_retrieval, linear_probe; zeroshot_segmentation,
                                      # segmentation_probe, referring_expressions (dense: docs/evaluation.md)
        path: "{data_root}/wds_imagenet1k"   # relative paths start at the working directory
        format: wds                   # wds | imagefolder | hf; detected from the files when left out
        split: test                   # the split scored (test)
        classnames: openai_imagenet   # override the dataset's: openai_imagenet, a .txt/.json file, or a list
        templates: openai_imagenet    # same; each template holds {c} (or {}) where the class name goes
        get: hf download clip-benchmark/wds_imagenet1k --repo-type dataset --local-dir {path}

Optional per dataset: ``recall_k`` (retrieval, [1, 5, 10]); ``train_split`` (train), ``val_split``
(none: a ``val_proportion`` of 0.2 of train is held out) and ``seed`` (0) for linear probes;
``image_column``, ``label_column``, ``caption_column`` for HF datasets. ``get`` is the command that
fetches missing data; the error for a missing dataset prints it. The dense tasks read their own layouts
(``clipforge.evaluation.dense_datasets``) and take ``variant`` (maskclip), ``ignore_index`` (255),
``reduce_zero_label`` (false), ``max_train_patches`` (100000), and ``train_split``, ``val_proportion``, ``seed`` for
the segmentation probe (``clipforge.evaluation.config.DENSE_OPTIONS`` says which task takes which); they run in
``clipforge.evaluation.dense_suite``.

``single_dataset_suite`` makes the suite of ``clipforge eval CKPT --dataset PATH``: one entry, or for a
segmentation set with a train split two (zero-shot, and the probe as ``NAME-probe``).

``run_suite`` returns ``{dataset name: metrics}``; given a ``predictions`` dict it also fills it with each
dataset's per-image predictions (``clipforge.evaluation.predictions``), and given an ``examples`` dict, each
segmentation set's first test images with true and predicted masks (``dense_suite.SegmentationExamples``, for
``clipforge.evaluation.report.segmentation_plots``). Image embeddings are computed once
per dataset split and text classifiers once per (class names, templates) in a run, so a zero-shot and a
linear-probe entry on the same split embed its images once.

Entry points: ``clipforge eval runs/demo/checkpoints/latest --suite eval/synthetic.yaml``, or for one dataset
``clipforge eval runs/demo/checkpoints/latest --dataset data/synth/eval/shapes --predictions shapes.csv``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipforge.evaluation import dense_suite
from clipforge.evaluation.config import DENSE_OPTIONS, DENSE_TASKS, FORMATS, TASKS, SuiteDataset, read_suite_file
from clipforge.evaluation.datasets import (
    CLASSIFICATION,
    RETRIEVAL,
    Benchmark,
    benchmark_loader,
    dataset_classes,
    dataset_kind,
    dataset_templates,
    load_benchmark,
    resolve_names,
)
from clipforge.evaluation.dense import check_dense
from clipforge.evaluation.dense_datasets import SEGMENTATION, dense_kind
from clipforge.evaluation.diagnostics import project_embeddings, similarity_diagnostics
from clipforge.evaluation.encoder import Encoder, Tokenizer
from clipforge.evaluation.health import embedding_health
from clipforge.evaluation.linear_probe import fit_linear_probe
from clipforge.evaluation.predictions import classification_rows, retrieval_rows
from clipforge.evaluation.report import headline, markdown_table  # noqa: F401 — part of this module's interface
from clipforge.evaluation.retrieval import embed_captions, retrieval_examples, retrieval_metrics
from clipforge.evaluation.zeroshot import (
    build_classifier,
    classification_metrics,
    classify,
    embed_images,
    zero_shot_logits,
)

DATA_ROOT_ENV = "CLIPFORGE_DATA_ROOT"
DEFAULT_DATA_ROOT = "data/benchmarks"


@dataclass
class SuiteEntry(SuiteDataset):
    """A suite's dataset ready to run: its path with ``{data_root}`` replaced, its class names and templates
    resolved to lists (``resolve_names``)."""

    data_root: str | None = None  # what {data_root} in the path stood for, if it was used
    classnames_from: str | None = None  # where the class names came from (a file, a suite key, openai_imagenet)

    @property
    def kind(self) -> str:
        return RETRIEVAL if self.task == "zeroshot_retrieval" else CLASSIFICATION

    def columns(self) -> dict[str, str]:
        """The HF dataset columns the suite names (other formats ignore them)."""
        named = {
            "image_column": self.image_column,
            "label_column": self.label_column,
            "caption_column": self.caption_column,
        }
        return {key: value for key, value in named.items() if value is not None}


@dataclass
class Suite:
    name: str
    datasets: list[SuiteEntry] = field(default_factory=list)
    path: str | None = None


def resolve_data_root(suite_default: str | None, data_root: str | None = None) -> str:
    """--data-root, else $CLIPFORGE_DATA_ROOT, else the suite's data_root, else data/benchmarks."""
    return data_root or os.environ.get(DATA_ROOT_ENV) or suite_default or DEFAULT_DATA_ROOT


def _entry(path: Path, index: int, item: SuiteDataset, data_root: str) -> SuiteEntry:
    where = f"{path}: datasets[{index}]"
    values = dataclasses.asdict(item)
    values["path"] = item.path.replace("{data_root}", data_root)
    values["data_root"] = data_root if "{data_root}" in item.path else None
    base = path.parent
    for key in ("classnames", "templates"):
        if values[key] is not None:
            values[key] = resolve_names(values[key], key, base, where=f"{where}.{key}")
    if item.classnames is not None:
        values["classnames_from"] = item.classnames if isinstance(item.classnames, str) else f"{where}.classnames"
    return SuiteEntry(**values)


def load_suite(path: str | Path, data_root: str | None = None, check: bool = True) -> Suite:
    """Read and validate a suite (``clipforge.evaluation.config.read_suite_file``: YAML, keys, types, values); with
    ``check``, also that every dataset's files are there and its class names fit it (see ``check_data``), so a run
    fails before any model is built or trained."""
    path = Path(path)
    top, items = read_suite_file(path)
    root = resolve_data_root(top.data_root, data_root)
    entries = [_entry(path, index, item, root) for index, item in enumerate(items)]
    if not entries:
        raise ValueError(f"{path}: the suite lists no datasets")
    names = [entry.name for entry in entries]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: dataset names must be unique, got {names}")
    suite = Suite(top.name or path.stem, entries, str(path))
    if check:
        check_data(suite)
    return suite


LAYOUTS = {
    "wds": "CLIP_benchmark WebDataset layout: {path}/{split}/nshards.txt, {path}/{split}/0.tar ...",
    "imagefolder": "image folder layout: {path}/{split}/CLASS/*.jpg",
    "hf": "a Hugging Face dataset written by save_to_disk",
}


def check_data(suite: Suite) -> None:
    """Before any work: every dataset's directory exists, or one error says where each goes and how to get it;
    a zero-shot classification set has templates (its own or the suite's), each with a placeholder; a dense set's
    files are paired and named as its layout says (``dense_suite.check_entry``)."""
    problems = []
    for entry in suite.datasets:
        dense = entry.task in DENSE_TASKS
        splits = [entry.split] + ([entry.train_split] if entry.task == "linear_probe" else [])
        root = Path(entry.path)
        if dense:
            splits = dense_suite.splits(entry)
            if dense_suite.files_present(entry):
                dense_suite.check_entry(entry)
                continue
        elif root.exists() and (entry.format != "wds" or all((root / s / "nshards.txt").is_file() for s in splits)):
            if entry.task == "zeroshot_classification" and entry.templates is None and not dataset_templates(root):
                raise ValueError(
                    f"dataset {entry.name!r} ({entry.path}): zero-shot classification needs templates and the "
                    "dataset ships none (zeroshot_classification_templates.txt), so set templates: in the suite, "
                    "or --templates with --dataset (openai_imagenet, a file, or a list)"
                )
            if entry.kind == CLASSIFICATION:
                _check_classes(entry)
            continue
        split_text = splits[0] if len(splits) == 1 else "{" + ",".join(splits) + "}"
        layouts = dense_suite.LAYOUTS[dense_suite.layout(entry.task)] if dense else LAYOUTS[entry.format or "wds"]
        layout = layouts.format(path=entry.path, split=split_text)
        lines = [
            f"dataset {entry.name!r} ({entry.task}, splits {', '.join(splits)}) expects its files at "
            f"{entry.path} ({layout})."
        ]
        if entry.get:
            lines.append(f"  Get them with:  {entry.get.replace('{path}', entry.path)}")
        if entry.data_root is not None:
            lines.append(
                f"  or point --data-root (or ${DATA_ROOT_ENV}) at the folder that holds {root.name} "
                f"(now {entry.data_root})."
            )
        problems.append("\n".join(lines))
    if problems:
        raise FileNotFoundError(f"suite {suite.name!r} ({suite.path}): data missing\n" + "\n".join(problems))


def _check_classes(entry: SuiteEntry) -> None:
    """The entry's class names fit its dataset's count of classes, where the dataset's files give one (cheap: no
    image or label is read; ``load_benchmark`` also checks the labels)."""
    own = dataset_classes(entry.path, entry.split, entry.format, entry.label_column)
    names = entry.classnames or own.names
    if names:
        own.check(names, (entry.classnames_from or "the class names given") if entry.classnames else own.names_from)


def single_dataset_suite(
    path: str | Path,
    task: str | None = None,
    classnames: str | list[str] | None = None,
    templates: str | list[str] | None = None,
    split: str = "test",
    format: str | None = None,
    **dense_options: object,
) -> Suite:
    """The suite of one dataset, named after its folder, checked as ``load_suite`` checks a suite file.

    ``classnames``/``templates``: what a suite entry takes (``openai_imagenet``, a .txt/.json file, a list).
    Without ``task``: for a segmentation set (``dense_kind``), zero-shot segmentation, and the segmentation probe
    as ``NAME-probe`` when it has a train split; for a referring-expression set, referring expressions; else
    zero-shot classification when class names are given or the dataset is a classification set
    (``dataset_kind``), else zero-shot retrieval. ``dense_options`` (``variant``, ``ignore_index``,
    ``reduce_zero_label``, ``max_train_patches``; None = the default) go to the tasks that take them, and one that
    none of them takes is an error."""
    if task is not None and task not in TASKS:
        raise ValueError(f"task {task!r} is not one of {TASKS}")
    if format is not None and format not in FORMATS:
        raise ValueError(f"format {format!r} is not one of {FORMATS}")
    names = {
        key: None if value is None else resolve_names(value, key)
        for key, value in (("classnames", classnames), ("templates", templates))
    }
    kind = dense_kind(path, split) if Path(path).is_dir() else None
    if task is None:
        if not Path(path).exists():
            raise FileNotFoundError(f"dataset {path} does not exist")
        tasks = _dense_tasks(path, split, kind)
        if not tasks:
            classifies = classnames is not None or dataset_kind(path, split, format) == CLASSIFICATION
            tasks = ["zeroshot_classification" if classifies else "zeroshot_retrieval"]
    elif kind is not None and task not in DENSE_TASKS:
        raise ValueError(
            f"task {task!r}: {path} is a {kind} set, whose tasks are {', '.join(_dense_tasks(path, split, kind))}"
        )
    else:
        tasks = [task]
    for key, value in dense_options.items():
        if value is not None and not set(tasks) & set(DENSE_OPTIONS[key][0]):
            raise ValueError(
                f"{key} = {value!r}: only for {', '.join(DENSE_OPTIONS[key][0])} (the task here: {', '.join(tasks)})"
            )
    name = Path(path).resolve().name or str(path)
    entries = []
    for each in tasks:
        options = {
            key: value for key, value in dense_options.items() if value is not None and each in DENSE_OPTIONS[key][0]
        }
        entry_name = f"{name}-probe" if each == "segmentation_probe" and len(tasks) > 1 else name
        entry = SuiteEntry(
            entry_name, each, str(path), format, split, names["classnames"], names["templates"], **options
        )
        if classnames is not None:
            entry.classnames_from = classnames if isinstance(classnames, str) else "--classnames"
        entries.append(entry)
    suite = Suite(name, entries, None)
    check_data(suite)
    return suite


def _dense_tasks(path: str | Path, split: str, kind: str | None) -> list[str]:
    """The tasks a dense set runs by default (none for another set)."""
    if kind is None:
        return []
    if kind != SEGMENTATION:
        return ["referring_expressions"]
    root = Path(path)
    probe = split != "train" and (root / "images" / "train").is_dir() and (root / "annotations" / "train").is_dir()
    return ["zeroshot_segmentation"] + (["segmentation_probe"] if probe else [])


class _Run:
    """One suite run's caches: opened benchmarks, image embeddings per split, text classifiers; and, when
    ``predictions`` is a dict, each dataset's per-image predictions (its top ``top_k``); when ``examples`` is one,
    each segmentation set's example images and masks."""

    def __init__(
        self,
        encoder: Encoder,
        tokenizer: Tokenizer,
        transform: Callable,
        batch_size: int,
        num_workers: int,
        progress: bool,
        diagnostics: bool = False,
        predictions: dict[str, list[dict]] | None = None,
        top_k: int = 5,
        examples: dict[str, dense_suite.SegmentationExamples] | None = None,
    ) -> None:
        self.encoder, self.tokenizer, self.transform = encoder, tokenizer, transform
        self.batch_size, self.num_workers, self.progress = batch_size, num_workers, progress
        self.diagnostics = diagnostics
        self.predictions, self.top_k, self.examples = predictions, top_k, examples
        self.benchmarks: dict[tuple, Benchmark] = {}
        self.features: dict[tuple, tuple] = {}
        self.classifiers: dict[tuple, Any] = {}

    def benchmark(self, entry: SuiteEntry, split: str) -> Benchmark:
        key = (entry.path, split, entry.format, entry.kind, tuple(sorted(entry.columns().items())))
        if key not in self.benchmarks:
            self.benchmarks[key] = load_benchmark(
                entry.path,
                entry.name,
                split,
                entry.format,
                entry.kind,
                entry.classnames,
                entry.templates,
                entry.classnames_from or "the class names given",
                **entry.columns(),
            )
        return self.benchmarks[key]

    def embedded(self, benchmark: Benchmark) -> tuple:
        """(N_scored, D) embeddings and targets of the images that decode; ``benchmark.unreadable`` lists the rest."""
        key = (benchmark.path, benchmark.split, benchmark.format, benchmark.kind)
        if key not in self.features:
            loader = benchmark_loader(benchmark, self.transform, self.batch_size, self.num_workers)
            skipped: list[tuple[int, str]] = []
            features, targets = embed_images(
                self.encoder, loader, self.progress, desc=f"{benchmark.name} {benchmark.split}", skipped=skipped
            )
            self.features[key] = (features, targets, sorted(skipped))
        features, targets, benchmark.unreadable = self.features[key]
        return features, targets

    def classifier(self, classnames: list[str], templates) -> Any:
        key = (tuple(classnames), json.dumps(templates, sort_keys=True))
        if key not in self.classifiers:
            self.classifiers[key] = build_classifier(
                self.encoder, self.tokenizer, classnames, templates, progress=self.progress
            )
        return self.classifiers[key]


def _classification(run: _Run, entry: SuiteEntry) -> dict:
    benchmark = run.benchmark(entry, entry.split)
    missing = (("class names", benchmark.classnames), ("templates", benchmark.templates))
    if not all(given for _, given in missing):
        raise ValueError(
            f"dataset {entry.name!r} ({entry.path}): zero-shot classification needs class names and templates; "
            f"it has no {' and no '.join(what for what, given in missing if not given)}, so set classnames: / "
            "templates: in the suite, or --classnames / --templates with --dataset (openai_imagenet, a file, or a list)"
        )
    features, labels = run.embedded(benchmark)
    classifier = run.classifier(benchmark.classnames, benchmark.templates)
    metrics = classify(features, labels, classifier, benchmark.classnames)
    metrics["chance_acc1"] = 1 / len(benchmark.classnames)
    if run.diagnostics:
        metrics["projection"] = project_embeddings(features, labels, classifier)
    if run.predictions is not None:
        logits = zero_shot_logits(features, classifier)
        run.predictions[entry.name] = classification_rows(
            logits, labels, benchmark.classnames, scored_keys(benchmark), run.top_k, 100.0, benchmark.scored()
        )
    return {**metrics, "dataset": benchmark.describe()}


def _retrieval(run: _Run, entry: SuiteEntry) -> dict:
    benchmark = run.benchmark(entry, entry.split)
    image_features, captions = run.embedded(benchmark)
    text_features, texts, caption_image = embed_captions(run.encoder, run.tokenizer, captions, progress=run.progress)
    metrics = retrieval_metrics(image_features, text_features, caption_image, entry.recall_k)
    # A random ranking puts a match first with probability 1/num_images, both ways.
    metrics["chance_recall@1"] = 1 / metrics["num_images"]
    scored = benchmark.scored()  # the benchmark index of each embedded image
    metrics["examples"] = [
        {**example, "image": scored[example["image"]], "top_images": [scored[i] for i in example["top_images"]]}
        for example in retrieval_examples(image_features, text_features, texts, caption_image)
    ]
    if run.predictions is not None:
        run.predictions[entry.name] = retrieval_rows(
            image_features, text_features, caption_image, texts, scored_keys(benchmark), run.top_k
        )
    # each image with its first caption: the paired embeddings the health diagnostics are defined on
    first: dict[int, int] = {}
    for caption, image in enumerate(caption_image.tolist()):
        first.setdefault(image, caption)
    paired_images, paired_texts = image_features[list(first)], text_features[list(first.values())]
    if len(paired_images) >= 2:
        metrics["health"] = embedding_health(paired_images, paired_texts)
        if run.diagnostics:
            metrics.update(similarity_diagnostics(paired_images, paired_texts))
    return {**metrics, "dataset": benchmark.describe()}


def _linear_probe(run: _Run, entry: SuiteEntry) -> dict:
    test = run.benchmark(entry, entry.split)
    train = run.benchmark(entry, entry.train_split)
    val = run.benchmark(entry, entry.val_split) if entry.val_split else None
    test_features, test_labels = run.embedded(test)
    train_features, train_labels = run.embedded(train)
    val_features, val_labels = run.embedded(val) if val is not None else (None, None)
    classnames = test.classnames
    num_classes = len(classnames) if classnames else int(max(train_labels.max(), test_labels.max())) + 1
    logits, facts = fit_linear_probe(
        train_features,
        train_labels,
        test_features,
        num_classes,
        val_features,
        val_labels,
        entry.val_proportion,
        entry.seed,
        progress=run.progress,
    )
    metrics = {**classification_metrics(logits, test_labels, num_classes), **facts}
    if run.predictions is not None:
        run.predictions[entry.name] = classification_rows(
            logits, test_labels, classnames, scored_keys(test), run.top_k, positions=test.scored()
        )
    if classnames:
        metrics["per_class_accuracy"] = {classnames[c]: v for c, v in metrics["per_class_accuracy"].items()}
    metrics["chance_acc1"] = 1 / num_classes
    dataset = {**test.describe(), "train_split": entry.train_split, "val_split": entry.val_split}
    dataset["train_num_unreadable"] = len(train.unreadable or ())
    return {**metrics, "dataset": dataset}


def scored_keys(benchmark: Benchmark) -> list[str]:
    """The ids of the images that were embedded (every image that decoded), in index order."""
    keys = benchmark.keys()
    return [keys[index] for index in benchmark.scored()]


RUNNERS = {
    "zeroshot_classification": _classification,
    "zeroshot_retrieval": _retrieval,
    "linear_probe": _linear_probe,
    **dense_suite.RUNNERS,
}


def check_model(suite: Suite, encoder: Encoder) -> None:
    """A suite with a dense task refuses, in one line, an encoder that gives no patch features (``check_dense``)."""
    if any(entry.task in DENSE_TASKS for entry in suite.datasets):
        check_dense(encoder)


def run_suite(
    encoder: Encoder,
    tokenizer: Tokenizer,
    transform: Callable,
    suite: Suite,
    batch_size: int = 256,
    num_workers: int = 2,
    progress: bool = False,
    diagnostics: bool = False,
    predictions: dict[str, list[dict]] | None = None,
    top_k: int = 5,
    examples: dict[str, dense_suite.SegmentationExamples] | None = None,
) -> dict[str, dict]:
    """Run every dataset of ``suite``; ``transform`` maps a PIL image to the encoder's input tensor.

    A ``predictions`` dict is filled with {dataset name: per-image rows with the top ``top_k`` labels or ids}
    (the rows ``clipforge.evaluation.predictions`` writes); an ``examples`` dict with {segmentation set's name:
    its first test images, true and predicted masks}; the results stay metrics only. A suite with a dense task
    refuses an encoder without patch features (``check_dense``) before any data is read.

    Every retrieval set also reports ``health`` (``clipforge.evaluation.health.embedding_health`` of each image with its
    first caption). ``diagnostics`` adds what the embedding plots draw: a t-SNE ``projection`` per
    classification set, ``similarity_sample`` and ``similarity_histogram`` per retrieval set."""
    check_data(suite)
    check_model(suite, encoder)
    run = _Run(
        encoder, tokenizer, transform, batch_size, num_workers, progress, diagnostics, predictions, top_k, examples
    )
    results = {}
    for entry in suite.datasets:
        start = time.perf_counter()
        metrics = RUNNERS[entry.task](run, entry)
        metrics["task"], metrics["seconds"] = entry.task, time.perf_counter() - start
        results[entry.name] = metrics
    return results
