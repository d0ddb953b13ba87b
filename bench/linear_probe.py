"""How long the linear probe takes on real embeddings, against the scikit-learn probe it replaced and CLIP_benchmark's.

    .venv/bin/python bench/linear_probe.py

The features: scikit-learn's 1,797 digits (8 × 8) upscaled to 64 px RGB, through the tiny ViT of
configs/models/tiny-vit-64.json widened to 512-d embeddings, random init (seed 0), L2-normalised as
`clipforge eval` embeds them: the first 1,037 images train the probe (a seeded stratified 20% of them
validates C), the other 760 test it. Random-init embeddings share one dominant direction and have a
fast-falling spectrum, as trained CLIP embeddings do, which is what makes a probe's fits slow.

On those same features, one run each, in this order:
- the probe before (scikit-learn ``LogisticRegression``, L-BFGS from zero at each C, float64; copied below);
- ``clipforge.evaluation.linear_probe.fit_linear_probe`` (as ``clipforge eval`` calls it, without the bar);
- CLIP_benchmark 1.6.2's probe: its own weight-decay search (97 values in [1e-6, 1e2]), AdamW training of a
  ``torch.nn.Linear`` (lr 0.1, 10 epochs, batch 64: its CLI's defaults) and scoring, on the same
  train / validation / test features; it moves everything to CUDA, so here ``.cuda()`` is made a no-op.
Then, at the C each scikit-learn-style probe chose, the optimum of the objective itself (the new fit in
float64, run to a gradient of 1e-10) and how many test predictions each probe's fit differs from it on.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `clipforge eval` sets it (see clipforge.cli.main)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from clipforge.evaluation import OpenClipEncoder  # noqa: E402
from clipforge.evaluation.linear_probe import ProbeProblem, _split_validation, fit_linear_probe  # noqa: E402
from clipforge.evaluation.zeroshot import classification_metrics  # noqa: E402
from clipforge.models import ModelConfig, build_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NUM_TRAIN = 1037


# ---- the probe before, verbatim (scikit-learn L-BFGS from zero at each C, float64) ----

OLD_C_GRID = np.logspace(-6, 6, 97)
OLD_COARSE_STEP = 16


def _old_fit(features, labels, c, max_iter):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=c, max_iter=max_iter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(features, labels)
    return model


def _old_logits(model, features, num_classes):
    scores = model.decision_function(features)
    if scores.ndim == 1:
        scores = np.stack([-scores, scores], axis=1)
    logits = torch.full((len(features), num_classes), -float("inf"), dtype=torch.float64)
    logits[:, torch.as_tensor(model.classes_)] = torch.as_tensor(scores, dtype=torch.float64)
    return logits


def _old_search(train_features, train_labels, val_features, val_labels, max_iter=1000):
    tried = {}

    def accuracy(index):
        if index not in tried:
            model = _old_fit(train_features, train_labels, OLD_C_GRID[index], max_iter)
            tried[index] = float((model.predict(val_features) == val_labels).mean())
        return tried[index]

    def best_of(indices):
        best = None
        for index in indices:
            if best is None or accuracy(index) > accuracy(best):
                best = index
        return best

    peak = best_of(range(0, len(OLD_C_GRID), OLD_COARSE_STEP))
    span = OLD_COARSE_STEP // 2
    while span > 0:
        peak = best_of(sorted({max(peak - span, 0), peak, min(peak + span, len(OLD_C_GRID) - 1)}))
        span //= 2
    return float(OLD_C_GRID[peak]), {float(OLD_C_GRID[index]): acc for index, acc in sorted(tried.items())}


def old_fit_linear_probe(train_features, train_labels, test_features, num_classes, val_proportion=0.2, seed=0):
    x_train, y_train = train_features.double().numpy(), train_labels.numpy()
    train_part, val_part = _split_validation(y_train, val_proportion, seed)
    x_fit, y_fit, x_val, y_val = x_train[train_part], y_train[train_part], x_train[val_part], y_train[val_part]
    best_c, tried = _old_search(x_fit, y_fit, x_val, y_val, 1000)
    final = _old_fit(np.concatenate([x_fit, x_val]), np.concatenate([y_fit, y_val]), best_c, 1000)
    facts = {"C": best_c, "val_acc1": tried[best_c], "num_fits": len(tried) + 1}
    return _old_logits(final, test_features.double().numpy(), num_classes), facts


# ---- CLIP_benchmark's probe on the same features ----


def _numpy2_safe_accuracy(output, target, topk=(1,)):
    """CLIP_benchmark's ``accuracy`` with ``.item()`` where it calls ``float()`` on an array (a TypeError under
    NumPy 2); the arithmetic is unchanged."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum(0, keepdim=True).item() / len(target) for k in topk]


