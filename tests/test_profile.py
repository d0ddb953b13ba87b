"""Where the time goes: the profiled step's breakdown and its diagnosis, MFU in the logs, traces, and a profiler
that costs nothing when off."""

from __future__ import annotations

import json
import logging
import time

import pytest
import torch

from clipforge.config import ConfigError
from clipforge.data.loader import TrainLoader
from clipforge.train import profile
from clipforge.train.config import load_config
from clipforge.train.loop import train
from clipforge.train.profile import OFF, Setting, StepProfiler, diagnose, median_image_side

PARTS = ("data_wait", "copy", "image_forward", "text_forward", "loss", "backward", "optimizer", "other")


def overrides(synth_data, tiny_model_json, out, *extra):
    return [
        f"data.train_urls={synth_data}/train/{{00000..00005}}.tar",
        "data.batch_size=32",
        "data.num_workers=1",
        "data.shuffle_buffer=100",
        f"model.name={tiny_model_json}",
        f"train.output_dir={out}",
        "checkpoint.every=100",
        "logging.peak_tflops=0.5",
        "logging.progress_bar=false",
        "logging.tensorboard=false",
        "logging.plot=false",
        *extra,
    ]


def test_a_slow_data_source_shows_in_the_breakdown_and_the_diagnosis(
    synth_data, tiny_model_json, tmp_path, monkeypatch, caplog
):
    next_batch = TrainLoader.__next__

    def slow(self):
        time.sleep(1.5)  # a data source the step has to wait for (longer than a step on a loaded 2-core CPU)
        return next_batch(self)

    monkeypatch.setattr(TrainLoader, "__next__", slow)
    out = tmp_path / "run"
    cfg = load_config(
        None,
        overrides(
            synth_data,
            tiny_model_json,
            out,
            "train.steps=4",
            "logging.log_every=2",
            "logging.profile_every=2",
            "logging.trace_steps=3-3",
        ),
    )
    with caplog.at_level(logging.WARNING, logger="clipforge.train"):
        train(cfg)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        parts = {name: record[f"time/{name}_s"] for name in PARTS}
        assert all(seconds >= 0 for seconds in parts.values()), parts
        assert sum(parts.values()) == pytest.approx(record["time/step_s"], rel=1e-6)
        assert parts["other"] < 0.25 * record["time/step_s"], parts  # the named parts are the step
        assert parts["data_wait"] >= 1.4 and parts["image_forward"] > 0 and parts["backward"] > 0
        # MFU on every line: the model FLOPs of the window against logging.peak_tflops
        assert record["perf/model_tflops_per_device"] > 0
        assert record["perf/mfu"] == pytest.approx(record["perf/model_tflops_per_device"] / 0.5)
    diagnoses = [r.getMessage() for r in caplog.records if "where the time goes" in r.getMessage()]
    assert len(diagnoses) == 2 and all("raise data.num_workers (have 1," in line for line in diagnoses), diagnoses
    assert all(line.startswith("where the time goes: data wait ") for line in diagnoses)
    traces = list((out / "traces").glob("*.pt.trace.json"))
    assert len(traces) == 1 and '"aten::addmm"' in traces[0].read_text()  # the step's kernels, for Perfetto


def test_without_profiling_no_step_is_timed_and_nothing_synchronises(monkeypatch, tiny_model_json):
    profiler = StepProfiler(0, None, "cuda:0", None)
    assert all(profiler.recorder(step) is OFF for step in range(1, 200))
    assert OFF.part("loss") is OFF.forward(torch.nn.Linear(1, 1)) and not OFF.active

    def forbidden(*args, **kwargs):
        raise AssertionError("the off path synchronised or read a clock")

    from clipforge.losses import LossConfig, build_loss
    from clipforge.models import ModelConfig, build_model
    from clipforge.train.optim import OptimConfig, build_optimizer, build_scheduler
    from clipforge.train.step import build_step

    built = build_model(ModelConfig(name=tiny_model_json))
    optimizer = build_optimizer(OptimConfig(warmup_steps=0), built.model)
    step = build_step(
        built.model,
        build_loss(LossConfig()),
        optimizer,
        build_scheduler(OptimConfig(), optimizer, 10),
        device="cpu",
        precision="fp32",
        grad_clip_norm=1.0,
        max_logit_scale=100,
    )
    batch = {"images": torch.randn(4, 3, 32, 32), "texts": built.tokenizer(["a red circle"] * 4)}
    monkeypatch.setattr(torch.cuda, "synchronize", forbidden)
    monkeypatch.setattr(profile.time, "perf_counter", forbidden)
    step(batch, OFF)
    step(batch)


