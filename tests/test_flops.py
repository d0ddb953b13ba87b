"""The one FLOP count (clipforge.train.flops) against analytical counts: locked towers have no backward, patch
dropout counts the kept tokens, trimming charges the trimmed caption length, the pooled last block counts the class
token alone past its keys and values; and the peaks MFU is measured against."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_MODEL

from clipforge.models import ModelConfig, build_model, enable_pooled_last_block, enable_text_trimming
from clipforge.train import peak
from clipforge.train.flops import _forward_and_train, count_train_flops


def vit_forward_flops(tokens: int, patches: int, vision: dict, embed_dim: int, pooled_last_block: bool = True) -> int:
    """A ViT image tower's matmul FLOPs for one image: the patch embedding over every patch, then `layers` blocks
    on `tokens` tokens (q, k, v, out projections 4d², MLP 8d²; scores and weighted sum 2·T²·d), the pooled projection.
    With the pooled last block, that block's keys and values cover every token and the rest the class token only.
    Norms and activations are not matmuls and not counted."""
    width, layers, patch = vision["width"], vision["layers"], vision["patch_size"]
    embedding = 2 * patches * 3 * patch * patch * width
    block = 2 * tokens * 12 * width * width + 2 * 2 * tokens * tokens * width
    last = 2 * tokens * 2 * width * width + 2 * 10 * width * width + 2 * 2 * tokens * width
    blocks = (layers - 1) * block + last if pooled_last_block else layers * block
    return embedding + blocks + 2 * width * embed_dim


def test_a_trainable_tower_costs_three_forwards_and_a_locked_one_one(tiny_model_json):
    trained = count_train_flops(ModelConfig(name=tiny_model_json))
    patch_embedding = 2 * 16 * 3 * 8 * 8 * 64  # its input gradient (pixels) is neither needed nor counted
    assert trained.image_train == 3 * trained.image_forward - patch_embedding
    assert trained.text_train() == 3 * trained.text_forward  # token ids: an embedding lookup, no matmul
    locked = count_train_flops(ModelConfig(name=tiny_model_json, lock_image=True, lock_text=True))
    assert locked.image_train == locked.image_forward == trained.image_forward  # no backward at all
    assert locked.text_train() == locked.text_forward
    partly = count_train_flops(ModelConfig(name=tiny_model_json, lock_text=True, lock_text_unlocked_layers=2))
    assert locked.text_train() < partly.text_train() < trained.text_train()  # the last block and the projection


@pytest.mark.parametrize("patch_dropout,kept_patches", [(0.0, 16), (0.5, 8)])
def test_patch_dropout_counts_the_tokens_the_image_tower_keeps(tiny_model_json, patch_dropout, kept_patches):
    cfg = ModelConfig(name=tiny_model_json, patch_dropout=patch_dropout)
    for pooled_last_block in (True, False):
        flops = count_train_flops(cfg, pooled_last_block=pooled_last_block)
        expected = vit_forward_flops(
            1 + kept_patches, 16, TINY_MODEL["vision_cfg"], TINY_MODEL["embed_dim"], pooled_last_block
        )
        assert flops.image_forward == expected


def test_trimmed_captions_are_charged_for_their_own_length(tiny_model_json):
    flops = count_train_flops(ModelConfig(name=tiny_model_json))
    model = build_model(ModelConfig(name=tiny_model_json)).model.train()
    assert enable_text_trimming(model) and enable_pooled_last_block(model) == ["image", "text"]
    for length in (3, 7, 24):
        forward, train = _forward_and_train(lambda length=length: model.encode_text(torch.zeros(1, length).long()))
        model.zero_grad(set_to_none=True)
        assert flops.text_train(length) == pytest.approx(train, rel=1e-9), length
    assert flops.train(7) < flops.train() == flops.image_train + flops.text_train(24)


def test_the_gpu_table_names_the_right_chip():
    assert peak.gpu_peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.0
    assert peak.gpu_peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert peak.gpu_peak_tflops("NVIDIA H200", "tf32") == 494.7
    assert peak.gpu_peak_tflops("NVIDIA A100-SXM4-80GB", "tf32") == 156.0
    assert peak.gpu_peak_tflops("NVIDIA L40S", "fp16") == 362.1
    assert peak.gpu_peak_tflops("NVIDIA GeForce GTX 1080", "bf16") is None
    assert peak.matmul_precision("fp32", tf32=True) == "tf32" and peak.matmul_precision("bf16", tf32=True) == "bf16"
    assert peak.peak_tflops("cuda:0", "bf16", configured=123.0) == (123.0, "logging.peak_tflops")


def test_the_cpu_peak_is_probed_and_cached_keeping_the_best_seen(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls, results = [], iter([0.25, 0.1, 0.4, 0.3])  # first probe, then a busy, a quiet and a busy moment
    monkeypatch.setattr(peak, "probe", lambda dtype, **kwargs: calls.append(dtype) or next(results))
    assert [peak.cached_cpu_peak("fp32") for _ in range(4)] == [0.25, 0.25, 0.4, 0.4]
    assert calls == [torch.float32] * 4
    cached = json.loads((tmp_path / "clipforge" / "peak_tflops.json").read_text())
    (key,) = cached
    assert f"fp32 | {torch.get_num_threads()} threads" in key and cached[key]["tflops"] == 0.4
    monkeypatch.setattr(peak, "probe", lambda dtype, **kwargs: calls.append(dtype) or 0.5)
    assert peak.cached_cpu_peak("bf16") == 0.5  # another dtype is another measurement
    assert calls[-1] == torch.bfloat16
    assert len(json.loads((tmp_path / "clipforge" / "peak_tflops.json").read_text())) == 2


def test_the_probe_measures_a_positive_throughput():
    assert 0 < peak.probe(torch.float32, size=128, seconds=0.01, trials=1) < 1000
