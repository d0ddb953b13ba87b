"""AdamW groups and learning-rate schedules against open_clip_train's own code (its installed source)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import open_clip_train
import pytest
import torch
from open_clip_train.scheduler import const_lr_cooldown, cosine_lr

from clipforge.models import ModelConfig, build_model
from clipforge.train.optim import OptimConfig, build_optimizer, build_scheduler, load_schedule_state


def open_clip_exclude():
    """The weight-decay exemption rule as written in open_clip_train/main.py (``exclude = lambda n, p: ...``)."""
    source = (Path(open_clip_train.__file__).parent / "main.py").read_text()
    line = re.search(r"exclude = (lambda n, p: .*)", source).group(1)
    return eval(line)


@pytest.mark.parametrize("siglip", [False, True])
def test_decayed_tensors_are_open_clips(siglip, tiny_model_json, tiny_resnet_json):
    exclude = open_clip_exclude()
    for name in (tiny_model_json, tiny_resnet_json):
        extra = {"init_logit_scale": 2.302585, "init_logit_bias": -10.0} if siglip else {}
        model = build_model(ModelConfig(name=name, **extra)).model
        optimizer = build_optimizer(OptimConfig(weight_decay=0.2), model)
        names = {id(p): n for n, p in model.named_parameters()}
        decayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
        expected = {n for n, p in model.named_parameters() if not exclude(n, p)}
        assert decayed == expected and {"token_embedding.weight", "positional_embedding"} <= decayed
        exempt = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
        assert exempt | decayed == set(names.values()) and "logit_scale" in exempt
        optimizer = build_optimizer(OptimConfig(weight_decay=0.2, weight_decay_embeddings=False), model)
        decayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
        embeddings = {n for n in expected if n.endswith(("token_embedding.weight", "positional_embedding"))}
        assert decayed == expected - embeddings and "positional_embedding" in embeddings


@pytest.mark.parametrize("schedule", ["cosine", "constant-cooldown"])
def test_learning_rate_per_step_is_open_clips(schedule):
    steps, warmup, lr = 200, 30, 5e-4
    reference_optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    if schedule == "cosine":
        reference = cosine_lr(reference_optimizer, lr, warmup, steps)
        cfg = OptimConfig(lr=lr, warmup_steps=warmup, schedule="cosine")
    else:
        reference = const_lr_cooldown(reference_optimizer, lr, warmup, steps, 50, 2.0, 1e-5)
        cfg = OptimConfig(
            lr=lr, warmup_steps=warmup, schedule="constant-cooldown", cooldown_steps=50, cooldown_power=2.0, min_lr=1e-5
        )
    parameter = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.AdamW([parameter], lr=lr)
    scheduler = build_scheduler(cfg, optimizer, steps)
    for step in range(steps):  # the lr of the update at `step`, as OpenCLIP sets it before that update
        assert math.isclose(optimizer.param_groups[0]["lr"], reference(step), rel_tol=1e-12, abs_tol=1e-15), step
        optimizer.step()
        scheduler.step()


def test_constant_cooldown_needs_a_length():
    with pytest.raises(ValueError, match="optim.cooldown_steps"):
        OptimConfig(schedule="constant-cooldown")


def test_resumed_schedule_follows_the_config_and_is_unchanged_when_the_config_is():
    def make(lr):
        parameter = torch.nn.Parameter(torch.ones(3))
        optimizer = torch.optim.AdamW([parameter], lr=lr)
        cfg = OptimConfig(lr=lr, warmup_steps=5)
        return parameter, optimizer, build_scheduler(cfg, optimizer, 40), cfg

    def run(parameter, optimizer, scheduler, steps):
        lrs = []
        for _ in range(steps):
            lrs.append(optimizer.param_groups[0]["lr"])
            parameter.grad = torch.ones(3)
            optimizer.step()
            scheduler.step()
        return lrs

    parameter, optimizer, scheduler, _ = make(1e-3)
    run(parameter, optimizer, scheduler, 12)
    saved = (optimizer.state_dict(), scheduler.state_dict())
    uninterrupted = run(parameter, optimizer, scheduler, 28)
    for lr in (1e-3, 3e-4):  # resumed with the same config, then with another optim.lr
        parameter, optimizer, scheduler, cfg = make(lr)
        optimizer.load_state_dict(saved[0])
        load_schedule_state(scheduler, optimizer, saved[1], cfg, 40)
        resumed = run(parameter, optimizer, scheduler, 28)
        if lr == 1e-3:
            assert resumed == uninterrupted  # bit-identical
        else:
            assert resumed == pytest.approx([x * 0.3 for x in uninterrupted], rel=1e-12)
            assert scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-15)  # the cosine ends at min_lr


def test_resuming_with_other_weight_decay_groups_names_the_setting(synth_data, tiny_model_json, tmp_path):
    from clipforge.train.config import load_config
    from clipforge.train.loop import train

    common = [
        f"data.train_urls={synth_data}/train/{{00000..00005}}.tar",
        "data.batch_size=16",
        "data.num_workers=0",
        "data.shuffle_buffer=50",
        f"model.name={tiny_model_json}",
        f"train.output_dir={tmp_path / 'run'}",
        "checkpoint.every=2",
        "logging.progress_bar=false",
        "logging.tensorboard=false",
    ]
    train(load_config(None, [*common, "train.steps=2", "optim.weight_decay_embeddings=false"]))
    with pytest.raises(
        ValueError,
        match=r"step_00000002: its optimizer state does not fit .* "
        r"optim\.weight_decay_embeddings=false",
    ):
        train(load_config(None, [*common, "train.steps=4", "checkpoint.resume=auto"]))
    result = train(
        load_config(None, [*common, "train.steps=4", "checkpoint.resume=auto", "optim.weight_decay_embeddings=false"])
    )
    assert result["step"] == 4
