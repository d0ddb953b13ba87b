"""The dense tasks of a suite (``zeroshot_segmentation``, ``segmentation_probe``, ``referring_expressions``): the
sets an entry names, checked before any model work, and the runners ``clipforge.evaluation.suite.run_suite`` calls.

The runners score with the evaluators' own pieces (``clipforge.evaluation.segmentation``,
``clipforge.evaluation.referring``) and report what those report, with a ``dataset`` description beside it. The
two segmentation runners also keep the first ``EXAMPLE_IMAGES`` test images with their true and predicted masks
(``SegmentationExamples``) when the run collects them, for the plot of input, true mask and predicted mask; they
stay out of the results, which are written as JSON. So the segmentation runners compose the pieces
``zero_shot_segmentation`` and ``linear_probe_segmentation`` compose (the fit, then one pass over the test split
that both scores and keeps the examples) rather than call those functions, whose results hold no predictions;
tests/test_dense_suite.py checks that they give the same numbers.

Images go through the dense evaluators at most ``DENSE_BATCH_SIZE`` at a time, whatever the suite's batch size:
the per-pixel class scores of a batch are (B, K, S, S) floats, 0.96 GB for 32 ADE20K crops (150 classes, 224 px).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from clipforge.evaluation.dense_datasets import (
    REFERRING,
    SEGMENTATION,
    SegmentationSet,
    load_referring_set,
    load_segmentation_set,
    segmentation_batches,
)
from clipforge.evaluation.referring import referring_expressions
from clipforge.evaluation.segmentation import (
    collect_patches,
    confusion_matrix,
    fit_patch_probe,
    probe_scores,
    segmentation_metrics,
    upsample_scores,
    zero_shot_scores,
)

EXAMPLE_IMAGES = 4
DENSE_BATCH_SIZE = 32
LAYOUTS = {
    SEGMENTATION: "segmentation folders: {path}/images/{split}/NAME.jpg, {path}/annotations/{split}/NAME.png, "
    "{path}/classnames.txt",
    REFERRING: "referring-expression JSON: {path}/refs_{split}.json and the images it names",
}


@dataclass
class SegmentationExamples:
    """A few test images as the model saw them, with their true and predicted masks (for the plot)."""

    task: str
    classnames: list[str]
    crops: np.ndarray  # (N, S, S, 3) uint8: the model's input crops, normalisation undone
    masks: np.ndarray  # (N, S, S) int64 class indices, IGNORE (-1) where no metric counts
    predicted: np.ndarray  # (N, S, S) int64 predicted class per pixel


def layout(task: str) -> str:
    return REFERRING if task == "referring_expressions" else SEGMENTATION


def splits(entry) -> list[str]:
    """The splits an entry reads: the scored one, and the probe's train split."""
    return [entry.split] + ([entry.train_split] if entry.task == "segmentation_probe" else [])


def files_present(entry) -> bool:
    """Whether the folders and files the entry's layout needs are there (their contents are checked on opening)."""
    root = Path(entry.path)
    if layout(entry.task) == REFERRING:
        return (root / f"refs_{entry.split}.json").is_file()
    folders = [root / kind / split for split in splits(entry) for kind in ("images", "annotations")]
    return all(folder.is_dir() for folder in folders) and (
        entry.classnames is not None or (root / "classnames.txt").is_file()
    )


def segmentation_set(entry, split: str) -> SegmentationSet:
    return load_segmentation_set(
        entry.path,
        split,
        entry.classnames,
        entry.templates,
        entry.option("ignore_index"),
        entry.option("reduce_zero_label"),
    )


def check_entry(entry) -> None:
    """Open the entry's sets: names, pairing of images and masks, class names, every referring entry (errors name
    the file and the entry). Pixels are read when the task runs."""
    if layout(entry.task) == REFERRING:
        load_referring_set(entry.path, entry.split)
        return
    opened = [segmentation_set(entry, split) for split in splits(entry)]
    if len(opened) == 2 and opened[0].classnames != opened[1].classnames:
        raise ValueError(
            f"dataset {entry.name!r} ({entry.path}): the {entry.train_split} and {entry.split} splits name different "
            "classes"
        )


def describe(entry, num_images: int) -> dict:
    return {"path": str(entry.path), "layout": layout(entry.task), "split": entry.split, "num_images": num_images}


