"""Image↔text retrieval with several captions per image, with CLIP_benchmark's semantics.

``image_retrieval_recall@k``: the fraction of captions whose image is among the k images most
similar to the caption. ``text_retrieval_recall@k``: the fraction of images with at least one of
their captions among the k most similar captions.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from tqdm import tqdm

from clipforge.evaluation.encoder import Encoder, Tokenizer


@torch.no_grad()
def recall_at_k(scores: torch.Tensor, positives: torch.Tensor, k: int, chunk: int = 1024) -> float:
    """Fraction of rows of ``scores`` (Q, N) with a positive (bool (Q, N)) among their top k."""
    hits = 0
    for start in range(0, scores.shape[0], chunk):
        topk = scores[start : start + chunk].topk(min(k, scores.shape[1]), dim=1).indices
        hits += positives[start : start + chunk].gather(1, topk).any(dim=1).sum().item()
    return hits / scores.shape[0]


@torch.no_grad()
def retrieval(encoder: Encoder, tokenizer: Tokenizer, loader: Iterable, recall_k: tuple[int, ...] = (1, 5, 10),
              progress: bool = False, text_batch_size: int = 512) -> dict:
    """Evaluate on batches of (images, list of caption lists)."""
    image_features, captions, caption_image = [], [], []
    for images, batch_captions in tqdm(loader, desc="retrieval", disable=not progress, leave=False):
        offset = sum(len(f) for f in image_features)
        image_features.append(encoder.encode_image(images))
        for index, texts in enumerate(batch_captions):
            captions.extend(texts)
            caption_image.extend([offset + index] * len(texts))
    images_emb = torch.cat(image_features)  # (N_images, D)
    texts_emb = torch.cat([encoder.encode_text(tokenizer(captions[start : start + text_batch_size]))
                           for start in range(0, len(captions), text_batch_size)])  # (N_texts, D)
    scores = texts_emb @ images_emb.T  # (N_texts, N_images)
    positives = torch.zeros_like(scores, dtype=torch.bool)
    positives[torch.arange(len(captions)), torch.tensor(caption_image)] = True
    metrics = {}
    for k in recall_k:
        metrics[f"image_retrieval_recall@{k}"] = recall_at_k(scores, positives, k)
        metrics[f"text_retrieval_recall@{k}"] = recall_at_k(scores.T, positives.T, k)
    metrics["num_images"], metrics["num_texts"] = len(images_emb), len(captions)
    return metrics
