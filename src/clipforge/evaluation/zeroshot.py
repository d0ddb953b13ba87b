"""Zero-shot classification with CLIP_benchmark's semantics.

The classifier has one column per class: the mean of the L2-normalised embeddings of every
template filled with the class name, renormalised; templates may also be a
{class name: [prompts]} dict (class-specific prompts, as CuPL's). A template's placeholder is ``{c}``
(CLIP_benchmark's and open_clip's) or ``{}`` (transformers' zero-shot pipeline's); a template with
neither would give every class the same text, so scores would sit at chance: ``check_templates`` refuses
it, naming it. An image's logits are 100 × its
normalised embedding times the classifier. Metrics, as ``clip_benchmark.metrics.zeroshot_classification``
computes them: top-1 and top-5 accuracy (top-5 is None below 5 classes, where CLIP_benchmark gives
NaN), mean per-class recall (balanced accuracy over the classes present in the labels), plus
per-class accuracy and the number of samples.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from clipforge.evaluation.encoder import Encoder, Tokenizer

log = logging.getLogger(__name__)
PLACEHOLDER = re.compile(r"\{c?\}")  # {c} or {}


def check_templates(templates: list[str] | dict[str, list[str]], where: str) -> None:
    """Refuse an empty template list, and templates that are not text or lack a placeholder, naming them and
    ``where`` they came from. Class-specific prompts (a dict) are whole prompts and are not checked."""
    if isinstance(templates, dict):
        return
    if not templates:
        raise ValueError(f"{where}: no templates")
    bad = [template for template in templates if not isinstance(template, str) or not PLACEHOLDER.search(template)]
    if bad:
        named = ", ".join(repr(template) for template in bad[:5]) + (
            f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        )
        raise ValueError(
            f"{where}: {'template' if len(bad) == 1 else 'templates'} {named} "
            f"{'has' if len(bad) == 1 else 'have'} no class-name placeholder: write {{c}} (or {{}}) where the "
            "class name goes, e.g. 'a photo of a {c}.'"
        )


def fill(template: str, classname: str) -> str:
    """The template with every ``{c}`` and ``{}`` replaced by the class name (braces in the name stay as they are)."""
    return PLACEHOLDER.sub(lambda _: classname, template)


def class_prompts(classnames: list[str], templates: list[str] | dict[str, list[str]]) -> list[list[str]]:
    if isinstance(templates, dict):
        missing = [name for name in classnames if name not in templates]
        if missing:
            raise ValueError(f"class-specific templates lack the classes {missing[:5]}")
        return [list(templates[name]) for name in classnames]
    return [[fill(template, name) for template in templates] for name in classnames]


@torch.no_grad()
def build_classifier(
    encoder: Encoder,
    tokenizer: Tokenizer,
    classnames: list[str],
    templates: list[str] | dict[str, list[str]],
    batch_size: int = 256,
    progress: bool = False,
) -> torch.Tensor:
    """(D, C) zero-shot classifier from class names × templates."""
    prompts = class_prompts(classnames, templates)
    texts = [text for class_texts in prompts for text in class_texts]
    starts = range(0, len(texts), batch_size)
    embeddings = torch.cat(
        [
            encoder.encode_text(tokenizer(texts[start : start + batch_size]))
            for start in tqdm(starts, desc="text classifier", disable=not progress, leave=False)
        ]
    )
    columns, offset = [], 0  # (C_texts, D) per class → mean → (D,)
    for class_texts in prompts:
        columns.append(embeddings[offset : offset + len(class_texts)].mean(dim=0))
        offset += len(class_texts)
    return F.normalize(torch.stack(columns), dim=-1).T


@torch.no_grad()
def embed_images(
    encoder: Encoder,
    loader: Iterable,
    progress: bool = False,
    desc: str = "images",
    skipped: list[tuple[int, str]] | None = None,
):
    """Concatenated (N, D) image embeddings and the targets (labels (N,) or N caption lists), one pass.

    ``loader`` yields (images, targets) or, as ``benchmark_loader`` does, (images, targets, skipped) where skipped
    lists the (index, note) of each image that did not decode: those are left out of N, logged as one warning
    naming the first few, and appended to ``skipped`` when it is given. None decoding is a ValueError."""
    features, targets, missed, total = [], [], [], 0
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False, unit="batch"):
        images, batch_targets = batch[0], batch[1]
        if len(batch) > 2:
            missed.extend(batch[2])
        if images is None:
            continue
        total += len(images)
        features.append(encoder.encode_image(images).cpu())
        if isinstance(batch_targets, torch.Tensor):
            targets.append(batch_targets)
        else:
            targets.extend(batch_targets)
    if missed:
        named = "; ".join(note for _, note in missed[:5]) + ("; ..." if len(missed) > 5 else "")
        if not features:
            raise ValueError(f"{desc}: none of the {len(missed):,} images could be read: {named}")
        log.warning(
            "%s: %d of %d images could not be read and were skipped (the metrics count the %d that were): %s",
            desc,
            len(missed),
            len(missed) + total,
            total,
            named,
        )
        if skipped is not None:
            skipped.extend(missed)
    labels = torch.cat(targets) if targets and isinstance(targets[0], torch.Tensor) else targets
    return torch.cat(features), labels


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """top-1/top-5 accuracy, mean per-class recall and per-class accuracy (class index → value) from (N, C) logits."""
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
        "acc5": correct.any(dim=1).sum().item() / len(labels) if num_classes >= 5 else None,
        "mean_per_class_recall": sum(per_class.values()) / len(per_class),
        "per_class_accuracy": per_class,
    }


def zero_shot_logits(image_features: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """(N, C) logits: 100 × the cosine similarity of each (N, D) normalised image embedding with each class."""
    return 100.0 * image_features @ classifier.to(image_features.device)


def classify(
    image_features: torch.Tensor, labels: torch.Tensor, classifier: torch.Tensor, classnames: list[str]
) -> dict:
    """Metrics of (N, D) normalised image embeddings against a (D, C) classifier."""
    logits = zero_shot_logits(image_features, classifier)  # (N, C)
    metrics = classification_metrics(logits, labels, len(classnames))
    metrics["per_class_accuracy"] = {classnames[c]: v for c, v in metrics["per_class_accuracy"].items()}
    metrics["num_samples"] = len(labels)
    return metrics


def zero_shot_classification(
    encoder: Encoder,
    tokenizer: Tokenizer,
    loader: Iterable,
    classnames: list[str],
    templates: list[str] | dict[str, list[str]],
    progress: bool = False,
) -> dict:
    """Evaluate on batches of (images, labels): see module docstring for the metrics."""
    classifier = build_classifier(encoder, tokenizer, classnames, templates, progress=progress)
    image_features, labels = embed_images(encoder, loader, progress)
    return classify(image_features, labels, classifier, classnames)
