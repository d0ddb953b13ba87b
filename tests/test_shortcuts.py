"""The pooled last block (clipforge.models.shortcuts) against open_clip's own towers, unchanged: the same features,
loss and gradient for every parameter (float64, where the two are the same sums), with and without gradient
checkpointing, trimmed captions of different lengths; towers it cannot reproduce exactly are left alone."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import TINY_MODEL
from open_clip.transformer import ResidualAttentionBlock
from references import naive_clip_loss

from clipforge.models import ModelConfig, build_model, enable_pooled_last_block, enable_text_trimming, shortcuts
from clipforge.models.shortcuts import block_at_token

CAPTIONS = ["a red circle", "two small blue squares above a large green star on a striped background", "x", "a cat"]


def _train_once(model, images, texts):
    out = model(images, texts)
    loss = naive_clip_loss(out["image_features"], out["text_features"], out["logit_scale"].exp())
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out["image_features"].detach(), out["text_features"].detach(), loss.detach(), grads


def _assert_same(result, reference):
    for got, want in zip(result[:3], reference[:3]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert result[3].keys() == reference[3].keys()
    for name, want in reference[3].items():  # some are 0 but for rounding (a key bias's): atol at the tensor's scale
        atol = 1e-10 * float(want.abs().max())
        torch.testing.assert_close(result[3][name], want, rtol=1e-9, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_pooled_last_block_trains_and_encodes_the_same(tiny_model_json, monkeypatch, checkpointing):
    torch.manual_seed(0)
    built = build_model(ModelConfig(name=tiny_model_json))
    reference = built.model.double().train()
    reference.set_grad_checkpointing(checkpointing)
    enable_text_trimming(reference)
    pooled = copy.deepcopy(reference)
    assert enable_pooled_last_block(pooled) == ["image", "text"]
    calls = []
    monkeypatch.setattr(shortcuts, "block_at_token", lambda *a: calls.append(a[2]) or block_at_token(*a))
    tokens = built.tokenizer(CAPTIONS)
    texts = tokens[:, : int(tokens.argmax(dim=1).max()) + 1]  # as the loader trims; the EOTs at 4, 17, 2 and 3
    images = torch.randn(len(CAPTIONS), 3, 32, 32, dtype=torch.float64)

    _assert_same(_train_once(pooled, images, texts), _train_once(reference, images, texts))
    assert calls[0] == 0 and calls[1].tolist() == tokens.argmax(dim=1).tolist()  # the class token; each EOT
    with torch.no_grad():  # evaluation: full-length captions, no gradient
        reference.eval(), pooled.eval()
        torch.testing.assert_close(pooled.encode_image(images), reference.encode_image(images), rtol=1e-10, atol=0)
        torch.testing.assert_close(pooled.encode_text(tokens), reference.encode_text(tokens), rtol=1e-10, atol=0)
    assert pooled.state_dict().keys() == reference.state_dict().keys()


@pytest.mark.parametrize("at", [0, 3, torch.tensor([5, 0, 2])])
@pytest.mark.parametrize("causal", [False, True])
def test_a_block_at_one_token_is_the_full_block_at_that_token(at, causal):
    torch.manual_seed(0)
    block = ResidualAttentionBlock(16, 4).double()
    x = torch.randn(3, 6, 16, dtype=torch.float64)
    mask = torch.full((6, 6), float("-inf")).triu(1) if causal else None
    full = block(x, attn_mask=mask)
    expected = full[:, at : at + 1] if isinstance(at, int) else full[torch.arange(3), at].unsqueeze(1)
    torch.testing.assert_close(block_at_token(block, x, at, mask), expected, rtol=1e-12, atol=1e-12)


def test_text_trimming_after_it_keeps_it(tiny_model_json):
    model = build_model(ModelConfig(name=tiny_model_json)).model
    enable_pooled_last_block(model)
    assert enable_text_trimming(model)
    assert model.encode_text.__func__ is shortcuts._encode_text_pooled


@pytest.mark.parametrize(
    "vision,text,changed",
    [
        ({"pool_type": "avg"}, {}, ["text"]),  # every token's output is read
        ({"attentional_pool": True, "attn_pooler_heads": 2, "attn_pooler_queries": 4}, {}, ["text"]),
        ({}, {"no_causal_mask": True, "pool_type": "last"}, ["image"]),  # bidirectional: padding is read
        ({"layers": [1, 1, 1, 1], "width": 16, "image_size": 32, "head_width": 16}, {}, ["text"]),  # ModifiedResNet
    ],
)
def test_towers_it_cannot_reproduce_are_left_alone(tmp_path, vision, text, changed):
    config = {
        **TINY_MODEL,
        "vision_cfg": {**TINY_MODEL["vision_cfg"], **vision},
        "text_cfg": {**TINY_MODEL["text_cfg"], **text},
    }
    (tmp_path / "model.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    built = build_model(ModelConfig(name=str(tmp_path / "model.json")))
    reference = built.model.double().train()
    pooled = copy.deepcopy(reference)
    assert enable_pooled_last_block(pooled) == changed
    images = torch.randn(len(CAPTIONS), 3, 32, 32, dtype=torch.float64)
    texts = built.tokenizer(CAPTIONS)
    _assert_same(_train_once(pooled, images, texts), _train_once(reference, images, texts))
