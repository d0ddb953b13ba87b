"""Benchmark suites (``eval/*.yaml``): which datasets to run, with which task, and the report.

A suite file::

    name: synthetic
    datasets:
      - name: shapes
        task: zeroshot_classification      # or zeroshot_retrieval
        path: data/synth/eval/shapes       # CLIP_benchmark WebDataset directory, relative to the CWD

``run_suite`` returns ``{dataset name: metrics}``; ``markdown_table`` renders the headline
metrics next to chance level.

Entry point: ``clipforge eval runs/demo/checkpoints/latest --suite eval/synthetic.yaml``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from clipforge.evaluation.datasets import benchmark_loader, load_benchmark
from clipforge.evaluation.encoder import Encoder, Tokenizer
from clipforge.evaluation.retrieval import retrieval
from clipforge.evaluation.zeroshot import zero_shot_classification

TASKS = ("zeroshot_classification", "zeroshot_retrieval")


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
class SuiteEntry:
    name: str
    task: str
    path: str


@dataclass
class Suite:
    name: str
    datasets: list[SuiteEntry] = field(default_factory=list)


def load_suite(path: str | Path) -> Suite:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"eval suite {path} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    unknown = set(raw) - {"name", "datasets"}
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)} (expected name, datasets)")
    entries = []
    for index, item in enumerate(raw.get("datasets") or []):
        missing = {"name", "task", "path"} - set(item)
        extra = set(item) - {"name", "task", "path"}
        if missing or extra:
            raise ValueError(f"{path}: datasets[{index}] needs exactly name, task, path "
                             f"(missing {sorted(missing)}, unknown {sorted(extra)})")
        if item["task"] not in TASKS:
            raise ValueError(f"{path}: datasets[{index}].task = {item['task']!r} is not one of {TASKS}")
        entries.append(SuiteEntry(str(item["name"]), item["task"], str(item["path"])))
    if not entries:
        raise ValueError(f"{path}: the suite lists no datasets")
    return Suite(str(raw.get("name", path.stem)), entries)


def run_suite(encoder: Encoder, tokenizer: Tokenizer, transform: Callable, suite: Suite, batch_size: int = 256,
              num_workers: int = 2, progress: bool = False) -> dict[str, dict]:
    results = {}
    for entry in suite.datasets:
        if not Path(entry.path).exists():
            raise FileNotFoundError(f"suite {suite.name!r}: dataset {entry.name!r} expects its files at {entry.path} "
                                    "(CLIP_benchmark WebDataset layout); for the synthetic suite run "
                                    "`clipforge prep synthetic --out data/synth`")
        start = time.perf_counter()
        benchmark = load_benchmark(entry.path, entry.name)
        if benchmark.task != entry.task:
            raise ValueError(f"suite {suite.name!r}: {entry.path} holds a {benchmark.task} set, "
                             f"the suite says {entry.task}")
        loader = benchmark_loader(benchmark, transform, batch_size, num_workers)
        if entry.task == "zeroshot_classification":
            metrics = zero_shot_classification(encoder, tokenizer, loader, benchmark.classnames, benchmark.templates,
                                               progress)
            metrics["chance_acc1"] = 1 / len(benchmark.classnames)
        else:
            metrics = retrieval(encoder, tokenizer, loader, progress=progress)
            # A random ranking puts a match first with probability 1/num_images, both ways.
            metrics["chance_recall@1"] = 1 / metrics["num_images"]
        metrics["task"], metrics["seconds"] = entry.task, time.perf_counter() - start
        results[entry.name] = metrics
    return results


def headline(results: dict[str, dict]) -> dict[str, float]:
    """Flat {dataset/metric: value} of the metrics worth logging."""
    flat = {}
    for name, metrics in results.items():
        keys = (("acc1", "acc5", "mean_per_class_recall") if metrics["task"] == "zeroshot_classification" else
                ("image_retrieval_recall@1", "image_retrieval_recall@5", "text_retrieval_recall@1",
                 "text_retrieval_recall@5"))
        flat.update({f"{name}/{key}": metrics[key] for key in keys})
    return flat


def markdown_table(results: dict[str, dict]) -> str:
    rows = ["| dataset | task | metric | value | chance |", "|---|---|---|---|---|"]
    for name, metrics in results.items():
        if metrics["task"] == "zeroshot_classification":
            chance = metrics["chance_acc1"]
            rows.append(f"| {name} | classification | top-1 | {metrics['acc1']:.1%} | {chance:.1%} |")
            rows.append(f"| {name} | classification | top-5 | {metrics['acc5']:.1%} | {min(1.0, 5 * chance):.1%} |")
            rows.append(f"| {name} | classification | mean per-class recall | {metrics['mean_per_class_recall']:.1%} "
                        f"| {chance:.1%} |")
        else:
            for k in (1, 5, 10):
                rows.append(f"| {name} | text→image | R@{k} | {metrics[f'image_retrieval_recall@{k}']:.1%} "
                            f"| {min(1.0, k * metrics['chance_recall@1']):.1%} |")
            for k in (1, 5, 10):
                rows.append(f"| {name} | image→text | R@{k} | {metrics[f'text_retrieval_recall@{k}']:.1%} "
                            f"| {min(1.0, k * metrics['chance_recall@1']):.1%} |")
    return "\n".join(rows)
