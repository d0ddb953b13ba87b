"""Reports of a suite run: headline metrics, a markdown table, and the files ``clipforge eval`` writes.

``write_report`` puts ``STEM.json`` (every metric), ``STEM.md`` (the table) and the plots
(``STEM_NAME_per_class.png`` per classification set, ``STEM_NAME_retrieval.png`` per retrieval set)
in one directory.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

HEADLINE_KEYS = {
    "zeroshot_classification": ("acc1", "acc5", "mean_per_class_recall"),
    "linear_probe": ("acc1", "acc5", "mean_per_class_recall"),
    "zeroshot_retrieval": ("image_retrieval_recall@1", "image_retrieval_recall@5", "text_retrieval_recall@1",
                           "text_retrieval_recall@5"),
}
TASK_LABELS = {"zeroshot_classification": "classification", "linear_probe": "linear probe"}


def headline(results: dict[str, dict]) -> dict[str, float]:
    """Flat {dataset/metric: value} of the metrics worth logging (metrics that are None are left out)."""
    flat = {}
    for name, metrics in results.items():
        for key in HEADLINE_KEYS[metrics["task"]]:
            if metrics.get(key) is not None:
                flat[f"{name}/{key}"] = metrics[key]
    return flat


def _percent(value: float | None) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.1%}"


def markdown_table(results: dict[str, dict]) -> str:
    rows = ["| dataset | task | metric | value | chance |", "|---|---|---|---|---|"]
    for name, metrics in results.items():
        if metrics["task"] in TASK_LABELS:
            task, chance = TASK_LABELS[metrics["task"]], metrics["chance_acc1"]
            rows.append(f"| {name} | {task} | top-1 | {_percent(metrics['acc1'])} | {_percent(chance)} |")
            if metrics.get("acc5") is not None:
                rows.append(f"| {name} | {task} | top-5 | {_percent(metrics['acc5'])} | "
                            f"{_percent(min(1.0, 5 * chance))} |")
            rows.append(f"| {name} | {task} | mean per-class recall | "
                        f"{_percent(metrics['mean_per_class_recall'])} | {_percent(chance)} |")
            continue
        ks = sorted(int(key.rsplit("@", 1)[1]) for key in metrics if key.startswith("image_retrieval_recall@"))
        for direction, prefix in (("text→image", "image_retrieval"), ("image→text", "text_retrieval")):
            for k in ks:
                rows.append(f"| {name} | {direction} | R@{k} | {_percent(metrics[f'{prefix}_recall@{k}'])} "
                            f"| {_percent(min(1.0, k * metrics['chance_recall@1']))} |")
    return "\n".join(rows)


def sizes_table(results: dict[str, dict]) -> str:
    rows = ["| dataset | task | split | images | classes / captions | seconds |", "|---|---|---|---|---|---|"]
    for name, metrics in results.items():
        dataset = metrics.get("dataset", {})
        if metrics["task"] == "zeroshot_retrieval":
            second = f"{metrics['num_texts']:,} captions"
        else:
            second = f"{round(1 / metrics['chance_acc1']):,} classes"
        split = dataset.get("split", "")
        if metrics["task"] == "linear_probe":
            split = f"{dataset.get('train_split')} → {split}"
        rows.append(f"| {name} | {TASK_LABELS.get(metrics['task'], 'retrieval')} | {split} | "
                    f"{dataset.get('num_images', metrics.get('num_samples', 0)):,} | {second} | "
                    f"{metrics['seconds']:.1f} |")
    return "\n".join(rows)


def write_report(results: dict[str, dict], out_dir: str | Path, stem: str, plots: bool = True) -> list[Path]:
    """Write STEM.json, STEM.md and (with ``plots``) the PNGs; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / f"{stem}.json", out / f"{stem}.md"]
    written[0].write_text(json.dumps(results, indent=1))
    written[1].write_text(markdown_table(results) + "\n\n" + sizes_table(results) + "\n")
    if plots:
        from clipforge.evaluation.plots import plot_per_class_accuracy, plot_retrieval_grid

        for name, metrics in results.items():
            safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
            if metrics.get("per_class_accuracy"):
                written.append(plot_per_class_accuracy(name, metrics, out / f"{stem}_{safe}_per_class.png"))
            if metrics.get("examples"):
                written.append(plot_retrieval_grid(name, metrics, out / f"{stem}_{safe}_retrieval.png"))
    return written
