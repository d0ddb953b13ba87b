"""Semantic segmentation from dense features: a linear probe per patch, and zero-shot with class-name embeddings.

Both score a set in ``clipforge.evaluation.dense_datasets``' segmentation layout, its masks put on the model's
crop by that module's resizing rule (the image's own resize and centre crop, nearest-neighbour).

- ``linear_probe_segmentation``: a linear classifier on the frozen patch features (``DenseFeatures.tokens``),
  fitted on the train split as ``clipforge.evaluation.linear_probe`` fits one (L2-regularised logistic regression,
  C searched on a validation part). A patch's target is the mode of its crop pixels' classes, ignore pixels left
  out, ties to the lower class index; a patch with only ignore pixels is no target. The validation part is a
  seeded ``val_proportion`` of the train images (not of patches: a patch's neighbours are near-copies of it), and
  at most ``max_train_patches`` labelled patches take part, spread evenly over the images (a seeded choice per
  image where an image has more).
- ``zero_shot_segmentation``: each patch's scores are the cosine of its embedding (``DenseFeatures.embeddings``,
  ``variant`` "maskclip" or "plain": ``clipforge.evaluation.dense``) with each class's zero-shot classifier column
  (class names × templates, ``clipforge.evaluation.zeroshot.build_classifier``).

Scoring, the same for both: the per-patch class scores (B, h, w, K) are upsampled bilinearly (half-pixel centres)
to the crop's resolution, the argmax per pixel is the prediction, and one confusion matrix counts every test pixel
that is not ignore (rows: the mask's class, columns: the predicted one). From it: IoU per class = TP / (TP + FP +
FN); ``miou`` the mean over classes whose union TP + FP + FN is > 0 (``per_class_iou`` lists those classes by name);
``pixel_accuracy`` = trace / total. Chance, beside them, is guessing each pixel's class uniformly at random: with
f_c the fraction of pixels of class c and K classes, IoU_c = f_c / (1 + (K - 1) f_c) in expectation over many pixels
(every class is then predicted somewhere, so all K count), ``chance_miou`` their mean, ``chance_pixel_accuracy`` 1/K.

A patch covers the crop pixels whose row r and column c give floor(r · h / S_h) = i and floor(c · w / S_w) = j, the
same cells the scores' upsampling centres on.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from tqdm import tqdm

from clipforge.evaluation.dense import DEFAULT_VARIANT, check_dense, check_variant
from clipforge.evaluation.dense_datasets import IGNORE, SegmentationSet, segmentation_batches
from clipforge.evaluation.encoder import Tokenizer
from clipforge.evaluation.linear_probe import Probe, ProbeProblem, search_regularisation
from clipforge.evaluation.zeroshot import build_classifier

log = logging.getLogger(__name__)
ABSENT_SCORE = -1e30  # a class the probe never saw in training: never the argmax, finite so upsampling stays finite


def cell_index(size: int, cells: int, device=None) -> torch.Tensor:
    """(size,) the grid cell of each pixel along one side: floor(r · cells / size)."""
    return torch.arange(size, device=device) * cells // size


def patch_labels(masks: torch.Tensor, grid: tuple[int, int], num_classes: int) -> torch.Tensor:
    """(B, h, w) each patch's target from (B, S_h, S_w) masks: the mode of its labelled pixels (ties to the lower
    class), ``IGNORE`` where it has none."""
    batch, height, width = masks.shape
    grid_h, grid_w = grid
    cells = cell_index(height, grid_h, masks.device)[:, None] * grid_w + cell_index(width, grid_w, masks.device)
    labelled = masks != IGNORE
    flat = (torch.arange(batch, device=masks.device)[:, None, None] * grid_h * grid_w + cells) * num_classes + masks
    counts = torch.bincount(flat[labelled], minlength=batch * grid_h * grid_w * num_classes)
    counts = counts.view(batch, grid_h, grid_w, num_classes)
    labels = counts.argmax(dim=-1)  # the first of equal counts: the lower class
    labels[counts.sum(dim=-1) == 0] = IGNORE
    return labels


def upsample_scores(scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, h, w, K) per-patch scores → (B, K, S_h, S_w), bilinear with half-pixel centres."""
    return F.interpolate(scores.permute(0, 3, 1, 2).float(), size=size, mode="bilinear", align_corners=False)