def test_profile_every_picks_its_steps_and_trace_steps_are_checked():
    profiler = StepProfiler(3, "5-6", "cpu", None)
    profiler._start_trace = lambda: None  # the steps it picks, not the tracing
    picked = [step for step in range(1, 10) if profiler.recorder(step) is not OFF]
    assert picked == [3, 5, 6, 9]
    for bad in ("6-5", "0", "x"):
        with pytest.raises(ConfigError, match="logging.trace_steps"):
            load_config(None, ["data.train_urls=data/{00000..00001}.tar", f"logging.trace_steps={bad}"])


SETTING = Setting(num_workers=4, cpu_count=16, image_size=224, world_size=1, fused_optimizer=True)


def test_the_diagnosis_names_the_dominant_part_and_what_to_try():
    compute = {"data_wait": 0.01, "copy": 0.01, "image_forward": 0.3, "text_forward": 0.1, "loss": 0.02}
    assert diagnose({**compute, "backward": 0.5, "optimizer": 0.05, "other": 0.01, "step": 1.0}, SETTING) is None
    waiting = {**compute, "data_wait": 0.38, "backward": 0.15, "optimizer": 0.02, "other": 0.01, "step": 1.0}
    big = Setting(**{**SETTING.__dict__, "median_image_side": "1024-2047"})
    assert diagnose(waiting, big) == (
        "data wait 38% of step: raise data.num_workers (have 4, 16 cores) or pre-resize shards "
        "(median image 1024-2047 px on its shorter side for 224 px training)"
    )
    assert "prep inspect" in diagnose(waiting, SETTING)
    slow_optimizer = {**compute, "backward": 0.2, "optimizer": 0.35, "other": 0.01, "step": 1.0}
    assert diagnose(slow_optimizer, Setting(**{**SETTING.__dict__, "fused_optimizer": False})).startswith(
        "optimizer 35% of step: foreach AdamW: set optim.fused=true"
    )


def test_the_median_image_size_comes_from_prep_inspect(tmp_path):
    (tmp_path / "_stats.json").write_text(
        json.dumps({"inspect": {"image_shorter_side": {"<32": 0, "256-511": 3, "512-1023": 5, ">=2048": 1}}})
    )
    assert median_image_side([str(tmp_path / "00000.tar")]) == "512-1023"
    assert median_image_side([str(tmp_path / "missing" / "00000.tar")]) is None
    assert median_image_side(["pipe:curl -s https://host/00000.tar"]) is None


def test_an_objectives_own_part_is_a_share_of_the_loss_not_counted_again():
    """``loss/NAME`` parts nest inside ``loss``: ``other`` is the step less the top-level parts only."""

    class Clock:  # marks at scripted seconds
        def __init__(self, times):
            self.times = iter(times)

        def mark(self):
            return next(self.times)

        def seconds(self, start, end):
            return end - start

        def synchronize(self):
            pass

    finished = []
    recorder = profile.StepRecorder(0, "cpu", finished.append, split_towers=False)
    # begin 0; forward 0-2; loss 2-7 holding loss/contrastive 2-3 and loss/locca 3-6; backward 7-9; end 10
    recorder.clock, recorder.begin = Clock([0.0, 2.0, 2.0, 2.0, 3.0, 3.0, 6.0, 7.0, 7.0, 9.0, 10.0]), 0.0
    with recorder.part("forward"):
        pass
    with recorder.part("loss"):
        with recorder.part("loss/contrastive"):
            pass
        with recorder.part("loss/locca"):
            pass
    with recorder.part("backward"):
        pass
    recorder.finish()
    breakdown = finished[0].breakdown
    assert breakdown["loss/contrastive"] == 1.0 and breakdown["loss/locca"] == 3.0
    assert breakdown["loss"] == 5.0 and breakdown["step"] == 10.0
    assert breakdown["other"] == 1.0  # 10 - (2 + 5 + 2): the nested parts are not subtracted again
