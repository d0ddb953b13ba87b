"""Referring expressions: pick the box an expression names among an image's object boxes, from dense features.

The set is ``clipforge.evaluation.dense_datasets``' referring layout: per expression, the image, the true box and
every object's box in the image (``candidates``: RefCOCO's ground-truth-proposal setting). Boxes are put on the
model's crop by that module's resizing rule (scaled and offset as the image's resize and centre crop, clipped to
the crop).

A candidate's score: the mean of the patch embeddings (``DenseFeatures.embeddings``, L2-normalised, ``variant``
"maskclip" or "plain": ``clipforge.evaluation.dense``) whose patch centre lies inside the box (x0 ≤ x < x1,
y0 ≤ y < y1, in crop pixels), or, when no centre does, the embedding of the patch holding the box's centre; its
cosine with the expression's text embedding (the expression as written, no template). The highest score is the
pick (the first candidate on a tie). ``accuracy``: the fraction of expressions whose pick has IoU > 0.5 with the
true box (IoU in the stored image's pixels, x1/y1 exclusive). ``chance``: the mean over expressions of the
fraction of their candidates with IoU > 0.5 with the true box (a pick at random among the candidates).

Patch (i, j) of an h × w grid on an S_w × S_h crop is centred at ((j + 0.5) S_w / w, (i + 0.5) S_h / h).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm import tqdm

from clipforge.evaluation.dense import DEFAULT_VARIANT, check_dense, check_variant
from clipforge.evaluation.dense_datasets import CropGeometry, ReferringSet, referring_batches
from clipforge.evaluation.encoder import Tokenizer

IOU_THRESHOLD = 0.5


def box_iou(boxes: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """(N,) IoU of (N, 4) xyxy boxes with one (4,) box (x1/y1 exclusive: area = (x1 - x0)(y1 - y0))."""
    boxes, box = boxes.double(), box.double()
    width = (torch.minimum(boxes[:, 2], box[2]) - torch.maximum(boxes[:, 0], box[0])).clamp(min=0)
    height = (torch.minimum(boxes[:, 3], box[3]) - torch.maximum(boxes[:, 1], box[1])).clamp(min=0)
    intersection = width * height
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return intersection / (areas + (box[2] - box[0]) * (box[3] - box[1]) - intersection)


def box_features(embeddings: torch.Tensor, boxes: torch.Tensor, crop_size: tuple[int, int]) -> torch.Tensor:
    """(M, D) normalised mean patch embedding of each of (M, 4) crop-pixel boxes, from (h, w, D) embeddings of a
    crop of ``crop_size`` (width, height) (module docstring)."""
    grid_h, grid_w, _ = embeddings.shape
    crop_w, crop_h = crop_size
    centre_x = (torch.arange(grid_w, dtype=torch.float64) + 0.5) * crop_w / grid_w  # (w,)
    centre_y = (torch.arange(grid_h, dtype=torch.float64) + 0.5) * crop_h / grid_h  # (h,)
    boxes = boxes.double()
    inside_x = (centre_x[None] >= boxes[:, 0:1]) & (centre_x[None] < boxes[:, 2:3])  # (M, w)
    inside_y = (centre_y[None] >= boxes[:, 1:2]) & (centre_y[None] < boxes[:, 3:4])  # (M, h)
    inside = (inside_y[:, :, None] & inside_x[:, None, :]).flatten(1).to(embeddings.dtype)  # (M, h·w)
    flat = embeddings.reshape(grid_h * grid_w, -1)
    sums = inside @ flat  # (M, D)
    counts = inside.sum(dim=1, keepdim=True)
    # no centre inside: the patch that holds the box's centre
    column = ((boxes[:, 0] + boxes[:, 2]) / 2 * grid_w / crop_w).floor().long().clamp(0, grid_w - 1)
    row = ((boxes[:, 1] + boxes[:, 3]) / 2 * grid_h / crop_h).floor().long().clamp(0, grid_h - 1)
    fallback = flat[row * grid_w + column]
    means = torch.where(counts > 0, sums / counts.clamp(min=1), fallback)
    return F.normalize(means, dim=-1)


def referring_metrics(picked_ious: list[float], candidate_ious: list[torch.Tensor]) -> dict:
    """``accuracy`` from each expression's pick's IoU with the true box, ``chance`` from every candidate's."""
    if not picked_ious:
        raise ValueError("referring expressions: no expression to score")
    hits = sum(iou > IOU_THRESHOLD for iou in picked_ious)
    chance = sum((ious > IOU_THRESHOLD).double().mean().item() for ious in candidate_ious) / len(candidate_ious)
    return {"accuracy": hits / len(picked_ious), "chance": chance, "num_samples": len(picked_ious)}


@torch.no_grad()
def encode_expressions(encoder, tokenizer: Tokenizer, expressions: list[str], batch_size: int = 256) -> torch.Tensor:
    """(N, D) normalised text embeddings of the expressions, as written."""
    return torch.cat(
        [
            encoder.encode_text(tokenizer(expressions[start : start + batch_size])).float().cpu()
            for start in range(0, len(expressions), batch_size)
        ]
    )


def referring_expressions(
    encoder,
    tokenizer: Tokenizer,
    dataset: ReferringSet,
    transform,
    variant: str = DEFAULT_VARIANT,
    batch_size: int = 32,
    num_workers: int = 0,
    progress: bool = False,
) -> dict:
    """Score every expression of ``dataset`` (module docstring): ``accuracy``, ``chance``, ``num_samples``,
    ``num_images``, ``variant``, ``grid`` [h, w]. Each image is encoded once for all its expressions."""
    check_dense(encoder)
    check_variant(variant)
    geometry = CropGeometry(transform)
    texts = encode_expressions(encoder, tokenizer, [sample.expression for sample in dataset.samples])
    paths = dataset.image_paths()
    samples_of: dict = {path: [] for path in paths}
    for index, sample in enumerate(dataset.samples):
        samples_of[sample.image].append(index)
    picked_ious, candidate_ious, done, grid = [], [], 0, None
    batches = referring_batches(paths, transform, batch_size, num_workers)
    for images, sizes in tqdm(batches, desc=f"{dataset.root.name} referring", disable=not progress, leave=False):
        embeddings = encoder.encode_image_dense(images, variant=variant, tokens=False).embeddings.float().cpu()
        grid = list(embeddings.shape[1:3])
        crop_size = (images.shape[-1], images.shape[-2])
        for offset, (width, height) in enumerate(sizes.tolist()):
            for index in samples_of[paths[done + offset]]:
                sample = dataset.samples[index]
                candidates = torch.tensor(sample.candidates, dtype=torch.float64)
                on_crop = torch.from_numpy(geometry.boxes(candidates.numpy(), width, height))
                scores = box_features(embeddings[offset], on_crop, crop_size) @ texts[index]
                ious = box_iou(candidates, torch.tensor(sample.box, dtype=torch.float64))
                picked_ious.append(ious[scores.argmax()].item())
                candidate_ious.append(ious)
        done += len(images)
    metrics = referring_metrics(picked_ious, candidate_ious)
    return {**metrics, "num_images": len(paths), "variant": variant, "grid": grid}
