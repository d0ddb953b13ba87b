"""Linear probe: L2-regularised logistic regression on frozen image embeddings (CLIP paper, appendix A.3).

As Radford et al. (2021) do it: scikit-learn's ``LogisticRegression`` (L-BFGS, up to 1,000
iterations) on the features of the train split; the inverse regularisation strength C is chosen on
a validation split — the dataset's own, or a seeded stratified ``val_proportion`` of train — by a
search over 97 log-spaced values from 1e-6 to 1e6 (the paper's 96 steps): seven coarse values, then
around the best one at spans 8, 4, 2, 1 grid steps (CLIP_benchmark's search, ties to the stronger
regularisation). The model is then refitted on train + validation with that C and scored on the
test split: top-1, top-5 (None below 5 classes), mean per-class recall.

Why scikit-learn rather than CLIP_benchmark's torch probe: the objective is convex and L-BFGS finds
its optimum deterministically, with no learning rate, epochs or batch order to tune or to make
results depend on; CLIP_benchmark's probe is AdamW on CUDA only (it asserts ``device == 'cuda'``).
Features are the L2-normalised embeddings (CLIP_benchmark's ``normalize=True``).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from clipforge.evaluation.zeroshot import classification_metrics

C_GRID = np.logspace(-6, 6, 97)
COARSE_STEP = 16  # seven coarse points: 1e-6, 1e-4, ..., 1e6


def _fit(features: np.ndarray, labels: np.ndarray, c: float, max_iter: int):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=c, max_iter=max_iter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # very weak regularisation on separable data
        model.fit(features, labels)
    return model


def _logits(model, features: np.ndarray, num_classes: int) -> torch.Tensor:
    """(N, num_classes) decision values; classes absent from the fit get -inf."""
    scores = model.decision_function(features)
    if scores.ndim == 1:  # two classes seen: scikit-learn returns the positive class's score only
        scores = np.stack([-scores, scores], axis=1)
    logits = torch.full((len(features), num_classes), -float("inf"), dtype=torch.float64)
    logits[:, torch.as_tensor(model.classes_)] = torch.as_tensor(scores, dtype=torch.float64)
    return logits


def search_regularisation(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    val_features: np.ndarray,
    val_labels: np.ndarray,
    max_iter: int = 1000,
) -> tuple[float, dict[float, float]]:
    """The C with the best validation accuracy, and every C tried → its validation accuracy."""
    tried: dict[int, float] = {}

    def accuracy(index: int) -> float:
        if index not in tried:
            model = _fit(train_features, train_labels, C_GRID[index], max_iter)
            tried[index] = float((model.predict(val_features) == val_labels).mean())
        return tried[index]

    def best_of(indices) -> int:
        best = None
        for index in indices:  # in increasing C: ties go to the stronger regularisation
            if best is None or accuracy(index) > accuracy(best):
                best = index
        return best

    peak = best_of(range(0, len(C_GRID), COARSE_STEP))
    span = COARSE_STEP // 2
    while span > 0:
        peak = best_of(sorted({max(peak - span, 0), peak, min(peak + span, len(C_GRID) - 1)}))
        span //= 2
    return float(C_GRID[peak]), {float(C_GRID[index]): acc for index, acc in sorted(tried.items())}


def _split_validation(labels: np.ndarray, proportion: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    indices = np.arange(len(labels))
    counts = np.bincount(labels)
    stratify = labels if counts[counts > 0].min() >= 2 else None
    train, val = train_test_split(indices, test_size=proportion, random_state=seed, stratify=stratify)
    return np.sort(train), np.sort(val)


def fit_linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    val_features: torch.Tensor | None = None,
    val_labels: torch.Tensor | None = None,
    val_proportion: float = 0.2,
    seed: int = 0,
    max_iter: int = 1000,
) -> tuple[torch.Tensor, dict]:
    """The probe's (N_test, num_classes) decision values on the test features (-inf for a class absent from the
    fit), and the facts of its fit: C, val_acc1, split sizes, the validation curve."""
    x_train, y_train = train_features.double().numpy(), train_labels.numpy()
    if val_features is None:
        train_part, val_part = _split_validation(y_train, val_proportion, seed)
        x_fit, y_fit, x_val, y_val = x_train[train_part], y_train[train_part], x_train[val_part], y_train[val_part]
    else:
        x_fit, y_fit = x_train, y_train
        x_val, y_val = val_features.double().numpy(), val_labels.numpy()
    best_c, tried = search_regularisation(x_fit, y_fit, x_val, y_val, max_iter)
    final = _fit(np.concatenate([x_fit, x_val]), np.concatenate([y_fit, y_val]), best_c, max_iter)
    x_test = test_features.double().numpy()
    facts = {
        "C": best_c,
        "val_acc1": tried[best_c],
        "num_train": len(x_fit),
        "num_val": len(x_val),
        "num_samples": len(x_test),
        "num_fits": len(tried) + 1,
        "validation_curve": {f"{c:.3g}": acc for c, acc in tried.items()},
    }
    return _logits(final, x_test, num_classes), facts


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    val_features: torch.Tensor | None = None,
    val_labels: torch.Tensor | None = None,
    val_proportion: float = 0.2,
    seed: int = 0,
    max_iter: int = 1000,
) -> dict:
    """Probe metrics (see module docstring) from (N, D) features and (N,) labels of each split."""
    logits, facts = fit_linear_probe(
        train_features,
        train_labels,
        test_features,
        num_classes,
        val_features,
        val_labels,
        val_proportion,
        seed,
        max_iter,
    )
    return {**classification_metrics(logits, test_labels, num_classes), **facts}
