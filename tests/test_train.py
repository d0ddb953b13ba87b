"""End-to-end training on the synthetic set: learning happens, and resume is exact."""

import json

import pytest
import torch
from checkpointing import dcp_weights

from clipforge.evaluation import OpenClipEncoder, load_eval_model, load_suite, run_suite
from clipforge.models import build_model
from clipforge.train.config import load_config
from clipforge.train.loop import train


def config(synth_data, tiny_model_json, out, *extra):
    return load_config(
        None,
        [
            f"data.train_urls={synth_data}/train/{{00000..00005}}.tar",
            "data.batch_size=64",
            "data.num_workers=2",
            "data.shuffle_buffer=500",
            f"model.name={tiny_model_json}",
            "optim.lr=2e-3",
            "optim.warmup_steps=10",
            "optim.weight_decay=0.05",
            f"train.output_dir={out}",
            "logging.log_every=1",
            "logging.progress_bar=false",
            "logging.tensorboard=false",
            *extra,
        ],
    )


def losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def test_loss_falls_and_zero_shot_beats_chance(synth_data, synth_suite, tiny_resnet_json, tmp_path):
    cfg = config(
        synth_data,
        tiny_resnet_json,
        tmp_path / "run",
        "train.steps=150",
        "checkpoint.every=1000",
        f"eval.suite={synth_suite}",
        "eval.batch_size=100",
        "logging.plot=true",
    )
    initial = build_model(cfg.model)
    untrained = run_suite(
        OpenClipEncoder(initial.model.eval()),
        initial.tokenizer,
        initial.eval_transform,
        load_suite(synth_suite),
        100,
        0,
    )
    result = train(cfg)
    curve = losses(tmp_path / "run")
    first, last = sum(curve[s] for s in range(1, 11)) / 10, sum(curve[s] for s in range(141, 151)) / 10
    assert last < 0.7 * first, (first, last)
    evaluated = json.loads((tmp_path / "run" / "eval" / "step_00000150.json").read_text())
    assert result["eval"]["eval/colors/acc1"] == evaluated["colors"]["acc1"]
    assert evaluated["colors"]["acc1"] > 0.5 > untrained["colors"]["acc1"] + 0.15  # chance is 1/6
    assert evaluated["retrieval"]["image_retrieval_recall@5"] > 3 * 5 / 100  # chance is 5%
    # the trainer evaluated in eval mode: `clipforge eval` of the saved checkpoint gives the very same numbers
    loaded = load_eval_model(str(tmp_path / "run" / "checkpoints" / "latest"), None, None, "cpu", False)
    again = run_suite(loaded.encoder, loaded.tokenizer, loaded.transform, load_suite(synth_suite), 100, 0)
    assert again["shapes"]["acc1"] == evaluated["shapes"]["acc1"]
    assert again["retrieval"]["text_retrieval_recall@1"] == evaluated["retrieval"]["text_retrieval_recall@1"]
    assert (tmp_path / "run" / "curves.png").stat().st_size > 10_000
    assert (tmp_path / "run" / "config.yaml").read_text() == (
        tmp_path / "run" / "checkpoints" / "latest" / "config.yaml"
    ).read_text()


def test_evaluation_during_training_leaves_training_unchanged(synth_data, synth_suite, tiny_resnet_json, tmp_path):
    """Evaluating every 2 steps must not touch the model: batch-norm statistics included (the tiny ResNet has them)."""
    common = (
        "train.steps=6",
        "checkpoint.every=100",
        "data.shuffle_buffer=100",
        "data.num_workers=0",
        f"eval.suite={synth_suite}",
        "eval.batch_size=100",
    )
    train(config(synth_data, tiny_resnet_json, tmp_path / "plain", *common))
    train(config(synth_data, tiny_resnet_json, tmp_path / "evaluated", *common, "eval.every_n_steps=2"))
    assert sorted(p.name for p in (tmp_path / "evaluated" / "eval").glob("*.json")) == [
        "step_00000002.json",
        "step_00000004.json",
        "step_00000006.json",
    ]
    plain = dcp_weights(tmp_path / "plain" / "checkpoints" / "latest")
    evaluated = dcp_weights(tmp_path / "evaluated" / "checkpoints" / "latest")
    assert any("running_mean" in name for name in plain)
    assert all(plain[name].equal(evaluated[name]) for name in plain)
    assert losses(tmp_path / "plain") == losses(tmp_path / "evaluated")


