"""The data the embedding plots of ``clipforge eval --embedding-plots`` draw (``clipforge.evaluation.plots``): a 2-D
t-SNE of image and class embeddings, and the cosine similarities of paired embeddings (a block of them and the
positive and negative histograms). Computed with the evaluation and saved in the results JSON, so the plots can be
redrawn without the model."""

from __future__ import annotations

import torch


def project_embeddings(
    features: torch.Tensor, labels: torch.Tensor, classifier: torch.Tensor, max_images: int = 1000, seed: int = 0
) -> dict:
    """A 2-D t-SNE of (up to ``max_images``, evenly spaced) image embeddings together with the class text
    embeddings (``classifier``, (D, C)), for the projection plot."""
    from sklearn.manifold import TSNE

    keep = torch.linspace(0, len(features) - 1, min(max_images, len(features))).round().long().unique()
    points = torch.cat([features[keep], classifier.T.cpu().float()]).numpy()
    perplexity = float(min(30.0, max(2.0, (len(points) - 1) / 3)))
    xy = TSNE(n_components=2, init="pca", perplexity=perplexity, random_state=seed).fit_transform(points)
    return {
        "method": "t-SNE",
        "image_xy": xy[: len(keep)].round(4).tolist(),
        "image_labels": labels[keep].tolist(),
        "class_xy": xy[len(keep) :].round(4).tolist(),
    }


def similarity_diagnostics(image: torch.Tensor, text: torch.Tensor, sample: int = 32, bins: int = 50) -> dict:
    """Cosine similarities of paired embeddings: the (sample × sample) block of the first pairs, and histograms
    of positive (diagonal) against negative (off-diagonal) similarities, for the heatmap and histogram plots."""
    similarity = image @ text.T
    diagonal = torch.eye(len(image), dtype=torch.bool)
    edges = torch.linspace(-1, 1, bins + 1)
    return {
        "similarity_sample": similarity[:sample, :sample].round(decimals=4).tolist(),
        "similarity_histogram": {
            "edges": edges.tolist(),
            "positive": torch.histc(similarity[diagonal], bins, -1, 1).long().tolist(),
            "negative": torch.histc(similarity[~diagonal], bins, -1, 1).long().tolist(),
        },
    }