def _crops(images: torch.Tensor, transform) -> np.ndarray:
    """(B, 3, S, S) model inputs → (B, S, S, 3) uint8, the transform's ``Normalize`` undone (none: taken as 0-1)."""
    from torchvision.transforms import Normalize

    steps = [step for step in getattr(transform, "transforms", []) if isinstance(step, Normalize)]
    pixels = images.detach().float().cpu()
    if steps:
        mean = torch.tensor(steps[-1].mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(steps[-1].std, dtype=torch.float32)[:, None, None]
        pixels = pixels * std + mean
    return (pixels.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _score_test(run, entry, test: SegmentationSet, scores_of) -> tuple[dict, list[int]]:
    """One pass over the test split: ``scores_of(images)`` (B, h, w, K) per-patch class scores → the confusion
    matrix's metrics and the grid; the first images with their predictions go to ``run.examples``."""
    num_classes = len(test.classnames)
    confusion, grid, kept = 0, None, []
    batches = segmentation_batches(test, run.transform, min(run.batch_size, DENSE_BATCH_SIZE), run.num_workers)
    for images, masks in tqdm(batches, desc=f"{entry.name} {test.split}", disable=not run.progress, leave=False):
        scores = scores_of(images)
        grid = list(scores.shape[1:3])
        predictions = upsample_scores(scores, tuple(masks.shape[-2:])).argmax(dim=1)
        confusion = confusion + confusion_matrix(predictions, masks.to(predictions.device), num_classes)
        if run.examples is not None and sum(len(part[0]) for part in kept) < EXAMPLE_IMAGES:
            keep = EXAMPLE_IMAGES - sum(len(part[0]) for part in kept)
            kept.append((_crops(images[:keep], run.transform), masks[:keep].numpy(), predictions[:keep].cpu().numpy()))
    if run.examples is not None:
        crops, masks, predicted = (np.concatenate(part) for part in zip(*kept, strict=True))
        run.examples[entry.name] = SegmentationExamples(entry.task, list(test.classnames), crops, masks, predicted)
    return segmentation_metrics(confusion, test.classnames), grid


def zeroshot_segmentation(run, entry) -> dict:
    """``zero_shot_segmentation``'s metrics (class-name embeddings against each patch's, ``entry.variant``)."""
    test = segmentation_set(entry, entry.split)
    variant = entry.option("variant")
    classifier = run.classifier(test.classnames, test.templates)
    encoder = run.encoder

    def scores_of(images: torch.Tensor) -> torch.Tensor:
        embeddings = encoder.encode_image_dense(images, variant=variant, tokens=False).embeddings
        return zero_shot_scores(embeddings, classifier)

    metrics, grid = _score_test(run, entry, test, scores_of)
    return {**metrics, "variant": variant, "grid": grid, "num_images": len(test), "dataset": describe(entry, len(test))}


def segmentation_probe(run, entry) -> dict:
    """``linear_probe_segmentation``'s metrics and fit facts (a linear probe on the train split's patch tokens)."""
    train, test = segmentation_set(entry, entry.train_split), segmentation_set(entry, entry.split)
    batch_size = min(run.batch_size, DENSE_BATCH_SIZE)
    features, targets, images_of = collect_patches(
        run.encoder,
        train,
        run.transform,
        entry.option("max_train_patches"),
        entry.seed,
        batch_size,
        run.num_workers,
        run.progress,
    )
    probe, facts = fit_patch_probe(
        features, targets, images_of, len(train), entry.val_proportion, entry.seed, progress=run.progress
    )
    encoder, num_classes = run.encoder, len(test.classnames)

    def scores_of(images: torch.Tensor) -> torch.Tensor:
        return probe_scores(probe, encoder.encode_image_dense(images, embeddings=False).tokens, num_classes)

    metrics, grid = _score_test(run, entry, test, scores_of)
    dataset = {**describe(entry, len(test)), "train_split": entry.train_split, "num_train_images": len(train)}
    return {
        **metrics,
        **facts,
        "grid": grid,
        "num_images": len(test),
        "num_train_images": len(train),
        "dataset": dataset,
    }


def referring(run, entry) -> dict:
    """``referring_expressions``' accuracy and chance (the candidate box whose mean patch embedding is nearest the
    expression's)."""
    dataset = load_referring_set(entry.path, entry.split)
    metrics = referring_expressions(
        run.encoder,
        run.tokenizer,
        dataset,
        run.transform,
        entry.option("variant"),
        min(run.batch_size, DENSE_BATCH_SIZE),
        run.num_workers,
        run.progress,
    )
    described = {**describe(entry, metrics["num_images"]), "num_expressions": len(dataset)}
    return {**metrics, "dataset": described}


RUNNERS = {
    "zeroshot_segmentation": zeroshot_segmentation,
    "segmentation_probe": segmentation_probe,
    "referring_expressions": referring,
}
