"""clipforge's evaluators give CLIP_benchmark's numbers: same model, same data, its own ``evaluate`` functions.

CLIP_benchmark reads the benchmark directories with its own WebDataset builder and runs
``zeroshot_classification.evaluate`` / ``zeroshot_retrieval.evaluate`` on the open_clip model
(fp32, CPU); clipforge runs ``run_suite`` on the same checkpoint. Top-1/top-5 accuracy and the
retrieval hit counts must be identical; CLIP_benchmark averages recalls in float32, so those agree
to float32 resolution.
"""

import json

import clip_benchmark.metrics.zeroshot_classification as cb_classification
import clip_benchmark.metrics.zeroshot_retrieval as cb_retrieval
import numpy as np
import pytest
import torch
from clip_benchmark.datasets.builder import build_dataset

from clipforge.evaluation import load_eval_model, load_suite, run_suite
from clipforge.evaluation.datasets import resolve_names

pytestmark = pytest.mark.filterwarnings("ignore:WebDataset\\(shardshuffle")


def numpy2_safe_accuracy(output, target, topk=(1,)):
    """CLIP_benchmark's ``accuracy`` with ``.item()`` where it calls ``float()`` on a 1-element array (a
    TypeError under NumPy 2); the arithmetic is unchanged."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum(0, keepdim=True).item() / len(target) for k in topk]


def clip_benchmark_loader(name, root, transform, task, batch_size=64):
    dataset = build_dataset(f"wds/{name}", root=str(root), transform=transform, split="test", task=task)
    # As clip_benchmark's CLI builds it for wds/ datasets.
    return dataset, torch.utils.data.DataLoader(
        dataset.batched(batch_size), batch_size=None, shuffle=False, num_workers=0
    )


@pytest.fixture(scope="module")
def evaluated(trained_checkpoint, synth_suite):
    loaded = load_eval_model(str(trained_checkpoint))
    results = run_suite(loaded.encoder, loaded.tokenizer, loaded.transform, load_suite(synth_suite), 64, 1)
    return loaded, results


def test_zero_shot_classification_equals_clip_benchmark(evaluated, synth_data, monkeypatch):
    monkeypatch.setattr(cb_classification, "accuracy", numpy2_safe_accuracy)
    loaded, results = evaluated
    model = loaded.encoder.model
    spread = []
    for name in ("shapes", "colors"):
        dataset, loader = clip_benchmark_loader(
            name, synth_data / "eval" / name, loaded.transform, "zeroshot_classification"
        )
        theirs = cb_classification.evaluate(
            model, loader, loaded.tokenizer, dataset.classes, dataset.templates, device="cpu", amp=False
        )
        ours = results[name]
        print(
            f"{name}: clip_benchmark {theirs}; clipforge acc1 {ours['acc1']} acc5 {ours['acc5']} "
            f"mean_per_class_recall {ours['mean_per_class_recall']}"
        )
        assert ours["acc1"] == theirs["acc1"] and ours["acc5"] == theirs["acc5"]
        assert ours["mean_per_class_recall"] == pytest.approx(theirs["mean_per_class_recall"], abs=1e-12)
        # Per image, too: their logits' predictions are ours.
        classifier = cb_classification.zero_shot_classifier(
            model, loaded.tokenizer, dataset.classes, dataset.templates, "cpu", amp=False
        )
        logits, target = cb_classification.run_classification(model, classifier, loader, "cpu", amp=False)
        per_class = {
            dataset.classes[c]: (logits.argmax(1)[target == c] == c).float().mean().item()
            for c in target.unique().tolist()
        }
        assert per_class == pytest.approx(ours["per_class_accuracy"], abs=1e-6)
        spread.append(len(set(logits.argmax(1).tolist())))
    assert min(spread) >= 3  # the trained model predicts several classes: the agreement is not trivial
    assert results["colors"]["acc1"] > 0.3  # and it has learnt something (chance 1/6)


def test_retrieval_equals_clip_benchmark(evaluated, synth_data):
    loaded, results = evaluated
    _, loader = clip_benchmark_loader(
        "retrieval", synth_data / "eval" / "retrieval", loaded.transform, "zeroshot_retrieval"
    )
    theirs = cb_retrieval.evaluate(
        loaded.encoder.model, loader, loaded.tokenizer, device="cpu", amp=False, recall_k_list=[1, 5, 10]
    )
    ours = results["retrieval"]
    print(f"retrieval: clip_benchmark {theirs}; clipforge { {k: v for k, v in ours.items() if 'recall@' in k} }")
    for key, value in theirs.items():
        count = ours["num_texts"] if key.startswith("image_retrieval") else ours["num_images"]
        assert round(value * count) == round(ours[key] * count), key  # identical hit counts
        assert ours[key] == pytest.approx(value, abs=1e-6), key
    assert ours["image_retrieval_recall@5"] > 0.1  # well above chance (5 / 100)


def test_openai_imagenet_names_and_templates_are_clip_benchmarks(tmp_path):
    import clip_benchmark.datasets as cb_datasets

    folder = __import__("pathlib").Path(cb_datasets.__file__).parent
    classnames = json.loads((folder / "en_classnames.json").read_text())["imagenet1k"]
    templates = json.loads((folder / "en_zeroshot_classification_templates.json").read_text())["imagenet1k"]
    assert resolve_names("openai_imagenet", "classnames") == classnames and len(classnames) == 1000
    assert resolve_names("openai_imagenet", "templates") == templates and len(templates) == 80
    assert np.all(["{c}" in template for template in templates])