def test_resume_continues_exactly(synth_data, tiny_model_json, tmp_path):
    common = ("train.steps=8", "checkpoint.every=3", "checkpoint.keep_last=5", "data.shuffle_buffer=100")
    train(config(synth_data, tiny_model_json, tmp_path / "full", *common))
    checkpoints = tmp_path / "full" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "latest",
        "step_00000003",
        "step_00000006",
        "step_00000008",
    ]
    # a second run directory that stopped after step 3: copy its checkpoint, resume with --resume latest
    partial = tmp_path / "partial" / "checkpoints"
    partial.mkdir(parents=True)
    import shutil

    shutil.copytree(checkpoints / "step_00000003", partial / "step_00000003")
    train(config(synth_data, tiny_model_json, tmp_path / "partial", *common, "checkpoint.resume=latest"))
    full, resumed = losses(tmp_path / "full"), losses(tmp_path / "partial")
    assert sorted(resumed) == [4, 5, 6, 7, 8]
    assert [resumed[s] for s in range(4, 9)] == [full[s] for s in range(4, 9)]
    weights_full = dcp_weights(checkpoints / "latest")
    weights_resumed = dcp_weights(partial / "latest")
    for name, tensor in weights_full.items():
        assert torch.equal(tensor, weights_resumed[name]), name
    state = torch.load(partial / "latest" / "state.pt", weights_only=True)
    assert state["train"]["step"] == 8 and state["schedule"]["last_epoch"] == 8


def test_incomplete_checkpoints_are_ignored(synth_data, tiny_model_json, tmp_path):
    from clipforge.train.checkpoint import Checkpointer

    train(config(synth_data, tiny_model_json, tmp_path / "run", "train.steps=2", "checkpoint.every=1"))
    checkpoints = tmp_path / "run" / "checkpoints"
    (checkpoints / ".step_00000009.tmp").mkdir()  # a save that was killed mid-way
    broken = checkpoints / "step_00000010"
    broken.mkdir()
    (broken / "__0_0.distcp").write_bytes(b"half")
    assert Checkpointer(checkpoints).latest().name == "step_00000002"


def test_fixed_temperature_and_siglip_training(synth_data, tiny_model_json, tmp_path):
    import math

    cfg = config(
        synth_data,
        tiny_model_json,
        tmp_path / "run",
        "train.steps=3",
        "loss.kind=siglip",
        "loss.learn_temperature=false",
        "model.init_logit_scale=2.302585",
        "model.init_logit_bias=-10",
        "train.accum_steps=4",
        "loss.tile_size=16",
    )
    train(cfg)
    weights = dcp_weights(tmp_path / "run" / "checkpoints" / "latest")
    assert weights["logit_scale"].item() == pytest.approx(math.log(10), abs=1e-6)
    assert weights["logit_bias"].item() == -10.0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["train/temperature"] == pytest.approx(0.1, rel=1e-5) for r in records if "train/loss" in r)


def test_siglip_needs_a_bias_in_the_config(synth_data, tiny_model_json, tmp_path):
    from clipforge.config import ConfigError

    with pytest.raises(ConfigError, match="model.init_logit_bias"):
        config(synth_data, tiny_model_json, tmp_path, "loss.kind=siglip")
    with pytest.raises(ConfigError, match="not divisible by train.accum_steps=5"):
        config(synth_data, tiny_model_json, tmp_path, "train.accum_steps=5")


def test_skipped_inputs_reach_the_training_metrics(synth_data, tiny_model_json, tmp_path):
    from clipforge.data.shards import write_tar

    write_tar(
        tmp_path / "bad.tar",
        iter(
            [{"__key__": f"bad{i}", "jpg": b"\xff\xd8\xff junk", "txt": "corrupt"} for i in range(3)]
            + [{"__key__": "nocap", "jpg": b"\xff\xd8\xff"}]
        ),
    )
    cfg = config(synth_data, tiny_model_json, tmp_path / "run", "train.steps=10", "checkpoint.every=100")
    cfg.data.train_urls = f"{synth_data}/train/00000.tar::{tmp_path}/bad.tar"  # 500 samples: 7 steps an epoch
    train(cfg)
    last = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["train/epoch"] == 1
    # counts accumulate over the run: 3 corrupt images and 1 missing caption per pass over bad.tar
    passes = last["data/skipped_missing_caption"]
    assert passes in (1, 2) and last["data/skipped_corrupt_image"] == 3 * passes
