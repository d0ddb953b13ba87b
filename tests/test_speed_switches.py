"""Every speed switch is a config key, and training with it on still learns (loss falls, weights move)."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from checkpointing import dcp_weights

from clipforge.models import build_model
from clipforge.train.config import load_config
from clipforge.train.loop import train
from clipforge.train.parallel import apply_training_options


def run(synth_data, model_json, out, *extra, steps=12):
    cfg = load_config(
        None,
        [
            f"data.train_urls={synth_data}/train/{{00000..00005}}.tar",
            "data.batch_size=32",
            "data.num_workers=1",
            "data.shuffle_buffer=200",
            f"model.name={model_json}",
            "optim.lr=2e-3",
            "optim.warmup_steps=2",
            f"train.steps={steps}",
            "checkpoint.every=1000",
            f"train.output_dir={out}",
            "train.seed=3",
            "logging.log_every=1",
            "logging.progress_bar=false",
            "logging.tensorboard=false",
            *extra,
        ],
    )
    train(cfg)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    curve = [r["train/loss"] for r in records if "train/loss" in r]
    return cfg, curve, dcp_weights(out / "checkpoints" / "latest")


SWITCHES = {
    "bf16": ["train.precision=bf16"],
    "fp16": ["train.precision=fp16"],
    "foreach_adamw": ["optim.fused=false"],
    "channels_last": ["speed.channels_last=true"],
    "compile": ["speed.compile=true"],
    "grad_checkpointing": ["model.grad_checkpointing=true"],
    "patch_dropout": ["model.patch_dropout=0.5"],
}
SLOW = {"compile"}  # inductor compiles for ~2 minutes on a 2-core CPU


@pytest.mark.parametrize("switch", [pytest.param(s, marks=pytest.mark.slow) if s in SLOW else s for s in SWITCHES])
def test_training_with_the_switch_learns(switch, synth_data, tiny_model_json, tmp_path):
    if switch == "compile":
        pytest.importorskip("torch._inductor")
    cfg, curve, weights = run(synth_data, tiny_model_json, tmp_path / "run", *SWITCHES[switch])
    assert len(curve) == 12 and all(math.isfinite(x) for x in curve)
    assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3, curve  # learning, not just running
    torch.manual_seed(cfg.train.seed)  # the trainer's initialisation, rebuilt
    initial = build_model(cfg.model).model.state_dict()
    moved = [k for k in weights if not torch.equal(initial[k], weights[k])]
    assert len(moved) > 0.8 * len(weights), f"only {len(moved)} of {len(weights)} tensors changed"


def test_channels_last_auto_is_on_for_a_convolutional_tower_only(tiny_model_json, tiny_resnet_json):
    from clipforge.models import ModelConfig
    from clipforge.train.parallel import use_channels_last

    resnet, vit = (build_model(ModelConfig(name=name)).model for name in (tiny_resnet_json, tiny_model_json))
    assert use_channels_last("auto", resnet) and not use_channels_last("auto", vit)
    assert use_channels_last(True, vit) and not use_channels_last(False, resnet)
    with pytest.raises(ValueError, match="speed.channels_last: must be true, false or 'auto', got 'yes please'"):
        load_config(None, ["data.train_urls=x.tar", "speed.channels_last=yes please"])


def test_channels_last_changes_the_layout_not_the_training(synth_data, tiny_resnet_json, tmp_path, caplog):
    """The convolutional tower (where 'auto' turns it on) trains to the same losses and weights either way."""
    runs = {}
    for flag in ("true", "false"):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="clipforge.train"):
            runs[flag] = run(synth_data, tiny_resnet_json, tmp_path / flag, f"speed.channels_last={flag}", steps=6)
        assert ("channels-last memory format" in caplog.text) == (flag == "true")  # the setting took effect
    (_, curve_cl, weights_cl), (cfg, curve, weights) = runs["true"], runs["false"]
    # summation order differs (convolution, batch norm): equal to float rounding, compounded over 6 steps
    torch.testing.assert_close(torch.tensor(curve_cl), torch.tensor(curve), rtol=1e-3, atol=1e-5)
    torch.manual_seed(cfg.train.seed)
    initial = build_model(cfg.model).model.state_dict()
    float_keys = [k for k, v in weights.items() if v.is_floating_point()]
    moved = sum((weights[k] - initial[k]).double().norm() ** 2 for k in float_keys) ** 0.5
    apart = sum((weights_cl[k] - weights[k]).double().norm() ** 2 for k in float_keys) ** 0.5
    assert apart < 0.01 * moved, (apart, moved)  # the runs differ by rounding, not by what they learned


def locked_run(synth_data, model_json, out, locked_tower, *switches):
    """Train 6 steps with a tower locked; (frozen, unlocked) names of that tower's tensors, after checking that the
    frozen ones are bit-identical to the initial weights, the unlocked ones moved, and the other tower learned."""
    cfg, _, weights = run(synth_data, model_json, out, *switches, steps=6)
    torch.manual_seed(cfg.train.seed)  # the trainer's initialisation, rebuilt
    initial = build_model(cfg.model).model
    apply_training_options(initial, cfg.model)  # the locks, as the trainer's preparation applies them
    trainable = {n for n, p in initial.named_parameters() if p.requires_grad}
    state = initial.state_dict()
    in_image = {k: k.startswith("visual.") for k in weights if k not in ("logit_scale", "logit_bias")}
    tower = [k for k, image in in_image.items() if image == (locked_tower == "image")]
    other = [k for k, image in in_image.items() if image != (locked_tower == "image")]
    frozen = [k for k in tower if k not in trainable]
    unlocked = [k for k in tower if k in trainable]
    assert all(torch.equal(state[k], weights[k]) for k in frozen)  # locked: bit-identical after training
    assert all(not torch.equal(state[k], weights[k]) for k in unlocked)
    assert sum(not torch.equal(state[k], weights[k]) for k in other) > 0.8 * len(other)
    return frozen, unlocked


def test_lit_locked_image_tower_stays_frozen_while_the_text_tower_learns(synth_data, tiny_model_json, tmp_path):
    frozen, unlocked = locked_run(
        synth_data,
        tiny_model_json,
        tmp_path / "run",
        "image",
        "model.lock_image=true",
        "model.lock_image_unlocked_groups=1",
    )
    assert frozen and unlocked  # one group (the last: ln_post and proj) left trainable


def test_locked_text_tower_stays_frozen_while_the_image_tower_learns(synth_data, tiny_model_json, tmp_path):
    frozen, unlocked = locked_run(
        synth_data,
        tiny_model_json,
        tmp_path / "run",
        "text",
        "model.lock_text=true",
        "model.lock_text_unlocked_layers=1",
    )
    assert frozen and unlocked == ["text_projection"]  # open_clip's last group


def test_switches_that_cannot_apply_are_refused(tiny_resnet_json):
    from clipforge.models import ModelConfig

    with pytest.raises(ValueError, match="model.patch_dropout: ModifiedResNet image towers have no patches"):
        build_model(ModelConfig(name=tiny_resnet_json, patch_dropout=0.5))
    with pytest.raises(ValueError, match="model.patch_dropout: must be in"):
        ModelConfig(patch_dropout=1.5)


@pytest.fixture
def torch_backend_settings():
    """apply_cuda_settings changes process-wide settings: put them back after each case."""
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.benchmark = False
    yield
    torch.set_float32_matmul_precision(saved[0])
    torch.backends.cudnn.benchmark = saved[1]


@pytest.mark.parametrize(
    "device, options, precision, benchmark",
    [
        ("cuda:0", {}, "high", True),  # the defaults on a GPU: TF32 matmuls, cuDNN autotuning
        ("cuda:1", {"precision": "bf16"}, "highest", True),  # autocast runs keep their fp32 matmuls (the loss) in fp32
        ("cuda:0", {"tf32": False, "cudnn_benchmark": False}, "highest", False),
        ("cuda:0", {"tf32": False}, "highest", True),
        ("cpu", {}, "highest", False),  # a CPU run leaves torch as it is
    ],
)
def test_cuda_settings_apply_on_a_gpu_device_as_switched(device, options, precision, benchmark, torch_backend_settings):
    from clipforge.train.config import RunConfig, SpeedConfig, TrainConfig
    from clipforge.train.loop import apply_cuda_settings

    speed_options = {"cudnn_benchmark": options.pop("cudnn_benchmark")} if "cudnn_benchmark" in options else {}
    apply_cuda_settings(
        RunConfig(train=TrainConfig(**options), speed=SpeedConfig(**speed_options)), device
    )  # only flags: no GPU needed to set them
    assert torch.get_float32_matmul_precision() == precision
    assert torch.backends.cudnn.benchmark is benchmark


def test_compiled_model_keeps_one_graph_for_every_trimmed_caption_length(synth_data, tiny_model_json):
    """What the loop does with speed.compile and trimmed captions (prepare_batch marks the length dynamic), counted
    by dynamo's CompileCounter backend: unmarked, a second length recompiles."""
    from torch._dynamo.testing import CompileCounter

    from clipforge.data import DataConfig, build_train_loader
    from clipforge.models import ModelConfig, enable_text_trimming
    from clipforge.train.loop import prepare_batch

    built = build_model(ModelConfig(name=tiny_model_json))
    assert enable_text_trimming(built.model)
    loader = build_train_loader(
        DataConfig(train_urls=f"{synth_data}/train/00000.tar", batch_size=4, num_workers=0, shuffle_buffer=50),
        built.preprocess_cfg,
        built.tokenizer,
        trim_text=True,
    )
    batches = [next(loader) for _ in range(12)]
    lengths = {batch["texts"].shape[1] for batch in batches}
    assert len(lengths) >= 3, lengths  # the test is not vacuous: the trimmed length changes between batches
    counts = {}
    for dynamic in (True, False):
        torch._dynamo.reset()
        counter = CompileCounter()
        model = build_model(ModelConfig(name=tiny_model_json)).model
        enable_text_trimming(model)
        model.compile(backend=counter)
        for batch in batches:
            fresh = {**batch, "texts": batch["texts"].clone()}  # the mark is an attribute of the tensor: not shared
            prepared = prepare_batch(fresh, loader.transform, "cpu", False, dynamic_text=dynamic)
            model(prepared["images"], prepared["texts"])
        counts[dynamic] = counter.frame_count
    torch._dynamo.reset()
    assert counts == {True: 1, False: 2}, counts