@contextlib.contextmanager
def _cuda_is_the_cpu():
    saved = torch.nn.Module.cuda, torch.Tensor.cuda
    torch.nn.Module.cuda = lambda self, *args, **kwargs: self
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.nn.Module.cuda, torch.Tensor.cuda = saved


def clip_benchmark_probe(x_fit, y_fit, x_val, y_val, x_test, y_test, lr=0.1, epochs=10, batch_size=64, seed=0):
    """CLIP_benchmark's ``linear_probe.evaluate`` from the point where its features are cached (its search,
    final training on train + validation and scoring), on these features: test logits, their labels, the weight
    decay chosen, the number of trainings."""
    from clip_benchmark.metrics import linear_probe as cb
    from torch.utils.data import DataLoader

    cb.accuracy = _numpy2_safe_accuracy
    trainings = []
    train = cb.train

    def counted_train(*args, **kwargs):
        trainings.append(args[3])  # its weight decay; find_peak trains again at points it has trained at
        return train(*args, **kwargs)

    cb.train = counted_train

    def loader(features, labels):
        return DataLoader(cb.FeatureDataset(features, labels), batch_size=batch_size, shuffle=True, num_workers=0)

    train_loader, val_loader = loader(x_fit, y_fit), loader(x_val, y_val)
    train_val_loader = loader(torch.cat([x_fit, x_val]), torch.cat([y_fit, y_val]))
    test_loader = loader(x_test, y_test)
    input_shape, output_shape = x_fit.shape[1], int(y_fit.max()) + 1
    args = (train_loader, val_loader, input_shape, output_shape, lr, epochs, False, "cpu", False, seed)
    quiet = contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO())
    with _cuda_is_the_cpu(), quiet[0], quiet[1]:
        wd_list = np.logspace(-6, 2, num=97).tolist()
        wd_list_init = np.logspace(-6, 2, num=7).tolist()
        wd_init_idx = [i for i, val in enumerate(wd_list) if val in wd_list_init]
        peak_idx = cb.find_peak(wd_list, wd_init_idx, *args)
        step_span = 8
        while step_span > 0:
            left, right = max(peak_idx - step_span, 0), min(peak_idx + step_span, len(wd_list) - 1)
            peak_idx = cb.find_peak(wd_list, [left, peak_idx, right], *args)
            step_span //= 2
        best_wd = wd_list[peak_idx]
        model = cb.train(train_val_loader, input_shape, output_shape, best_wd, lr, epochs, False, "cpu", seed)
        logits, target = cb.infer(model, test_loader, False, "cpu")
    cb.train = train
    return logits, target, best_wd, len(trainings)  # in its test loader's shuffled order


# ---- the features ----


def digit_features() -> tuple[torch.Tensor, torch.Tensor]:
    """(1797, 512) L2-normalised float32 embeddings of the upscaled digits and their (1797,) labels."""
    from PIL import Image
    from sklearn.datasets import load_digits

    config = json.loads((ROOT / "configs" / "models" / "tiny-vit-64.json").read_text())
    config["embed_dim"] = 512
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "tiny-vit-64-512.json"
        path.write_text(json.dumps(config))
        torch.manual_seed(0)
        built = build_model(ModelConfig(name=str(path)))
    encoder = OpenClipEncoder(built.model.eval())
    digits = load_digits()
    images = torch.stack(
        [
            built.eval_transform(
                Image.fromarray((image * 255 / 16).astype(np.uint8)).convert("RGB").resize((64, 64), Image.BILINEAR)
            )
            for image in digits.images
        ]
    )
    features = torch.cat([encoder.encode_image(images[start : start + 256]) for start in range(0, len(images), 256)])
    return features, torch.as_tensor(digits.target)


