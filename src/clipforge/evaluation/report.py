"""Reports of a suite run: headline metrics, the tables (the results' own is ``clipforge.eval_results``'s), and the
files ``clipforge eval`` writes.

``write_report`` puts ``STEM.json`` (every metric), ``STEM.md`` (the tables: results, sizes, representation
health of the retrieval sets) and the plots (``STEM_NAME_per_class.png`` per classification set,
``STEM_NAME_retrieval.png`` per retrieval set, ``STEM_NAME_segmentation.png`` per segmentation set whose examples
the run kept; with ``clipforge eval --embedding-plots`` also ``STEM_NAME_tsne.png``, ``STEM_NAME_similarity.png``
and ``STEM_NAME_similarity_hist.png``) in one directory. Training's evaluation writes ``step_N.json``, ``step_N.md``
and the segmentation plots (``segmentation_plots``) in ``RUN_DIR/eval/``.

The results table, a row per metric beside its chance (dense tasks included), is ``clipforge.eval_results``'.

Where: ``clipforge eval`` of a clipforge checkpoint writes to ``RUN_DIR/eval/adhoc/`` (``adhoc_results_dir``)
unless ``--out`` says, never to ``RUN_DIR/eval/`` itself, which holds training's ``step_N.json`` results (those
the model card of ``clipforge export`` takes by default).
"""

from __future__ import annotations

import json
from pathlib import Path

from clipforge.eval_results import DENSE_LABELS, TASK_LABELS, dense_rows, markdown_table

__all__ = [
    "adhoc_results_dir",
    "dense_rows",
    "headline",
    "health_table",
    "markdown_table",
    "segmentation_plots",
    "sizes_table",
    "write_report",
]

HEADLINE_KEYS = {
    "zeroshot_classification": ("acc1", "acc5", "mean_per_class_recall"),
    "linear_probe": ("acc1", "acc5", "mean_per_class_recall"),
    "zeroshot_retrieval": (
        "image_retrieval_recall@1",
        "image_retrieval_recall@5",
        "text_retrieval_recall@1",
        "text_retrieval_recall@5",
    ),
    "zeroshot_segmentation": ("miou", "pixel_accuracy"),
    "segmentation_probe": ("miou", "pixel_accuracy"),
    "referring_expressions": ("accuracy",),
}


def adhoc_results_dir(checkpoint: str | Path) -> Path:
    """``RUN_DIR/eval/adhoc``: where ``clipforge eval CHECKPOINT`` writes by default (``RUN_DIR/checkpoints/step_N``,
    or its ``latest`` link, is the checkpoint)."""
    return Path(checkpoint).resolve().parent.parent / "eval" / "adhoc"


def headline(results: dict[str, dict]) -> dict[str, float]:
    """Flat {dataset/metric: value} of the metrics worth logging (metrics that are None are left out)."""
    flat = {}
    for name, metrics in results.items():
        for key in HEADLINE_KEYS[metrics["task"]]:
            if metrics.get(key) is not None:
                flat[f"{name}/{key}"] = metrics[key]
    return flat


def sizes_table(results: dict[str, dict]) -> str:
    rows = ["| dataset | task | split | images | classes / captions | seconds |", "|---|---|---|---|---|---|"]
    for name, metrics in results.items():
        dataset = metrics.get("dataset", {})
        if metrics["task"] in DENSE_LABELS:
            rows.append(_dense_sizes(name, metrics, dataset))
            continue
        if metrics["task"] == "zeroshot_retrieval":
            second = f"{metrics['num_texts']:,} captions"
        else:
            second = f"{round(1 / metrics['chance_acc1']):,} classes"
        split = dataset.get("split", "")
        if metrics["task"] == "linear_probe":
            split = f"{dataset.get('train_split')} → {split}"
        images = f"{dataset.get('num_images', metrics.get('num_samples', 0)):,}"
        if dataset.get("num_unreadable"):  # the metrics count only the images that were read
            images = f"{dataset['num_scored']:,} of {images} ({dataset['num_unreadable']:,} unreadable, not scored)"
        rows.append(
            f"| {name} | {TASK_LABELS.get(metrics['task'], 'retrieval')} | {split} | {images} | {second} | "
            f"{metrics['seconds']:.1f} |"
        )
    return "\n".join(rows)


