"""Linear probe against direct scikit-learn fits: the search, the refit on train + validation, the metrics."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import train_test_split

from clipforge.evaluation.linear_probe import C_GRID, linear_probe, search_regularisation


def clusters(num_per_class, num_classes=6, dim=16, spread=1.0, seed=0):
    """Gaussian clusters around fixed random centres (noise drawn with ``seed``), L2-normalised like CLIP
    embeddings."""
    centres = np.random.default_rng(12345).normal(size=(num_classes, dim))
    generator = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), num_per_class)
    features = centres[labels] + spread * generator.normal(size=(len(labels), dim))
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    return torch.tensor(features, dtype=torch.float32), torch.tensor(labels)


def test_probe_equals_a_direct_fit_with_the_chosen_strength():
    train_x, train_y = clusters(60, spread=1.2, seed=1)
    test_x, test_y = clusters(40, spread=1.2, seed=2)
    metrics = linear_probe(train_x, train_y, test_x, test_y, num_classes=6, val_proportion=0.25, seed=3)
    # Independently: the same stratified split, every coarse strength fitted by hand, the chosen one refitted.
    x, y = train_x.double().numpy(), train_y.numpy()
    fit_idx, val_idx = train_test_split(np.arange(len(y)), test_size=0.25, random_state=3, stratify=y)
    val_accuracy = {}
    for c in C_GRID[::16]:
        model = LogisticRegression(C=c, max_iter=1000).fit(x[fit_idx], y[fit_idx])
        val_accuracy[c] = (model.predict(x[val_idx]) == y[val_idx]).mean()
    assert metrics["val_acc1"] >= max(val_accuracy.values())  # the fine search only improves on the coarse grid
    assert metrics["C"] in C_GRID and metrics["num_train"] == 270 and metrics["num_val"] == 90
    final = LogisticRegression(C=metrics["C"], max_iter=1000).fit(x, y)  # train + validation = all of train
    predictions = final.predict(test_x.double().numpy())
    assert metrics["acc1"] == (predictions == test_y.numpy()).mean()
    assert metrics["mean_per_class_recall"] == pytest.approx(
        balanced_accuracy_score(test_y.numpy(), predictions), abs=1e-12
    )
    top5 = np.argsort(-final.decision_function(test_x.double().numpy()), axis=1)[:, :5]
    assert metrics["acc5"] == (top5 == test_y.numpy()[:, None]).any(axis=1).mean()
    assert 0.5 < metrics["acc1"] < 1.0  # overlapping clusters: neither trivial nor hopeless


def test_probe_known_answers_separable_and_noise():
    train_x, train_y = clusters(50, spread=0.05, seed=4)
    test_x, test_y = clusters(30, spread=0.05, seed=4)
    assert linear_probe(train_x, train_y, test_x, test_y, 6)["acc1"] == 1.0
    generator = torch.Generator().manual_seed(5)
    noise = linear_probe(train_x, train_y[torch.randperm(300, generator=generator)], test_x, test_y, 6)
    assert noise["acc1"] < 0.4  # labels unrelated to the features: near chance (1/6)


def test_search_finds_the_best_strength_of_the_whole_grid():
    train_x, train_y = clusters(30, spread=1.5, seed=6)
    val_x, val_y = clusters(20, spread=1.5, seed=7)
    x, y, vx, vy = train_x.double().numpy(), train_y.numpy(), val_x.double().numpy(), val_y.numpy()
    best, tried = search_regularisation(x, y, vx, vy)
    every = [(LogisticRegression(C=c, max_iter=1000).fit(x, y).predict(vx) == vy).mean() for c in C_GRID]  # 97 fits
    assert tried[best] == max(every)
    assert 1e-3 < best < 10 and every[-1] < max(every)  # an interior optimum: C = 1e6 overfits these clusters
    assert len(tried) <= 7 + 4 * 2  # seven coarse points, then at most two new ones per span


def test_given_validation_split_is_used_and_then_merged_into_training():
    train_x, train_y = clusters(30, spread=1.0, seed=8)
    val_x, val_y = clusters(10, spread=1.0, seed=9)
    test_x, test_y = clusters(20, spread=1.0, seed=10)
    metrics = linear_probe(train_x, train_y, test_x, test_y, 6, val_features=val_x, val_labels=val_y)
    assert metrics["num_train"] == 180 and metrics["num_val"] == 60
    final = LogisticRegression(C=metrics["C"], max_iter=1000).fit(
        torch.cat([train_x, val_x]).double().numpy(), torch.cat([train_y, val_y]).numpy()
    )
    assert metrics["acc1"] == (final.predict(test_x.double().numpy()) == test_y.numpy()).mean()
