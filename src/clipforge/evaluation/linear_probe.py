"""Linear probe: L2-regularised logistic regression on frozen image embeddings (CLIP paper, appendix A.3).

As Radford et al. (2021) do it: the inverse regularisation strength C is chosen on a validation split —
the dataset's own, or a seeded stratified ``val_proportion`` of train — by a search over 97 log-spaced
values from 1e-6 to 1e6 (the paper's 96 steps): seven coarse values, then around the best one at spans
8, 4, 2, 1 grid steps (CLIP_benchmark's search, ties to the stronger regularisation). The model is then
refitted on train + validation with that C and scored on the test split: top-1, top-5 (None below 5
classes), mean per-class recall.

Each fit minimises scikit-learn's ``LogisticRegression`` objective (multinomial; binomial for two
classes): mean cross-entropy + ‖W‖² / (2 C N), intercept unpenalised, from zero weights. L-BFGS finds its
optimum deterministically, with no learning rate, epochs or batch order to tune (CLIP_benchmark's probe
is AdamW on CUDA only). The features (the L2-normalised embeddings, CLIP_benchmark's ``normalize=True``)
are prepared once per split and kept in float32: centred (the intercept absorbs the mean) and rotated
onto the principal axes of the centred features (which keeps ‖W‖), both exact. Each fit runs torch's
L-BFGS (float64 weights and loss) on those axes scaled by 1 / sqrt(s² / 4N + 1 / CN), s the axis's
singular value, which brings the Hessian's diagonal near one. CLIP embeddings lie in a narrow cone (Liang
et al. 2022, "Mind the Gap") and their spectrum falls fast, so unscaled L-BFGS (scikit-learn's) takes
hundreds of iterations per fit at weak regularisation and stops, at its default tolerance (1e-4), where a
few predictions still depend on the path it took; scaled, it reaches the optimum in tens to a few hundred
(figures: docs/benchmarks.md). Where classes nearly separate at weak regularisation, either can run to
``max_iter``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from clipforge.evaluation.zeroshot import classification_metrics

C_GRID = np.logspace(-6, 6, 97)
COARSE_STEP = 16  # seven coarse points: 1e-6, 1e-4, ..., 1e6
MAX_FITS = len(C_GRID[::COARSE_STEP]) + 2 * 4 + 1  # coarse points, at most two new per span (8, 4, 2, 1), the refit
# Largest gradient component in the scaled coordinates, where the Hessian is about the identity: decision values
# within 0.2% of the optimum's on the tests' clusters (tests/test_evaluation_probe.py); where float32 features
# resolve less (weak regularisation), a fit ends where its line search can gain no more.
TOLERANCE = 1e-7


class Probe:
    """A fitted linear classifier: decision values (N, num_outputs) = features @ ``weights`` + ``bias``, over
    ``classes`` (two classes: one output, the second class's score)."""

    def __init__(self, weights: torch.Tensor, bias: torch.Tensor, classes: torch.Tensor) -> None:
        self.weights, self.bias, self.classes = weights, bias, classes  # (D, num_outputs), (num_outputs,), (K,)

    def decision(self, features: torch.Tensor) -> torch.Tensor:
        """(N, K) decision values of (N, D) features (two classes: the score s as [-s, s], as scikit-learn's
        ``decision_function`` gives s)."""
        scores = features.double() @ self.weights + self.bias
        return torch.cat([-scores, scores], dim=1) if len(self.classes) == 2 else scores

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        return self.classes[self.decision(features).argmax(dim=1)]


class ProbeProblem:
    """One split's features and labels, prepared once for fits at any C: centred, rotated onto the principal
    axes of the centred features (eigenvectors of their Gram matrix, so D × D memory whatever N) and kept in
    ``dtype``; labels as indices into ``classes`` (the labels present)."""

    def __init__(self, features, labels, dtype: torch.dtype = torch.float32) -> None:
        features = torch.as_tensor(features).to(dtype)  # (N, D)
        self.classes, self.targets = torch.unique(torch.as_tensor(labels), return_inverse=True)
        if len(self.classes) < 2:
            raise ValueError(f"linear probe: the training split has one class ({self.classes.tolist()}); it needs two")
        self.mean = features.mean(dim=0)  # (D,)
        centred = features - self.mean
        eigenvalues, self.axes = torch.linalg.eigh(centred.T @ centred)  # (D,), (D, D) orthonormal columns
        # Only the conditioning depends on these values, never the optimum: rounding that makes one negative is 0.
        self.squared_singular_values = eigenvalues.double().clamp(min=0)
        self.coordinates = centred @ self.axes  # (N, D)

    def fit(self, c: float, max_iter: int = 1000, tolerance: float = TOLERANCE) -> Probe:
        """The probe at inverse regularisation strength ``c``. The weights, the loss and L-BFGS's state are float64
        whatever the features' dtype: in float32 a small step on a large weight rounds away, and weakly
        regularised fits stall far from the optimum."""
        num_samples, dim = self.coordinates.shape
        penalty = 1.0 / (c * num_samples)
        scale = torch.rsqrt(self.squared_singular_values / (4 * num_samples) + penalty)  # (D,)
        inputs = (self.coordinates.double() * scale).to(self.coordinates.dtype)
        binary = len(self.classes) == 2
        num_outputs = 1 if binary else len(self.classes)
        theta = torch.zeros(dim, num_outputs, dtype=torch.float64, requires_grad=True)  # weights = scale * theta
        bias = torch.zeros(num_outputs, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS(
            [theta, bias],
            lr=1,
            max_iter=max_iter,
            tolerance_grad=tolerance,
            tolerance_change=0,  # stop on the gradient, or where the line search can go no further; not on a small step
            history_size=10,
            line_search_fn="strong_wolfe",
        )

        def objective():
            optimizer.zero_grad()
            scores = (inputs @ theta.to(inputs.dtype)).double() + bias  # (N, num_outputs)
            if binary:
                loss = F.binary_cross_entropy_with_logits(scores[:, 0], self.targets.double())
            else:
                loss = F.cross_entropy(scores, self.targets)
            loss = loss + 0.5 * penalty * (scale[:, None] * theta).square().sum()
            loss.backward()
            return loss

        optimizer.step(objective)
        with torch.no_grad():
            weights = self.axes.double() @ (scale[:, None] * theta)  # (D, num_outputs), in the features' coordinates
            return Probe(weights, bias - self.mean.double() @ weights, self.classes)


def _logits(probe: Probe, features: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N, num_classes) decision values; classes absent from the fit get -inf."""
    logits = torch.full((len(features), num_classes), -float("inf"), dtype=torch.float64)
    logits[:, probe.classes] = probe.decision(features)
    return logits


def search_regularisation(
    train_features,
    train_labels,
    val_features,
    val_labels,
    max_iter: int = 1000,
    bar: tqdm | None = None,
) -> tuple[float, dict[float, float]]:
    """The C with the best validation accuracy, and every C tried → its validation accuracy, from (N, D)
    features and (N,) labels (tensors or arrays); ``bar`` advances by one per fit."""
    problem = ProbeProblem(train_features, train_labels)
    val_features, val_labels = torch.as_tensor(val_features), torch.as_tensor(val_labels)
    tried: dict[int, float] = {}

    def accuracy(index: int) -> float:
        if index not in tried:
            probe = problem.fit(C_GRID[index], max_iter)
            tried[index] = (probe.predict(val_features) == val_labels).double().mean().item()
            if bar is not None:
                bar.set_postfix_str(f"C={C_GRID[index]:.3g} val_acc1={tried[index]:.3f}", refresh=False)
                bar.update()
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
    progress: bool = False,
) -> tuple[torch.Tensor, dict]:
    """The probe's (N_test, num_classes) decision values on the test features (-inf for a class absent from the
    fit), and the facts of its fit: C, val_acc1, split sizes, the validation curve. ``progress``: a tqdm bar
    of the fits (up to ``MAX_FITS``) with the time left."""
    if val_features is None:
        train_part, val_part = _split_validation(train_labels.numpy(), val_proportion, seed)
        x_fit, y_fit = train_features[train_part], train_labels[train_part]
        x_val, y_val = train_features[val_part], train_labels[val_part]
    else:
        x_fit, y_fit, x_val, y_val = train_features, train_labels, val_features, val_labels
    with tqdm(total=MAX_FITS, desc="linear probe", unit="fit", disable=not progress, leave=False) as bar:
        best_c, tried = search_regularisation(x_fit, y_fit, x_val, y_val, max_iter, bar)
        bar.total = len(tried) + 1  # the search needed fewer fits than the most it can take
        final = ProbeProblem(torch.cat([x_fit, x_val]), torch.cat([y_fit, y_val])).fit(best_c, max_iter)
        bar.update()
    facts = {
        "C": best_c,
        "val_acc1": tried[best_c],
        "num_train": len(x_fit),
        "num_val": len(x_val),
        "num_samples": len(test_features),
        "num_fits": len(tried) + 1,
        "validation_curve": {f"{c:.3g}": acc for c, acc in tried.items()},
    }
    return _logits(final, test_features, num_classes), facts


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
    progress: bool = False,
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
        progress,
    )
    return {**classification_metrics(logits, test_labels, num_classes), **facts}
