"""Linear probe against direct scikit-learn fits: the search, the refit on train + validation, the metrics.

The references are scikit-learn's ``LogisticRegression`` converged (``tol=1e-10``): the probe finds the optimum of
the same objective, which scikit-learn's default tolerance (1e-4) can stop short of by enough to move a prediction.
"""

import re
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import train_test_split

from clipforge.evaluation import run_suite
from clipforge.evaluation.linear_probe import C_GRID, ProbeProblem, linear_probe, search_regularisation
from clipforge.evaluation.suite import single_dataset_suite


def converged(c):
    """scikit-learn's logistic regression at C, run to its optimum."""
    return LogisticRegression(C=c, tol=1e-10, max_iter=10_000)


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
        model = converged(c).fit(x[fit_idx], y[fit_idx])
        val_accuracy[c] = (model.predict(x[val_idx]) == y[val_idx]).mean()
    assert metrics["val_acc1"] >= max(val_accuracy.values())  # the fine search only improves on the coarse grid
    assert metrics["C"] in C_GRID and metrics["num_train"] == 270 and metrics["num_val"] == 90
    final = converged(metrics["C"]).fit(x, y)  # train + validation = all of train
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
    assert best == C_GRID[np.argmax(every)]  # the same strength as the brute force, ties to the stronger
    assert 1e-3 < best < 10 and every[-1] < max(every)  # an interior optimum: C = 1e6 overfits these clusters
    assert len(tried) <= 7 + 4 * 2  # seven coarse points, then at most two new ones per span


def test_given_validation_split_is_used_and_then_merged_into_training():
    train_x, train_y = clusters(30, spread=1.0, seed=8)
    val_x, val_y = clusters(10, spread=1.0, seed=9)
    test_x, test_y = clusters(20, spread=1.0, seed=10)
    metrics = linear_probe(train_x, train_y, test_x, test_y, 6, val_features=val_x, val_labels=val_y)
    assert metrics["num_train"] == 180 and metrics["num_val"] == 60
    final = converged(metrics["C"]).fit(
        torch.cat([train_x, val_x]).double().numpy(), torch.cat([train_y, val_y]).numpy()
    )
    assert metrics["acc1"] == (final.predict(test_x.double().numpy()) == test_y.numpy()).mean()


def with_common_direction(features, weight=4.0):
    """Features sharing one dominant direction, as CLIP embeddings do (a badly conditioned probe)."""
    common = torch.ones(features.shape[1]) / features.shape[1] ** 0.5
    return F.normalize(weight * common + features, dim=-1)


@pytest.mark.parametrize("case", ["six classes", "two classes", "common direction"])
@pytest.mark.parametrize("c", [1e-4, 1.0, 100.0, 1e4])
def test_each_fit_reaches_scikit_learns_optimum(case, c):
    x, y = clusters(25, spread=1.2, seed=11)
    test_x, _ = clusters(15, spread=1.2, seed=12)
    if case == "two classes":
        keep, keep_test = y < 2, slice(0, 30)
        x, y, test_x = x[keep], y[keep], test_x[keep_test]
    if case == "common direction":
        x, test_x = with_common_direction(x), with_common_direction(test_x)
    reference = converged(c).fit(x.double().numpy(), y.numpy())
    expected = reference.decision_function(test_x.double().numpy())
    expected = np.stack([-expected, expected], axis=1) if expected.ndim == 1 else expected
    probe = ProbeProblem(x, y).fit(c)
    assert (probe.predict(test_x).numpy() == reference.predict(test_x.double().numpy())).all()
    np.testing.assert_allclose(probe.decision(test_x).numpy(), expected, atol=2e-3 * np.abs(expected).max())


def test_a_class_missing_from_training_gets_no_score():
    x, y = clusters(20, spread=1.0, seed=13)
    test_x, test_y = clusters(10, spread=1.0, seed=14)
    keep = y != 2
    metrics = linear_probe(x[keep], y[keep], test_x, test_y, 6)
    assert metrics["per_class_accuracy"][2] == 0.0 and 0.5 < metrics["acc1"] < 5 / 6 + 1e-9


class MeanColour:
    """An image's embedding is its mean colour."""

    def encode_image(self, images):
        return F.normalize(images.mean(dim=(2, 3)), dim=-1)


def colour_folder(root):
    """An image folder of noisy red, green and blue squares: 20 per class to train on, 5 to test."""
    generator = np.random.default_rng(0)
    for split, count in (("train", 20), ("test", 5)):
        for label, name in enumerate(("red", "green", "blue")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for index in range(count):
                pixel = generator.uniform(0, 60, size=3)
                pixel[label] += 150
                Image.fromarray(np.full((4, 4, 3), pixel, dtype=np.uint8)).save(folder / f"{index}.png")
    return root


@pytest.mark.parametrize("progress", [True, False])
def test_a_suite_shows_the_probes_fits_and_the_time_left_unless_quiet(tmp_path, capfd, monkeypatch, progress):
    fit = ProbeProblem.fit
    # as slow as a fit on real embeddings, so that the bar redraws between fits (tqdm waits 0.1 s between draws)
    monkeypatch.setattr(ProbeProblem, "fit", lambda *args: time.sleep(0.12) or fit(*args))
    suite = single_dataset_suite(colour_folder(tmp_path / "colours"), task="linear_probe")
    transform = lambda image: torch.from_numpy(np.asarray(image, dtype="float32")).permute(2, 0, 1)  # noqa: E731
    (metrics,) = run_suite(MeanColour(), None, transform, suite, 16, 0, progress=progress).values()
    assert metrics["acc1"] == 1.0
    drawn = [line for line in re.split("[\r\n]", capfd.readouterr().err) if line.startswith("linear probe")]
    if not progress:
        assert drawn == []
        return
    assert "| 0/16 [00:00<?" in drawn[0]  # then, once a fit has finished, the time left:
    # e.g. "linear probe:  44%|####4     | 7/16 [00:03<00:04,  1.70fit/s, C=1e+06 val_acc1=1.000]"
    remaining = [re.search(r"\| (\d+)/(\d+) \[\d\d:\d\d<(\d\d:\d\d),", line) for line in drawn[1:]]
    assert all(remaining) and len(remaining) >= 3
    assert {int(found[2]) for found in remaining} <= {16, metrics["num_fits"]}
    assert int(remaining[-1][1]) > int(remaining[0][1])  # the count goes up as fits finish
