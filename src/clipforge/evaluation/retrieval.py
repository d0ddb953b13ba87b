"""Image↔text retrieval with several captions per image, with CLIP_benchmark's semantics.

``image_retrieval_recall@k`` (text→image): the fraction of captions whose image is among the k
images most similar to the caption. ``text_retrieval_recall@k`` (image→text): the fraction of
images with at least one of their captions among the k most similar captions. These are
``clip_benchmark.metrics.zeroshot_retrieval``'s numbers (it computes them in float32, so they agree
to ~1e-7; the hit counts are identical). ``examples`` lists, for a few caption queries, the top
retrieved images (for the report's grid).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from tqdm import tqdm

from clipforge.evaluation.encoder import Encoder, Tokenizer
from clipforge.evaluation.zeroshot import embed_images


@torch.no_grad()
def recall_at_k(scores: torch.Tensor, positives: torch.Tensor, k: int, chunk: int = 1024) -> float:
    """Fraction of rows of ``scores`` (Q, N) with a positive (bool (Q, N)) among their top k."""
    hits = 0
    for start in range(0, scores.shape[0], chunk):
        topk = scores[start : start + chunk].topk(min(k, scores.shape[1]), dim=1).indices
        hits += positives[start : start + chunk].gather(1, topk).any(dim=1).sum().item()
    return hits / scores.shape[0]


@torch.no_grad()
def embed_captions(
    encoder: Encoder,
    tokenizer: Tokenizer,
    captions: list[list[str]],
    text_batch_size: int = 512,
    progress: bool = False,
) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """(T, D) embeddings of every caption, the flat captions, and each caption's image index (T,)."""
    texts = [text for image_texts in captions for text in image_texts]
    caption_image = torch.tensor([index for index, image_texts in enumerate(captions) for _ in image_texts])
    starts = range(0, len(texts), text_batch_size)
    embeddings = torch.cat(
        [
            encoder.encode_text(tokenizer(texts[start : start + text_batch_size])).cpu()
            for start in tqdm(starts, desc="captions", disable=not progress, leave=False)
        ]
    )
    return embeddings, texts, caption_image


def retrieval_metrics(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    caption_image: torch.Tensor,
    recall_k: tuple[int, ...] = (1, 5, 10),
) -> dict:
    """Recalls from (N_images, D) and (N_texts, D) normalised embeddings; caption_image (N_texts,)."""
    scores = text_features @ image_features.T  # (N_texts, N_images)
    positives = torch.zeros_like(scores, dtype=torch.bool)
    positives[torch.arange(len(caption_image)), caption_image] = True
    metrics = {}
    for k in recall_k:
        metrics[f"image_retrieval_recall@{k}"] = recall_at_k(scores, positives, k)
        metrics[f"text_retrieval_recall@{k}"] = recall_at_k(scores.T, positives.T, k)
    metrics["num_images"], metrics["num_texts"] = len(image_features), len(text_features)
    return metrics


def retrieval_examples(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    texts: list[str],
    caption_image: torch.Tensor,
    num_queries: int = 6,
    k: int = 5,
) -> list[dict]:
    """Top-k images for ``num_queries`` captions spread over the set (first caption of evenly spaced images)."""
    num_images = len(image_features)
    first_caption = {}
    for text_index, image in enumerate(caption_image.tolist()):
        first_caption.setdefault(image, text_index)
    images = sorted({round(i * (num_images - 1) / max(1, num_queries - 1)) for i in range(num_queries)})
    examples = []
    for image in images:
        if image not in first_caption:
            continue
        text_index = first_caption[image]
        top = (text_features[text_index] @ image_features.T).topk(min(k, num_images)).indices.tolist()
        examples.append({"caption": texts[text_index], "image": image, "top_images": top})
    return examples


@torch.no_grad()
def retrieval(
    encoder: Encoder,
    tokenizer: Tokenizer,
    loader: Iterable,
    recall_k: tuple[int, ...] = (1, 5, 10),
    progress: bool = False,
    text_batch_size: int = 512,
) -> dict:
    """Evaluate on batches of (images, list of caption lists)."""
    image_features, captions = embed_images(encoder, loader, progress, desc="retrieval images")
    text_features, texts, caption_image = embed_captions(encoder, tokenizer, captions, text_batch_size, progress)
    metrics = retrieval_metrics(image_features, text_features, caption_image, recall_k)
    metrics["examples"] = retrieval_examples(image_features, text_features, texts, caption_image)
    return metrics
