"""Evaluators against hand-built encoders whose right answers are known, and brute force."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipforge.evaluation import zero_shot_classification
from clipforge.evaluation.retrieval import retrieval
from clipforge.evaluation.zeroshot import build_classifier

CLASSNAMES = ["cat", "dog", "bird", "fish", "frog", "ant"]


class FakeEncoder:
    """Images are one-hot class codes (plus noise); a text's embedding is the code of the class it names."""

    def __init__(self, dim=8):
        self.dim = dim

    def encode_image(self, images):
        return F.normalize(images.flatten(1)[:, : self.dim], dim=-1)

    def encode_text(self, tokens):
        return F.normalize(F.one_hot(tokens[:, 0], self.dim).float() + 0.01, dim=-1)


def tokenizer(texts):
    return torch.tensor([[next(i for i, name in enumerate(CLASSNAMES) if name in text)] for text in texts])


def image_batch(labels, wrong=()):
    """Codes of the labels; rows in ``wrong`` score the next class first, then the one after, then the label."""
    images = torch.zeros(len(labels), 3, 2, 2) + 0.01
    codes = images.view(len(labels), -1)
    for row, label in enumerate(labels):
        if row in wrong:
            codes[row, (label + 1) % len(CLASSNAMES)] = 1.0
            codes[row, (label + 2) % len(CLASSNAMES)] = 0.5
            codes[row, label] = 0.2
        else:
            codes[row, label] = 1.0
    return images


def test_zero_shot_classification_known_answer():
    labels = torch.tensor([0, 1, 2, 3, 4, 5] * 5)
    wrong = {0, 6, 7}  # two cats and one dog mistaken for the next class
    loader = [(image_batch(labels[:16].tolist(), wrong), labels[:16]), (image_batch(labels[16:].tolist()), labels[16:])]
    metrics = zero_shot_classification(FakeEncoder(), tokenizer, loader, CLASSNAMES, ["a photo of a {c}.", "a {c}"])
    assert metrics["acc1"] == 27 / 30
    assert metrics["acc5"] == 1.0
    assert metrics["per_class_accuracy"]["cat"] == 3 / 5 and metrics["per_class_accuracy"]["dog"] == 4 / 5
    assert abs(metrics["mean_per_class_recall"] - (3 / 5 + 4 / 5 + 4) / 6) < 1e-9


def test_classifier_averages_normalised_template_embeddings():
    classifier = build_classifier(FakeEncoder(), tokenizer, CLASSNAMES, ["{c}", "big {c}"])
    assert classifier.shape == (8, 6)
    torch.testing.assert_close(classifier.norm(dim=0), torch.ones(6))


def brute_force_recalls(scores, caption_image, k):
    text_to_image = (
        sum(caption_image[t] in scores[t].argsort(descending=True)[:k].tolist() for t in range(scores.shape[0]))
        / scores.shape[0]
    )
    image_to_text = (
        sum(
            any(caption_image[t] == i for t in scores[:, i].argsort(descending=True)[:k].tolist())
            for i in range(scores.shape[1])
        )
        / scores.shape[1]
    )
    return text_to_image, image_to_text


class RandomEncoder:
    def __init__(self):
        generator = torch.Generator().manual_seed(0)
        self.text_table = F.normalize(torch.randn(1000, 16, generator=generator), dim=-1)

    def encode_image(self, images):
        return F.normalize(images.flatten(1), dim=-1)

    def encode_text(self, tokens):
        return self.text_table[tokens[:, 0]]


