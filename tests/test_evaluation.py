"""Evaluators against hand-built encoders whose right answers are known, and brute force."""

import torch
import torch.nn.functional as F

from clipforge.evaluation import retrieval, zero_shot_classification
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
    text_to_image = sum(caption_image[t] in scores[t].argsort(descending=True)[:k].tolist()
                        for t in range(scores.shape[0])) / scores.shape[0]
    image_to_text = sum(any(caption_image[t] == i for t in scores[:, i].argsort(descending=True)[:k].tolist())
                        for i in range(scores.shape[1])) / scores.shape[1]
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
