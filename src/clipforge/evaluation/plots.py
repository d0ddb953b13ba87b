"""Report plots (matplotlib, Agg): per-class accuracy bars, and a grid of top retrieved images per caption."""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 — after choosing the headless backend

from clipforge.evaluation.datasets import reopen  # noqa: E402

MAX_LABELLED_CLASSES = 60
EXTREMES = 15


def plot_per_class_accuracy(name: str, metrics: dict, path: Path) -> Path:
    """Bars of per-class accuracy, best first, with mean per-class recall and chance; with many classes the
    sorted curve plus the best and worst classes by name."""
    items = sorted(metrics["per_class_accuracy"].items(), key=lambda item: -item[1])
    values = [value for _, value in items]
    chance, mean = metrics["chance_acc1"], metrics["mean_per_class_recall"]
    title = f"{name}: per-class accuracy ({metrics['task'].replace('_', ' ')}, {len(items)} classes)"
    if len(items) <= MAX_LABELLED_CLASSES:
        figure, axes = plt.subplots(figsize=(max(6.0, 0.28 * len(items) + 2), 4.5))
        axes.bar(range(len(items)), values, color="#4c72b0")
        axes.set_xticks(range(len(items)), [label for label, _ in items], rotation=60, ha="right", fontsize=8)
        panels = [axes]
    else:
        figure = plt.figure(figsize=(12, 9))
        axes = figure.add_subplot(2, 1, 1)
        axes.fill_between(range(len(values)), values, step="mid", color="#4c72b0")
        axes.set_xlabel("classes, best to worst")
        panels = [axes]
        for column, (subset, label) in enumerate(((items[:EXTREMES], "best"), (items[-EXTREMES:], "worst"))):
            side = figure.add_subplot(2, 2, 3 + column)
            side.barh(range(len(subset)), [value for _, value in subset], color="#55a868" if column == 0 else "#c44e52")
            side.set_yticks(range(len(subset)), [text[:28] for text, _ in subset], fontsize=7)
            side.invert_yaxis()
            side.set_xlim(0, 1)
            side.set_title(f"{EXTREMES} {label} classes", fontsize=9)
    axes.axhline(mean, color="black", linewidth=1, label=f"mean per-class recall {mean:.1%}")
    axes.axhline(chance, color="grey", linestyle="--", linewidth=1, label=f"chance {chance:.1%}")
    axes.set_ylim(0, 1)
    axes.set_ylabel("accuracy")
    axes.legend(loc="upper right", fontsize=8)
    axes.set_title(title, fontsize=10)
    for panel in panels:
        panel.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_retrieval_grid(name: str, metrics: dict, path: Path) -> Path:
    """One row per example caption: the caption, its top-k images (green border: its own image), and its
    own image at the end (red) when it is not among them."""
    benchmark = reopen(metrics["dataset"], name)
    examples = metrics["examples"]
    k = max(len(example["top_images"]) for example in examples)
    figure, grid = plt.subplots(
        len(examples),
        k + 2,
        figsize=(1.7 * (k + 2) + 1.5, 1.9 * len(examples)),
        gridspec_kw={"width_ratios": [1.6] + [1] * (k + 1)},
        squeeze=False,
    )
    for row, example in enumerate(examples):
        caption_axes = grid[row][0]
        caption_axes.axis("off")
        caption_axes.text(0, 0.5, "\n".join(textwrap.wrap(f"“{example['caption']}”", 24)), va="center", fontsize=8)
        shown = list(example["top_images"]) + ([] if example["image"] in example["top_images"] else [example["image"]])
        for column in range(k + 1):
            axes = grid[row][column + 1]
            axes.set_xticks([])
            axes.set_yticks([])
            if column >= len(shown):
                axes.axis("off")
                continue
            index = shown[column]
            axes.imshow(benchmark.image(index))
            correct = index == example["image"]
            colour = "#2ca02c" if correct else "#bbbbbb"
            if column == len(example["top_images"]):
                colour = "#d62728"
            for spine in axes.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(4 if correct or colour == "#d62728" else 1)
            axes.set_title("its image" if column == len(example["top_images"]) else f"#{column + 1}", fontsize=7)
    figure.suptitle(f"{name}: text→image, top {k} of {metrics['num_images']:,} images", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


PROJECTION_SIZE = (800, 800)
HEATMAP_SIZE = (700, 600)
HISTOGRAM_SIZE = (800, 450)
DPI = 100


def _save(figure, path: Path) -> Path:
    figure.savefig(path, dpi=DPI)  # no bbox_inches="tight": the PNG is exactly the figure's stated size
    plt.close(figure)
    return path


def plot_projection(name: str, metrics: dict, classnames: list[str] | None, path: Path) -> Path:
    """A 2-D t-SNE of image embeddings coloured by class, with each class's text embedding as a labelled star
    (PROJECTION_SIZE pixels)."""
    projection = metrics["projection"]
    image_xy, labels, class_xy = projection["image_xy"], projection["image_labels"], projection["class_xy"]
    colours = plt.get_cmap("tab20" if len(class_xy) > 10 else "tab10")
    figure, axes = plt.subplots(figsize=(PROJECTION_SIZE[0] / DPI, PROJECTION_SIZE[1] / DPI))
    axes.scatter(
        [x for x, _ in image_xy],
        [y for _, y in image_xy],
        s=8,
        alpha=0.6,
        c=[colours(label % colours.N) for label in labels],
        linewidths=0,
    )
    for index, (x, y) in enumerate(class_xy):
        axes.scatter([x], [y], marker="*", s=260, color=colours(index % colours.N), edgecolors="black", zorder=3)
        if classnames and len(class_xy) <= MAX_LABELLED_CLASSES:
            axes.annotate(classnames[index], (x, y), xytext=(5, 5), textcoords="offset points", fontsize=8)
    axes.set_title(
        f"{name}: {projection['method']} of {len(image_xy)} image embeddings (dots) and the "
        f"{len(class_xy)} class text embeddings (stars)",
        fontsize=9,
    )
    axes.set_xticks([])
    axes.set_yticks([])
    figure.tight_layout()
    return _save(figure, path)


def plot_similarity_heatmap(name: str, metrics: dict, path: Path) -> Path:
    """Cosine similarity of the first images (rows) against their captions (columns): a bright diagonal is a
    model that matches pairs (HEATMAP_SIZE pixels)."""
    sample = metrics["similarity_sample"]
    figure, axes = plt.subplots(figsize=(HEATMAP_SIZE[0] / DPI, HEATMAP_SIZE[1] / DPI))
    shown = axes.imshow(sample, cmap="viridis", vmin=-1, vmax=1)
    figure.colorbar(shown, ax=axes, label="cosine similarity")
    axes.set(
        xlabel="caption (of image j)",
        ylabel="image i",
        title=f"{name}: image–caption similarity, first {len(sample)} pairs",
    )
    figure.tight_layout()
    return _save(figure, path)


def plot_similarity_histogram(name: str, metrics: dict, path: Path) -> Path:
    """Histograms of positive-pair against negative-pair cosine similarities, each normalised to its own total
    (HISTOGRAM_SIZE pixels); their overlap is what retrieval gets wrong."""
    histogram = metrics["similarity_histogram"]
    edges = histogram["edges"]
    centres = [(a + b) / 2 for a, b in zip(edges, edges[1:])]
    width = edges[1] - edges[0]
    figure, axes = plt.subplots(figsize=(HISTOGRAM_SIZE[0] / DPI, HISTOGRAM_SIZE[1] / DPI))
    for key, colour in (("negative", "#c44e52"), ("positive", "#4c72b0")):
        counts = histogram[key]
        total = max(1, sum(counts))
        axes.bar(
            centres,
            [count / total for count in counts],
            width=width,
            alpha=0.6,
            color=colour,
            label=f"{key} pairs ({sum(counts):,})",
        )
    axes.set(
        xlabel="cosine similarity",
        ylabel="fraction of pairs",
        xlim=(-1, 1),
        title=f"{name}: positive vs negative image–caption similarities",
    )
    axes.legend()
    figure.tight_layout()
    return _save(figure, path)