def test_retrieval_matches_brute_force():
    generator = torch.Generator().manual_seed(1)
    encoder = RandomEncoder()
    images = torch.randn(40, 1, 4, 4, generator=generator)
    # each image gets 3 captions; caption token t means row t of the text table; make some near their image
    captions = [[str(3 * i + j) for j in range(3)] for i in range(40)]
    for i in range(0, 40, 2):
        encoder.text_table[3 * i] = F.normalize(images[i].flatten() + 0.3 * torch.randn(16, generator=generator), dim=0)
    tok = lambda texts: torch.tensor([[int(t)] for t in texts])
    loader = [(images[:25], captions[:25]), (images[25:], captions[25:])]
    metrics = retrieval(encoder, tok, loader)
    scores = encoder.encode_text(tok([c for cs in captions for c in cs])) @ encoder.encode_image(images).T
    caption_image = [i for i in range(40) for _ in range(3)]
    for k in (1, 5, 10):
        t2i, i2t = brute_force_recalls(scores, caption_image, k)
        assert metrics[f"image_retrieval_recall@{k}"] == t2i
        assert metrics[f"text_retrieval_recall@{k}"] == i2t
    assert metrics["text_retrieval_recall@1"] >= 0.5  # the planted pairs are found


def test_top5_is_none_below_five_classes_as_clip_benchmark_gives_nan():
    labels = torch.tensor([0, 1, 2, 3] * 3)
    loader = [(image_batch(labels.tolist()), labels)]
    metrics = zero_shot_classification(FakeEncoder(), tokenizer, loader, CLASSNAMES[:4], ["{c}"])
    assert metrics["acc1"] == 1.0 and metrics["acc5"] is None


def test_class_specific_templates_average_their_own_prompts():
    prompts = {name: [f"a {name}", f"one {name} here", f"{name}!"] for name in CLASSNAMES}
    prompts["dog"] = ["a dog", "a cat-like dog"]  # "cat-like dog" names the cat first: its embedding is the cat's
    classifier = build_classifier(FakeEncoder(), tokenizer, CLASSNAMES, prompts)
    encoder = FakeEncoder()
    expected_dog = F.normalize(
        (encoder.encode_text(tokenizer(["a dog"])) + encoder.encode_text(tokenizer(["a cat-like dog"]))).squeeze(0) / 2,
        dim=0,
    )
    torch.testing.assert_close(classifier[:, 1], expected_dog)
    torch.testing.assert_close(classifier[:, 0], encoder.encode_text(tokenizer(["a cat"]))[0])


class CountingEncoder:
    """Mean colour of the image as its embedding, token ids through a fixed random table; counts its calls."""

    def __init__(self):
        generator = torch.Generator().manual_seed(0)
        self.table = torch.randn(49408, 3, generator=generator)
        self.images = self.texts = 0

    def encode_image(self, images):
        self.images += len(images)
        return F.normalize(images.mean(dim=(2, 3)), dim=-1)

    def encode_text(self, tokens):
        self.texts += len(tokens)
        return F.normalize(self.table[tokens].sum(dim=1), dim=-1)


def test_a_suite_embeds_each_split_once_and_builds_each_classifier_once(synth_data, tmp_path):
    import open_clip

    from clipforge.evaluation import load_suite, run_suite

    shapes = synth_data / "eval" / "shapes"
    suite = tmp_path / "suite.yaml"
    suite.write_text(
        "name: cache\ndatasets:\n"
        + "".join(
            f"  - {{name: {name}, task: {task}, path: {shapes}}}\n"
            for name, task in (
                ("shapes", "zeroshot_classification"),
                ("shapes-again", "zeroshot_classification"),
                ("shapes-probe", "linear_probe"),
            )
        )
    )
    encoder = CountingEncoder()
    transform = lambda image: torch.from_numpy(np.asarray(image, dtype="float32")).permute(2, 0, 1)
    results = run_suite(encoder, open_clip.get_tokenizer("ViT-B-32"), transform, load_suite(suite), 128, 0)
    templates = (shapes / "zeroshot_classification_templates.txt").read_text().split("\n")
    assert encoder.images == 300 + 1000  # the test split once for three entries, the train split once
    assert encoder.texts == 6 * len([t for t in templates if t])  # one classifier for two identical entries
    assert results["shapes"]["acc1"] == results["shapes-again"]["acc1"]
    assert results["shapes-probe"]["num_train"] + results["shapes-probe"]["num_val"] == 1000


