"""The negative queue with a momentum encoder (loss.queue_size): the loss against a per-row reference, the ring
buffer and EMA, and exact resume of a queue run (momentum weights and queue in the checkpoint)."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from checkpointing import dcp_weights

from clipforge.config import ConfigError
from clipforge.losses import MomentumQueue, queue_contrastive_loss
from clipforge.models import ModelConfig, build_model
from clipforge.train.config import load_config
from clipforge.train.loop import train


def test_queue_loss_matches_a_per_row_reference():
    torch.manual_seed(0)
    unit = lambda *shape: torch.nn.functional.normalize(torch.randn(*shape, dtype=torch.float64), dim=-1)
    world, local, queued, dim, rank = 3, 4, 5, 8, 1
    image, text = unit(local, dim), unit(local, dim)
    image_keys, text_keys, image_queue, text_queue = (
        unit(world * local, dim),
        unit(world * local, dim),
        unit(queued, dim),
        unit(queued, dim),
    )
    scale = torch.tensor(7.0, dtype=torch.float64)
    got = queue_contrastive_loss(image, text, image_keys, text_keys, image_queue, text_queue, scale, rank)
    total = 0.0
    for i in range(local):
        own = rank * local + i
        for query, keys, queue in ((image[i], text_keys, text_queue), (text[i], image_keys, image_queue)):
            logits = [float(scale * query @ key) for key in list(keys) + list(queue)]
            total += -logits[own] + math.log(sum(math.exp(value) for value in logits))
    assert got.item() == pytest.approx(total / (2 * local), rel=1e-6)  # the loss works in fp32


def test_ring_buffer_and_momentum_update(tiny_model_json):
    built = build_model(ModelConfig(name=tiny_model_json))
    queue = MomentumQueue(built.model, size=5, momentum=0.9)
    first, second = torch.ones(3, 64), 2 * torch.ones(3, 64)
    queue.enqueue(first, -first)
    assert queue.filled == 3 and torch.equal(queue.queued()[0], first)
    queue.enqueue(second, -second)  # 6 keys into 5 rows: the oldest one is overwritten
    images, texts = queue.queued()
    assert queue.filled == 5 and queue.pointer == 1
    assert images[:, 0].tolist() == [2.0, 1.0, 1.0, 2.0, 2.0] and torch.equal(texts, -images)
    before = {name: value.clone() for name, value in queue.encoder.state_dict().items()}
    with torch.no_grad():
        for parameter in built.model.parameters():
            parameter.add_(1.0)
    queue.update_encoder(built.model)
    online = built.model.state_dict()
    for name, value in queue.encoder.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, 0.9 * before[name] + 0.1 * online[name])


def config(synth_data, model_json, out, *extra):
    return load_config(
        None,
        [
            f"data.train_urls={synth_data}/train/{{00000..00005}}.tar",
            "data.batch_size=16",
            "data.num_workers=0",
            "data.shuffle_buffer=100",
            f"model.name={model_json}",
            "optim.lr=2e-3",
            "optim.warmup_steps=2",
            f"train.output_dir={out}",
            "checkpoint.every=3",
            "checkpoint.keep_last=5",
            "logging.log_every=1",
            "logging.progress_bar=false",
            "logging.tensorboard=false",
            "loss.queue_size=40",
            "loss.queue_momentum=0.9",
            *extra,
        ],
    )


def test_queue_run_trains_and_resumes_exactly(synth_data, tiny_resnet_json, tmp_path):
    full = train(config(synth_data, tiny_resnet_json, tmp_path / "full", "train.steps=6"))
    assert full["step"] == 6 and math.isfinite(full["metrics"]["train/loss"])
    partial = tmp_path / "partial" / "checkpoints"
    partial.mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_00000003", partial / "step_00000003")
    state = torch.load(partial / "step_00000003" / "state.pt", weights_only=True)
    assert state["queue"]["filled"] == 40 and state["queue"]["pointer"] == 8  # 3 × 16 keys into 40 rows
    train(config(synth_data, tiny_resnet_json, tmp_path / "partial", "train.steps=6", "checkpoint.resume=auto"))
    expected = dcp_weights(tmp_path / "full" / "checkpoints" / "step_00000006")
    got = dcp_weights(tmp_path / "partial" / "checkpoints" / "step_00000006")
    assert all(torch.equal(expected[name], got[name]) for name in expected)


def test_queue_refuses_what_it_cannot_combine_with(synth_data, tiny_resnet_json, tmp_path):
    with pytest.raises(ConfigError, match="loss.queue_size works with the plain CLIP loss only"):
        config(synth_data, tiny_resnet_json, tmp_path, "loss.tile_size=8")
    with pytest.raises(ConfigError, match="train.accum_steps"):
        config(synth_data, tiny_resnet_json, tmp_path, "train.accum_steps=2")
