"""Report plots (matplotlib, Agg): per-class accuracy bars, a grid of top retrieved images per caption, embedding
projections and similarities, and segmentation examples (input crop, true mask, predicted mask)."""

from __future__ import annotations

import colorsys
import textwrap
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 — after choosing the headless backend
from matplotlib.patches import Patch  # noqa: E402

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


SEGMENTATION_PANEL = 2.2  # inches per image panel (DPI pixels each)
SEGMENTATION_LEGEND = 2.6  # inches of legend beside the panels
SEGMENTATION_TITLE = 0.7  # inches of title above them
MAX_LEGEND_CLASSES = 30
IGNORE_COLOUR = (0, 0, 0)


def class_colours(num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8: a fixed colour per class index, the same in every plot and run (tab10's ten, then
    tab20's lighter ten, then hues a golden angle apart)."""
    tab20 = plt.get_cmap("tab20")
    order = [*range(0, 20, 2), *range(1, 20, 2)]  # tab20 pairs each tab10 colour with a lighter one
    colours = [tab20(order[index])[:3] for index in range(min(num_classes, 20))]
    for index in range(20, num_classes):
        hue = (index * 0.618033988749895) % 1.0
        colours.append(colorsys.hsv_to_rgb(hue, 0.75, 0.55 + 0.4 * ((index // 7) % 2)))
    return (np.array(colours, dtype=np.float64).reshape(-1, 3) * 255).round().astype(np.uint8)


def segmentation_size(num_images: int) -> tuple[int, int]:
    """The (width, height) in pixels of ``plot_segmentation_examples``' figure of ``num_images`` rows."""
    width = 3 * SEGMENTATION_PANEL + SEGMENTATION_LEGEND
    height = num_images * SEGMENTATION_PANEL + SEGMENTATION_TITLE
    return round(width * DPI), round(height * DPI)


def colour_mask(mask: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """(H, W) class indices (negative: ignore) → (H, W, 3) uint8 in ``palette``'s colours, ignore black."""
    image = np.empty((*mask.shape, 3), dtype=np.uint8)
    image[:] = IGNORE_COLOUR
    labelled = mask >= 0
    image[labelled] = palette[mask[labelled]]
    return image


def plot_segmentation_examples(name: str, metrics: dict, examples, path: Path) -> Path:
    """One row per example image: the model's input crop, the true mask and the predicted one, each class in its
    fixed colour (``class_colours``), ignore in black; the legend names the classes shown (``segmentation_size``
    pixels)."""
    num_images = len(examples.crops)
    palette = class_colours(len(examples.classnames))
    width, height = segmentation_size(num_images)
    figure = plt.figure(figsize=(width / DPI, height / DPI))
    panels_width = 3 * SEGMENTATION_PANEL / (width / DPI)
    top = 1 - SEGMENTATION_TITLE / (height / DPI)
    grid = figure.add_gridspec(num_images, 3, left=0.01, right=panels_width, bottom=0.01, top=top)
    grid_text = "×".join(str(side) for side in metrics.get("grid") or [])
    crop = f"{examples.crops.shape[2]}×{examples.crops.shape[1]}"
    headers = (f"input (crop {crop})", "true mask", f"predicted (grid {grid_text})")
    for row in range(num_images):
        shown = (
            examples.crops[row],
            colour_mask(examples.masks[row], palette),
            colour_mask(examples.predicted[row], palette),
        )
        for column, image in enumerate(shown):
            axes = figure.add_subplot(grid[row, column])
            axes.imshow(image, interpolation="nearest")
            axes.set_xticks([])
            axes.set_yticks([])
            if row == 0:
                axes.set_title(headers[column], fontsize=8)
    present = np.unique(np.concatenate([examples.masks.ravel(), examples.predicted.ravel()]))
    classes = [int(index) for index in present if index >= 0][:MAX_LEGEND_CLASSES]
    handles = [Patch(color=palette[index] / 255, label=examples.classnames[index]) for index in classes]
    if (present < 0).any():
        handles.append(Patch(color=np.array(IGNORE_COLOUR) / 255, label="ignore (not scored)"))
    figure.legend(
        handles=handles, loc="center left", bbox_to_anchor=(panels_width + 0.01, 0.5), fontsize=8, frameon=False
    )
    label = metrics["task"].replace("zeroshot_", "zero-shot ").replace("_", " ")
    variant = f", {metrics['variant']}" if metrics.get("variant") else ""
    figure.suptitle(
        f"{name}: {label}{variant}, mIoU {metrics['miou']:.1%} (chance {metrics['chance_miou']:.1%}), "
        f"first {num_images} test images",
        fontsize=9,
    )
    return _save(figure, path)
