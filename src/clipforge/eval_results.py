"""Evaluation results as a markdown table: the one rendering of ``{dataset: metrics}`` (what ``clipforge eval`` and
training's evaluation write) that the console, the reports (``clipforge.evaluation.report``) and the model card
(``clipforge.export.card``) show.

It imports nothing, and stands apart from the evaluation package so that export shows the table without importing
evaluation, which sits above export (it loads models through ``clipforge.model_loading``, which uses export's
converter).
"""

from __future__ import annotations

import math

TASK_LABELS = {"zeroshot_classification": "classification", "linear_probe": "linear probe"}
DENSE_METRICS = {
    "zeroshot_segmentation": (
        ("miou", "mIoU", "chance_miou"),
        ("pixel_accuracy", "pixel accuracy", "chance_pixel_accuracy"),
    ),
    "segmentation_probe": (
        ("miou", "mIoU", "chance_miou"),
        ("pixel_accuracy", "pixel accuracy", "chance_pixel_accuracy"),
    ),
    "referring_expressions": (("accuracy", "accuracy (IoU > 0.5)", "chance"),),
}
DENSE_LABELS = {
    "zeroshot_segmentation": "zero-shot segmentation",
    "segmentation_probe": "segmentation probe",
    "referring_expressions": "referring expressions",
}


def percent(value: float | None) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.1%}"


def markdown_table(results: dict[str, dict]) -> str:
    """One row per dataset and metric (top-1, top-5, mean per-class recall; R@k each way; mIoU and pixel accuracy;
    referring accuracy), with chance beside it, in the results' order."""
    rows = ["| dataset | task | metric | value | chance |", "|---|---|---|---|---|"]
    for name, metrics in results.items():
        if metrics["task"] in DENSE_METRICS:
            rows += dense_rows(name, metrics)
            continue
        if metrics["task"] in TASK_LABELS:
            task, chance = TASK_LABELS[metrics["task"]], metrics["chance_acc1"]
            rows.append(f"| {name} | {task} | top-1 | {percent(metrics['acc1'])} | {percent(chance)} |")
            if metrics.get("acc5") is not None:
                rows.append(
                    f"| {name} | {task} | top-5 | {percent(metrics['acc5'])} | {percent(min(1.0, 5 * chance))} |"
                )
            rows.append(
                f"| {name} | {task} | mean per-class recall | "
                f"{percent(metrics['mean_per_class_recall'])} | {percent(chance)} |"
            )
            continue
        ks = sorted(int(key.rsplit("@", 1)[1]) for key in metrics if key.startswith("image_retrieval_recall@"))
        for direction, prefix in (("text→image", "image_retrieval"), ("image→text", "text_retrieval")):
            for k in ks:
                rows.append(
                    f"| {name} | {direction} | R@{k} | {percent(metrics[f'{prefix}_recall@{k}'])} "
                    f"| {percent(min(1.0, k * metrics['chance_recall@1']))} |"
                )
    return "\n".join(rows)


def dense_rows(name: str, metrics: dict) -> list[str]:
    """The results-table rows of a dense task, each metric with its chance."""
    task = DENSE_LABELS[metrics["task"]] + (f" ({metrics['variant']})" if metrics.get("variant") else "")
    return [
        f"| {name} | {task} | {label} | {percent(metrics[key])} | {percent(metrics[chance])} |"
        for key, label, chance in DENSE_METRICS[metrics["task"]]
    ]