def _dense_sizes(name: str, metrics: dict, dataset: dict) -> str:
    split = dataset.get("split", "")
    if metrics["task"] == "segmentation_probe":
        split = f"{dataset.get('train_split')} → {split}"
    if metrics["task"] == "referring_expressions":
        second = f"{dataset.get('num_expressions', metrics['num_samples']):,} expressions"
    else:
        second = f"{metrics['num_classes']:,} classes"
    grid = "×".join(str(side) for side in metrics.get("grid") or [])
    return (
        f"| {name} | {DENSE_LABELS[metrics['task']]} (grid {grid}) | {split} | {dataset.get('num_images', 0):,} | "
        f"{second} | {metrics['seconds']:.1f} |"
    )


def segmentation_plots(results: dict[str, dict], examples: dict | None, out_dir: str | Path, stem: str) -> list[Path]:
    """``STEM_NAME_segmentation.png`` (input crop, true mask, predicted mask of each example image) per
    segmentation set in ``examples`` (what ``run_suite`` kept); returns the paths written."""
    if not examples:
        return []
    from clipforge.evaluation import plots as draw

    out = Path(out_dir)
    return [
        draw.plot_segmentation_examples(name, results[name], kept, out / f"{stem}_{_safe(name)}_segmentation.png")
        for name, kept in examples.items()
        if name in results
    ]


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def write_report(
    results: dict[str, dict], out_dir: str | Path, stem: str, plots: bool = True, examples: dict | None = None
) -> list[Path]:
    """Write STEM.json, STEM.md and (with ``plots``) the PNGs, with the segmentation examples ``run_suite`` kept
    in ``examples``; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / f"{stem}.json", out / f"{stem}.md"]
    written[0].write_text(json.dumps(results, indent=1))
    health = health_table(results)
    written[1].write_text(
        markdown_table(results) + "\n\n" + sizes_table(results) + "\n" + (f"\n{health}\n" if health else "")
    )
    if plots:
        from clipforge.evaluation import plots as draw

        for name, metrics in results.items():
            safe = _safe(name)
            if metrics.get("per_class_accuracy"):
                written.append(draw.plot_per_class_accuracy(name, metrics, out / f"{stem}_{safe}_per_class.png"))
            if metrics.get("examples"):
                written.append(draw.plot_retrieval_grid(name, metrics, out / f"{stem}_{safe}_retrieval.png"))
            if metrics.get("projection"):
                classnames = list(metrics.get("per_class_accuracy") or {}) or None
                written.append(draw.plot_projection(name, metrics, classnames, out / f"{stem}_{safe}_tsne.png"))
            if metrics.get("similarity_sample"):
                written.append(draw.plot_similarity_heatmap(name, metrics, out / f"{stem}_{safe}_similarity.png"))
                written.append(
                    draw.plot_similarity_histogram(name, metrics, out / f"{stem}_{safe}_similarity_hist.png")
                )
        written += segmentation_plots(results, examples, out, stem)
    return written


HEALTH_ROWS = (
    ("health/alignment", "alignment ‖x−y‖² (lower: pairs closer)"),
    ("health/uniformity_image", "uniformity, images (lower: more spread)"),
    ("health/uniformity_text", "uniformity, captions"),
    ("health/positive_cos", "positive-pair cosine"),
    ("health/hardest_negative_cos_i2t", "hardest-negative cosine, image→text"),
    ("health/hardest_negative_cos_t2i", "hardest-negative cosine, text→image"),
    ("health/mean_rank_i2t", "mean rank of the positive, image→text"),
    ("health/mean_rank_t2i", "mean rank of the positive, text→image"),
    ("health/effective_rank_image", "effective rank, images"),
    ("health/effective_rank_text", "effective rank, captions"),
    ("health/std_mean_image", "per-dimension std (mean), images"),
    ("health/std_mean_text", "per-dimension std (mean), captions"),
)


def health_table(results: dict[str, dict]) -> str:
    """Representation health of every retrieval set (each image with its first caption); '' if there is none."""
    healthy = {name: metrics["health"] for name, metrics in results.items() if metrics.get("health")}
    if not healthy:
        return ""
    rows = ["| representation health | " + " | ".join(healthy) + " |", "|---|" + "---:|" * len(healthy)]
    for key, label in HEALTH_ROWS:
        rows.append(f"| {label} | " + " | ".join(f"{health[key]:.4g}" for health in healthy.values()) + " |")
    return "\n".join(rows)
