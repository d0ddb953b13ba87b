"""Zero-shot classification with CLIP_benchmark's semantics.

The classifier has one column per class: the mean of the L2-normalised embeddings of every
template filled with the class name, renormalised. An image's logits are 100 × its normalised
embedding times the classifier. Metrics: top-1 and top-5 accuracy, and mean per-class recall
(balanced accuracy over the classes present in the labels), plus per-class accuracy.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from clipforge.evaluation.encoder import Encoder, Tokenizer


@torch.no_grad()
def build_classifier(encoder: Encoder, tokenizer: Tokenizer, classnames: list[str], templates: list[str],
                     batch_size: int = 256) -> torch.Tensor:
    """(D, C) zero-shot classifier from class names × templates (templates use ``{c}``)."""
    texts = [template.replace("{c}", name) for name in classnames for template in templates]
    embeddings = torch.cat([encoder.encode_text(tokenizer(texts[start : start + batch_size]))
                            for start in range(0, len(texts), batch_size)])  # (C * T, D)
    embeddings = embeddings.view(len(classnames), len(templates), -1).mean(dim=1)  # (C, D)
    return F.normalize(embeddings, dim=-1).T


@torch.no_grad()
def embed_images(encoder: Encoder, loader: Iterable, progress: bool = False, desc: str = "images"):
    """Concatenated (N, D) image embeddings and the targets, one pass over ``loader``."""
    features, targets = [], []
    for images, batch_targets in tqdm(loader, desc=desc, disable=not progress, leave=False):
        features.append(encoder.encode_image(images))
        if isinstance(batch_targets, torch.Tensor):
            targets.append(batch_targets)
        else:
            targets.extend(batch_targets)
    labels = torch.cat(targets) if targets and isinstance(targets[0], torch.Tensor) else targets
    return torch.cat(features), labels


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """top-1/top-5 accuracy, mean per-class recall and per-class accuracy from (N, C) logits."""
    labels = labels.to(logits.device)
    k = min(5, num_classes)
    topk = logits.topk(k, dim=1).indices  # (N, k)
    correct = topk.eq(labels[:, None])
    predictions = topk[:, 0]
    per_class = {}
    for cls in range(num_classes):
        mask = labels == cls
        if mask.any():
            per_class[cls] = (predictions[mask] == cls).sum().item() / mask.sum().item()
    return {
        "acc1": correct[:, :1].any(dim=1).sum().item() / len(labels),
        "acc5": correct.any(dim=1).sum().item() / len(labels),
        "mean_per_class_recall": sum(per_class.values()) / len(per_class),
        "per_class_accuracy": per_class,
    }


def zero_shot_classification(encoder: Encoder, tokenizer: Tokenizer, loader: Iterable, classnames: list[str],
                             templates: list[str], progress: bool = False) -> dict:
    """Evaluate on batches of (images, labels): see module docstring for the metrics."""
    classifier = build_classifier(encoder, tokenizer, classnames, templates)
    image_features, labels = embed_images(encoder, loader, progress)
    logits = 100.0 * image_features @ classifier  # (N, C)
    metrics = classification_metrics(logits, labels, len(classnames))
    metrics["per_class_accuracy"] = {classnames[c]: v for c, v in metrics["per_class_accuracy"].items()}
    metrics["num_samples"] = len(labels)
    return metrics
