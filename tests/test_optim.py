"""AdamW groups and learning-rate schedules against open_clip_train's own code (its installed source)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import open_clip_train
import pytest
import torch
from open_clip_train.scheduler import const_lr_cooldown, cosine_lr

from clipforge.models import ModelConfig, build_model
from clipforge.train.optim import OptimConfig, build_optimizer, build_scheduler, load_schedule_state, lr_factor


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


def layered_model(tmp_path, image_layers: int = 3, text_layers: int = 2) -> torch.nn.Module:
    """A tiny ViT CLIP whose towers have different depths, so that each must count its own."""
    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 16, "layers": image_layers, "width": 16, "head_width": 8, "patch_size": 8},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": text_layers},
    }
    path = tmp_path / "layered.json"
    path.write_text(json.dumps(config))
    return build_model(ModelConfig(name=str(path))).model


def expected_depth(name: str) -> int:
    """Layers above each parameter, written out for a 3-block image tower and a 2-block text tower."""
    table = [
        (("visual.conv1.", "visual.class_embedding", "visual.positional_embedding", "visual.ln_pre."), 4),
        (("visual.transformer.resblocks.0.",), 3),
        (("visual.transformer.resblocks.1.",), 2),
        (("visual.transformer.resblocks.2.",), 1),
        (("visual.ln_post.", "visual.proj"), 0),
        (("token_embedding.", "positional_embedding"), 3),
        (("transformer.resblocks.0.",), 2),
        (("transformer.resblocks.1.",), 1),
        (("ln_final.", "text_projection", "logit_scale"), 0),
    ]
    return next(depth for prefixes, depth in table if name.startswith(prefixes))


def test_layer_decay_gives_each_parameter_lr_times_decay_to_its_depth(tmp_path):
    model = layered_model(tmp_path)
    exclude = open_clip_exclude()
    cfg = OptimConfig(lr=1e-3, weight_decay=0.2, layer_decay=0.5)
    optimizer = build_optimizer(cfg, model)
    by_hand = {0: 1e-3, 1: 5e-4, 2: 2.5e-4, 3: 1.25e-4, 4: 6.25e-5}
    seen = set()
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            name = next(n for n, p in model.named_parameters() if p is parameter)
            seen.add(name)
            assert math.isclose(group["lr"], by_hand[expected_depth(name)], rel_tol=1e-12), name
            assert group["layer_depth"] == expected_depth(name), name
            assert group["weight_decay"] == (0.0 if exclude(name, parameter) else 0.2), name
    assert seen == {name for name, _ in model.named_parameters()}
    assert optimizer.param_groups[0]["lr"] == 1e-3  # the logged train/lr is the top group's, the undecayed rate
    assert len(optimizer.param_groups) == len({(g["layer_depth"], g["weight_decay"]) for g in optimizer.param_groups})
    off = build_optimizer(OptimConfig(lr=1e-3), model)
    # Off: open_clip_train's two groups. Undecayed: 8 per block (norms, biases) × 5, class_embedding, ln_pre, ln_post,
    # ln_final, logit_scale; decayed: 4 per block, conv1, both positional embeddings, proj, token_embedding, text_proj.
    assert [(len(g["params"]), g["weight_decay"]) for g in off.param_groups] == [(48, 0.0), (26, 0.2)]
    assert not any("layer_depth" in group for group in off.param_groups)


def test_layer_decay_counts_a_clip_resnets_stages_and_refuses_unknown_towers(tiny_resnet_json):
    from clipforge.models import layer_depths

    depths = layer_depths(build_model(ModelConfig(name=tiny_resnet_json)).model)
    assert depths["visual.conv1.weight"] == depths["visual.bn3.bias"] == 5  # the stem, below 4 stages
    assert depths["visual.layer1.0.conv1.weight"] == 4 and depths["visual.layer4.0.bn3.weight"] == 1
    assert depths["visual.attnpool.positional_embedding"] == 0  # the head's own embedding is at the top
    model = torch.nn.Module()
    model.visual = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"^optim.layer_decay: the image tower \(Linear\) has no residual blocks"):
        build_optimizer(OptimConfig(layer_decay=0.8), model)
    with pytest.raises(ValueError, match=r"^optim.layer_decay: must be in \(0, 1\], got 1.5$"):
        OptimConfig(layer_decay=1.5)


def test_layer_decay_follows_the_schedule_and_a_resume_follows_the_config(tmp_path):
    model = layered_model(tmp_path)

    def make(decay):
        cfg = OptimConfig(lr=1e-3, warmup_steps=3, layer_decay=decay)
        optimizer = build_optimizer(cfg, model)
        return optimizer, build_scheduler(cfg, optimizer, 20), cfg

    def run(optimizer, scheduler, steps):
        rates = []
        for _ in range(steps):
            rates.append([group["lr"] for group in optimizer.param_groups])
            optimizer.step()  # no gradients: the parameters stay; only the schedule moves
            scheduler.step()
        return rates

    optimizer, scheduler, cfg = make(0.5)
    rates = run(optimizer, scheduler, 8)
    for step, row in enumerate(rates):
        factor = lr_factor(step, cfg, 20)
        for group, rate in zip(optimizer.param_groups, row, strict=True):
            assert math.isclose(rate, 1e-3 * 0.5 ** group["layer_depth"] * factor, rel_tol=1e-12)
    saved = (optimizer.state_dict(), scheduler.state_dict())
    uninterrupted = run(optimizer, scheduler, 4)
    for decay in (0.5, 0.7):  # resumed with the same config (bit for bit), then with another layer_decay
        optimizer, scheduler, cfg = make(decay)
        optimizer.load_state_dict(saved[0])
        load_schedule_state(scheduler, optimizer, saved[1], cfg, 20)
        resumed = run(optimizer, scheduler, 4)
        if decay == 0.5:
            assert resumed == uninterrupted
        else:
            for step, row in enumerate(resumed):
                depths = [group["layer_depth"] for group in optimizer.param_groups]
                expected = [1e-3 * 0.7**depth * lr_factor(8 + step, cfg, 20) for depth in depths]
                assert row == pytest.approx(expected, rel=1e-12)