def confusion_matrix(predictions: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K, K) int64 counts, rows the target class, columns the predicted one, over pixels whose target is not
    ``IGNORE``."""
    kept = targets != IGNORE
    pairs = targets[kept] * num_classes + predictions[kept]
    return torch.bincount(pairs, minlength=num_classes * num_classes).view(num_classes, num_classes).cpu()


def score_patches(scores: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The (K, K) confusion matrix of (B, h, w, K) per-patch scores against (B, S_h, S_w) masks (module docstring)."""
    predictions = upsample_scores(scores, tuple(masks.shape[-2:])).argmax(dim=1)
    return confusion_matrix(predictions, masks.to(predictions.device), scores.shape[-1])


def chance_miou(class_pixels: torch.Tensor) -> float:
    """Expected mIoU of guessing each pixel uniformly at random, from the (K,) pixel count of each class."""
    fractions = class_pixels.double() / class_pixels.sum()
    num_classes = len(class_pixels)
    return (fractions / (1 + (num_classes - 1) * fractions)).mean().item()


def segmentation_metrics(confusion: torch.Tensor, classnames: list[str]) -> dict:
    """``miou``, ``per_class_iou`` (class name → IoU, classes with a union only), ``pixel_accuracy``, the chance of
    both, ``num_pixels`` from a (K, K) confusion matrix (see the module docstring)."""
    confusion = confusion.double()
    true_positives = confusion.diagonal()
    union = confusion.sum(dim=0) + confusion.sum(dim=1) - true_positives
    counted = union > 0
    iou = true_positives[counted] / union[counted]
    total = confusion.sum()
    if total == 0:
        raise ValueError("segmentation: no test pixel has a class (every one is ignore)")
    names = [name for name, kept in zip(classnames, counted.tolist(), strict=True) if kept]
    return {
        "miou": iou.mean().item(),
        "per_class_iou": dict(zip(names, iou.tolist(), strict=True)),
        "pixel_accuracy": (true_positives.sum() / total).item(),
        "chance_miou": chance_miou(confusion.sum(dim=1)),
        "chance_pixel_accuracy": 1 / len(classnames),
        "num_pixels": int(total.item()),
        "num_classes": len(classnames),
    }


def zero_shot_scores(embeddings: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """(B, h, w, K) cosines of (B, h, w, D) normalised patch embeddings with a (D, K) zero-shot classifier."""
    return embeddings.float() @ classifier.to(embeddings.device, torch.float32)


def zero_shot_segmentation(
    encoder,
    tokenizer: Tokenizer,
    dataset: SegmentationSet,
    transform,
    variant: str = DEFAULT_VARIANT,
    batch_size: int = 32,
    num_workers: int = 0,
    progress: bool = False,
) -> dict:
    """Zero-shot segmentation of ``dataset`` (module docstring): ``segmentation_metrics`` plus ``variant``,
    ``grid`` [h, w] and ``num_images``. ``transform`` is the model's eval transform (PIL image → tensor)."""
    check_dense(encoder)
    check_variant(variant)
    classifier = build_classifier(encoder, tokenizer, dataset.classnames, dataset.templates, progress=progress)
    confusion, grid = 0, None
    batches = segmentation_batches(dataset, transform, batch_size, num_workers)
    for images, masks in tqdm(batches, desc=f"{dataset.root.name} zero-shot", disable=not progress, leave=False):
        embeddings = encoder.encode_image_dense(images, variant=variant, tokens=False).embeddings
        grid = list(embeddings.shape[1:3])
        confusion = confusion + score_patches(zero_shot_scores(embeddings, classifier), masks)
    metrics = segmentation_metrics(confusion, dataset.classnames)
    return {**metrics, "variant": variant, "grid": grid, "num_images": len(dataset)}


def _split_images(num_images: int, proportion: float, seed: int) -> torch.Tensor:
    """(num_images,) bool: True for the seeded validation images, at least one and at least one left to fit."""
    order = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed))
    num_val = min(max(1, round(proportion * num_images)), num_images - 1)
    is_val = torch.zeros(num_images, dtype=torch.bool)
    is_val[order[:num_val]] = True
    return is_val


