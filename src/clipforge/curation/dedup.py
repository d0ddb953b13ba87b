"""Near-duplicate removal by image embedding: greedy, best first, with an exact nearest-neighbour search.

Samples are visited in the given order (``prep filter`` passes them by CLIP score, best first); a sample is dropped
when a sample already kept has cosine similarity ≥ ``threshold`` with it (SemDeDup-style, Abbas et al. 2023, with
the greedy rule of DataComp's deduplication). The search is exact: each block of ``block`` new embeddings is
compared with every embedding kept so far, and then greedily among itself.

Backends: ``faiss`` (an ``IndexFlatIP`` that grows as samples are kept: BLAS inner products, several times
faster than numpy on large sets; ``pip install faiss-cpu``, the ``curation`` extra) or ``blocks`` (numpy matrix
products, no dependency). Both keep exactly the same samples. ``auto`` takes faiss when it imports. Memory: the
kept embeddings (N × D float32) plus a block × N similarity matrix for ``blocks``.
"""

from __future__ import annotations

import numpy as np

BACKENDS = ("auto", "faiss", "blocks")


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _within_block(similarity: np.ndarray, candidates: np.ndarray, threshold: float) -> np.ndarray:
    """Greedy keep mask of a block's rows, in order: a row goes if an earlier kept row of the block is too close."""
    keep = candidates.copy()
    for row in range(len(keep)):
        if keep[row]:
            later = similarity[row, row + 1 :] >= threshold
            keep[row + 1 :] &= ~later
    return keep


def near_duplicates(embeddings: np.ndarray, threshold: float, backend: str = "auto", block: int = 4096) -> np.ndarray:
    """Keep mask (N,) over ``embeddings`` (N, D), L2-normalised, visited in row order."""
    if backend not in BACKENDS:
        raise ValueError(f"--dedup-backend: {backend!r} is not one of {BACKENDS}")
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"--dedup-threshold: a cosine in [-1, 1], got {threshold}")
    if backend == "faiss" and not faiss_available():
        raise ValueError("--dedup-backend faiss: faiss does not import here (pip install faiss-cpu)")
    use_faiss = backend == "faiss" or (backend == "auto" and faiss_available())
    vectors = np.ascontiguousarray(embeddings, dtype=np.float32)
    count, width = vectors.shape
    keep = np.zeros(count, dtype=bool)
    if use_faiss:
        import faiss

        index = faiss.IndexFlatIP(width)
    kept_rows: list[np.ndarray] = []
    for start in range(0, count, block):
        chunk = vectors[start : start + block]  # (b, D)
        if use_faiss:
            if index.ntotal:
                nearest, _ = index.search(chunk, 1)  # (b, 1)
                candidates = nearest[:, 0] < threshold
            else:
                candidates = np.ones(len(chunk), dtype=bool)
        else:
            candidates = np.ones(len(chunk), dtype=bool)
            for kept in kept_rows:  # (k, D) blocks already kept
                candidates &= (chunk @ kept.T).max(axis=1) < threshold  # (b, k) → (b,)
        block_keep = _within_block(chunk @ chunk.T, candidates, threshold)
        keep[start : start + len(chunk)] = block_keep
        if block_keep.any():
            if use_faiss:
                index.add(chunk[block_keep])
            else:
                kept_rows.append(chunk[block_keep])
    return keep