def main() -> None:
    features, labels = digit_features()
    x_train, y_train, x_test, y_test = (
        features[:NUM_TRAIN],
        labels[:NUM_TRAIN],
        features[NUM_TRAIN:],
        labels[NUM_TRAIN:],
    )
    num_classes = 10
    singular_values = torch.linalg.svdvals(x_train.double())
    print(
        f"{datetime.date.today()}  {platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs, "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}"
    )
    print(
        f"features: {tuple(x_train.shape)} train (fit + validation), {tuple(x_test.shape)} test, "
        f"{num_classes} classes, float32; singular values s1 / s2 = {singular_values[0] / singular_values[1]:.1f}, "
        f"s1 / s100 = {singular_values[0] / singular_values[99]:.3g}"
    )
    rows = {}
    start = time.perf_counter()
    old_logits, old_facts = old_fit_linear_probe(x_train, y_train, x_test, num_classes)
    rows["before (scikit-learn, float64)"] = (time.perf_counter() - start, old_logits, old_facts)
    start = time.perf_counter()
    new_logits, new_facts = fit_linear_probe(x_train, y_train, x_test, num_classes)
    rows["now (clipforge)"] = (time.perf_counter() - start, new_logits, new_facts)

    fit_part, val_part = _split_validation(y_train.numpy(), 0.2, 0)
    start = time.perf_counter()
    cb_logits, cb_target, best_wd, cb_fits = clip_benchmark_probe(
        x_train[fit_part], y_train[fit_part], x_train[val_part], y_train[val_part], x_test, y_test
    )
    cb_seconds = time.perf_counter() - start

    print(f"{'probe':<32} {'seconds':>8} {'fits':>5} {'C / wd':>10} {'val acc1':>8} {'test acc1':>9} {'recall':>7}")
    for name, (seconds, logits, facts) in rows.items():
        metrics = classification_metrics(logits, y_test, num_classes)
        print(
            f"{name:<32} {seconds:8.1f} {facts['num_fits']:5d} {facts['C']:10.3g} {facts['val_acc1']:8.4f} "
            f"{metrics['acc1']:9.4f} {metrics['mean_per_class_recall']:7.4f}"
        )
    metrics = classification_metrics(cb_logits.double(), cb_target, num_classes)
    print(
        f"{'CLIP_benchmark 1.6.2 (AdamW)':<32} {cb_seconds:8.1f} {cb_fits:5d} {best_wd:10.3g} {'':>8} "
        f"{metrics['acc1']:9.4f} {metrics['mean_per_class_recall']:7.4f}"
    )
    before, now = rows["before (scikit-learn, float64)"][0], rows["now (clipforge)"][0]
    print(f"speed-up: {before / now:.1f}x")

    # The optimum itself at each chosen C, on train + validation: which fit is nearer to it.
    x_all = torch.cat([x_train[fit_part], x_train[val_part]])
    y_all = torch.cat([y_train[fit_part], y_train[val_part]])
    exact = ProbeProblem(x_all, y_all, torch.float64)
    for name, (_, logits, facts) in rows.items():
        optimum = exact.fit(facts["C"], max_iter=20_000, tolerance=1e-10).predict(x_test)
        differ = int((logits.argmax(dim=1) != optimum).sum())
        print(
            f"{name} at C = {facts['C']:.3g}: {differ} of {len(x_test)} test predictions differ from the optimum's "
            f"(test acc1 at the optimum {(optimum == y_test).double().mean().item():.4f})"
        )
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