def collect_patches(
    encoder,
    dataset: SegmentationSet,
    transform,
    max_patches: int,
    seed: int = 0,
    batch_size: int = 32,
    num_workers: int = 0,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The labelled patches' (N, C) features, (N,) targets and (N,) image index, at most ``max_patches`` of them
    spread evenly over the images (each image's share, or all it has, a seeded choice where it has more)."""
    if len(dataset) < 2:
        raise ValueError(f"{dataset.root} ({dataset.split} split): the probe needs two images or more to fit on")
    per_image = max(1, max_patches // len(dataset))
    generator = torch.Generator().manual_seed(seed)
    features, targets, images_of, start = [], [], [], 0
    batches = segmentation_batches(dataset, transform, batch_size, num_workers)
    for images, masks in tqdm(batches, desc=f"{dataset.root.name} {dataset.split}", disable=not progress, leave=False):
        tokens = encoder.encode_image_dense(images, embeddings=False).tokens.float().cpu()  # (B, h, w, C)
        labels = patch_labels(masks, tuple(tokens.shape[1:3]), len(dataset.classnames))
        for offset in range(len(images)):
            labelled = (labels[offset].flatten() != IGNORE).nonzero().squeeze(1)
            if len(labelled) > per_image:
                labelled = labelled[torch.randperm(len(labelled), generator=generator)[:per_image]].sort().values
            features.append(tokens[offset].flatten(0, 1)[labelled])
            targets.append(labels[offset].flatten()[labelled])
            images_of.append(torch.full((len(labelled),), start + offset))
        start += len(images)
    return torch.cat(features), torch.cat(targets), torch.cat(images_of)


def fit_patch_probe(
    features: torch.Tensor,
    targets: torch.Tensor,
    images_of: torch.Tensor,
    num_images: int,
    val_proportion: float = 0.2,
    seed: int = 0,
    max_iter: int = 1000,
    progress: bool = False,
) -> tuple[Probe, dict]:
    """The probe fitted on patches (C searched on the validation images' patches, then refitted on all) and the
    facts of its fit."""
    is_val = _split_images(num_images, val_proportion, seed)[images_of]
    with tqdm(desc="segmentation probe", unit="fit", disable=not progress, leave=False) as bar:
        best_c, tried = search_regularisation(
            features[~is_val], targets[~is_val], features[is_val], targets[is_val], max_iter, bar
        )
        probe = ProbeProblem(features, targets).fit(best_c, max_iter)
    facts = {
        "C": best_c,
        "val_patch_accuracy": tried[best_c],
        "num_train_patches": int((~is_val).sum()),
        "num_val_patches": int(is_val.sum()),
        "num_fits": len(tried) + 1,
        "validation_curve": {f"{c:.3g}": accuracy for c, accuracy in tried.items()},
    }
    return probe, facts


def probe_scores(probe: Probe, tokens: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, h, w, K) decision values of (B, h, w, C) patch features; ``ABSENT_SCORE`` for a class the fit lacked."""
    flat = tokens.reshape(-1, tokens.shape[-1]).float().cpu()
    scores = torch.full((len(flat), num_classes), ABSENT_SCORE, dtype=torch.float32)
    scores[:, probe.classes] = probe.decision(flat).float()
    return scores.view(*tokens.shape[:3], num_classes)


def linear_probe_segmentation(
    encoder,
    train: SegmentationSet,
    test: SegmentationSet,
    transform,
    max_train_patches: int = 100_000,
    val_proportion: float = 0.2,
    seed: int = 0,
    max_iter: int = 1000,
    batch_size: int = 32,
    num_workers: int = 0,
    progress: bool = False,
) -> dict:
    """Linear-probe segmentation: fit on ``train``'s patches, score ``test`` (module docstring).
    ``segmentation_metrics`` plus the fit's facts (``C``, ``val_patch_accuracy``, ``num_train_patches``,
    ``num_val_patches``, ``num_fits``, ``validation_curve``), ``grid``, ``num_images``, ``num_train_images``."""
    check_dense(encoder)
    if train.classnames != test.classnames:
        raise ValueError(
            f"segmentation probe: the train split's classes ({len(train.classnames)}, {train.root}) differ from the "
            f"test split's ({len(test.classnames)}, {test.root})"
        )
    num_classes = len(test.classnames)
    features, targets, images_of = collect_patches(
        encoder, train, transform, max_train_patches, seed, batch_size, num_workers, progress
    )
    probe, facts = fit_patch_probe(features, targets, images_of, len(train), val_proportion, seed, max_iter, progress)
    confusion, grid = 0, None
    batches = segmentation_batches(test, transform, batch_size, num_workers)
    for images, masks in tqdm(batches, desc=f"{test.root.name} {test.split}", disable=not progress, leave=False):
        tokens = encoder.encode_image_dense(images, embeddings=False).tokens
        grid = list(tokens.shape[1:3])
        confusion = confusion + score_patches(probe_scores(probe, tokens, num_classes), masks)
    metrics = segmentation_metrics(confusion, test.classnames)
    return {**metrics, **facts, "grid": grid, "num_images": len(test), "num_train_images": len(train)}