def fake_results(num_classes):
    generator = torch.Generator().manual_seed(num_classes)
    per_class = {f"class {i}": torch.rand(1, generator=generator).item() for i in range(num_classes)}
    mean = sum(per_class.values()) / num_classes
    return {
        "task": "zeroshot_classification",
        "acc1": mean,
        "acc5": None if num_classes < 5 else 0.9,
        "mean_per_class_recall": mean,
        "per_class_accuracy": per_class,
        "chance_acc1": 1 / num_classes,
        "num_samples": 10 * num_classes,
        "seconds": 1.0,
    }


def test_report_table_headline_and_plots(tmp_path):
    from eval_fixtures import assert_valid_png

    from clipforge.evaluation import headline, markdown_table, write_report

    results = {"few": fake_results(4), "many": fake_results(200)}
    table = markdown_table(results)
    assert "| few | classification | top-1 |" in table and "| few | classification | top-5 |" not in table
    assert "| many | classification | top-5 | 90.0% | 2.5% |" in table
    assert set(headline(results)) == {
        "few/acc1",
        "few/mean_per_class_recall",
        "many/acc1",
        "many/acc5",
        "many/mean_per_class_recall",
    }
    written = write_report(results, tmp_path, "run")
    assert [path.name for path in written] == ["run.json", "run.md", "run_few_per_class.png", "run_many_per_class.png"]
    for path in written[2:]:
        assert_valid_png(path)
    assert json.loads(written[0].read_text())["few"]["acc5"] is None


def test_every_shipped_suite_loads_and_says_how_to_get_its_data(monkeypatch):
    from pathlib import Path

    from clipforge.evaluation import load_suite
    from clipforge.evaluation.suite import DATA_ROOT_ENV

    monkeypatch.delenv(DATA_ROOT_ENV, raising=False)
    suites = sorted((Path(__file__).parents[1] / "eval").glob("*.yaml"))
    assert {path.stem for path in suites} >= {"synthetic", "imagenet1k", "cifar10", "cifar100", "coco", "flickr30k"}
    for path in suites:
        suite = load_suite(path, check=False)
        for entry in suite.datasets:
            assert entry.get and ("{path}" in entry.get or entry.get.startswith("clipforge prep")), entry
    imagenet = load_suite(Path(__file__).parents[1] / "eval" / "imagenet1k.yaml", check=False).datasets[0]
    assert imagenet.path == "data/benchmarks/wds_imagenet1k" and len(imagenet.classnames) == 1000
    assert len(imagenet.templates) == 80 and imagenet.format == "wds"


def test_data_root_comes_from_the_flag_then_the_environment_then_the_suite(tmp_path, monkeypatch):
    from clipforge.evaluation import load_suite
    from clipforge.evaluation.suite import DATA_ROOT_ENV

    suite = tmp_path / "suite.yaml"
    suite.write_text(
        "name: s\ndata_root: /from/suite\ndatasets:\n  - {name: a, task: zeroshot_retrieval, path: '{data_root}/a'}\n"
    )
    monkeypatch.delenv(DATA_ROOT_ENV, raising=False)
    assert load_suite(suite, check=False).datasets[0].path == "/from/suite/a"
    monkeypatch.setenv(DATA_ROOT_ENV, "/from/env")
    assert load_suite(suite, check=False).datasets[0].path == "/from/env/a"
    assert load_suite(suite, "/from/flag", check=False).datasets[0].path == "/from/flag/a"
    with pytest.raises(FileNotFoundError, match=r"(?s)expects its files at /from/flag/a .*--data-root"):
        load_suite(suite, "/from/flag")
    suite.write_text("name: s\ndatasets:\n  - {name: a, task: zero_shot, path: x}\n")
    with pytest.raises(ValueError, match="task = 'zero_shot' is not one of"):
        load_suite(suite, check=False)
    suite.write_text("name: s\ndatasets:\n  - {name: a, task: linear_probe, path: x, split_name: y}\n")
    with pytest.raises(ValueError, match=r"suite.yaml: key 'datasets\[0\]\.split_name': unknown \(known: name, task"):
        load_suite(suite, check=False)
