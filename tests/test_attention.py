"""The packed self-attention path (clipforge.models.attention) computes what nn.MultiheadAttention computes: the
same features and the same gradient for every parameter, image and (trimmed) text towers; torch's path otherwise."""

from __future__ import annotations

import copy

import pytest
import torch

from clipforge.models import ModelConfig, build_model, enable_packed_attention, enable_text_trimming
from clipforge.models.attention import packed_self_attention


def test_a_model_trains_the_same_through_the_packed_path(tiny_model_json):
    torch.manual_seed(0)
    built = build_model(ModelConfig(name=tiny_model_json))
    reference = built.model.train()
    enable_text_trimming(reference)
    packed = copy.deepcopy(reference)
    assert enable_packed_attention(packed) == 4  # two image blocks, two text blocks
    images = torch.randn(6, 3, 32, 32)
    texts = built.tokenizer(["a red circle", "two small blue squares above a star"] * 3)[:, :12]
    results = []
    for model in (reference, packed):
        out = model(images, texts)
        (out["image_features"] @ out["text_features"].T).logsumexp(1).sum().backward()
        results.append((out, {name: p.grad for name, p in model.named_parameters()}))
    (out, grads), (packed_out, packed_grads) = results
    for key in ("image_features", "text_features"):
        torch.testing.assert_close(packed_out[key], out[key], rtol=1e-5, atol=1e-6)
    assert packed_grads.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert packed.state_dict().keys() == reference.state_dict().keys()


def test_other_calls_keep_torchs_own_path(monkeypatch):
    attention = torch.nn.MultiheadAttention(16, 2, batch_first=True)
    enable_packed_attention(attention)
    taken = []
    monkeypatch.setattr(
        "clipforge.models.attention.packed_self_attention", lambda *a: taken.append(1) or packed_self_attention(*a)
    )
    x, other = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    attention(x, x, x, need_weights=False)
    assert taken == [1]
    attention(x, other, other, need_weights=False)  # cross-attention
    attention(x, x, x, need_weights=True)  # weights wanted
    with torch.no_grad():  # inference: torch's fused fast path
        attention.eval()
        attention(x, x, x, need_weights=False)
    assert taken == [1]


@pytest.mark.parametrize("kwargs", [{"dropout": 0.1}, {"batch_first": False}, {"add_bias_kv": True}])
def test_modules_it_cannot_reproduce_are_left_alone(kwargs):
    assert enable_packed_attention(torch.nn.MultiheadAttention(16, 2, **kwargs)) == 0
