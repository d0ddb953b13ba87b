"""What a training run reports: JSONL/TensorBoard metrics, and W&B through accelerate's tracker."""

from __future__ import annotations

import json
import sys
import types

import pytest

from clipforge.config import ConfigError
from clipforge.train.config import load_config
from clipforge.train.loop import train


class FakeWandb(types.ModuleType):
    """Records what accelerate's WandBTracker asks of the wandb module (no network, no wandb install)."""

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logged, self.configs, self.finished = [], [], [], 0
        self.config = types.SimpleNamespace(update=lambda values, allow_val_change: self.configs.append(values))

    def init(self, **kwargs):
        self.inits.append(kwargs)
        fake = self
        return types.SimpleNamespace(
            id=kwargs.get("id") or "run123",
            log=lambda values, step=None: fake.logged.append((step, values)),
            finish=lambda: setattr(fake, "finished", fake.finished + 1),
        )


def overrides(synth_data, tiny_model_json, out, *extra):
    return [
        f"data.train_urls={synth_data}/train/{{00000..00005}}.tar",
        "data.batch_size=32",
        "data.num_workers=1",
        "data.shuffle_buffer=100",
        f"model.name={tiny_model_json}",
        f"train.output_dir={out}",
        "checkpoint.every=3",
        "logging.log_every=2",
        "logging.progress_bar=false",
        *extra,
    ]


def test_metrics_cover_loss_lr_temperature_throughput_memory_and_wandb(
    synth_data, tiny_model_json, tmp_path, monkeypatch
):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: object() if name == "wandb" else None)
    cfg = load_config(
        None,
        overrides(
            synth_data,
            tiny_model_json,
            tmp_path / "run",
            "train.steps=4",
            "logging.wandb=true",
            "logging.wandb_project=proj",
        ),
    )
    train(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    for key in (
        "train/loss",
        "train/lr",
        "train/temperature",
        "train/logit_scale",
        "train/grad_norm",
        "perf/samples_per_s",
        "perf/samples_per_s_per_device",
        "perf/data_wait_fraction",
        "perf/step_time_s",
        "perf/compute_time_s",
        "perf/max_memory_mb",
        "train/nonfinite_steps",
    ):
        assert key in last, key
    assert last["perf/max_memory_mb"] > 50 and 0 <= last["perf/data_wait_fraction"] <= 1
    # TensorBoard: the same scalars at the same steps as metrics.jsonl
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    logged = {r["step"]: r["train/loss"] for r in records if "train/loss" in r}
    scalars = {e.step: e.value for e in events.Scalars("train/loss")}
    assert scalars.keys() == logged.keys() and len(logged) == 2
    assert all(scalars[step] == pytest.approx(logged[step], rel=1e-6) for step in logged)  # stored as float32
    assert {e.step for e in events.Scalars("perf/samples_per_s")} == logged.keys()
    # W&B: one run, in the run directory, the whole config, and exactly the numbers of metrics.jsonl
    assert fake.inits == [
        {"project": "proj", "name": "run", "dir": str(tmp_path / "run"), "id": None, "resume": "allow"}
    ]
    assert fake.configs[0]["optim.lr"] == cfg.optim.lr and fake.configs[0]["train.steps"] == 4
    assert [step for step, _ in fake.logged] == [r["step"] for r in records]
    assert fake.logged[-1][1]["train/loss"] == last["train/loss"] and fake.finished == 1
    # a resumed run continues the same W&B run
    cfg = load_config(
        None,
        overrides(
            synth_data,
            tiny_model_json,
            tmp_path / "run",
            "train.steps=6",
            "logging.wandb=true",
            "logging.wandb_project=proj",
            "checkpoint.resume=auto",
        ),
    )
    train(cfg)
    assert fake.inits[-1]["id"] == "run123"


def test_wandb_without_the_package_is_refused_before_any_work(monkeypatch, tmp_path):
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    with pytest.raises(ConfigError, match="logging.wandb=true needs the wandb package"):
        load_config(None, ["data.train_urls=x.tar", "logging.wandb=true"])


def test_progress_bar_only_on_rank_0(tmp_path, monkeypatch):
    from clipforge.train.metrics import LoggingConfig, MetricLogger

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # as in a terminal
    loggers = [MetricLogger(tmp_path, LoggingConfig(tensorboard=False), 10, 0, rank == 0) for rank in (0, 1)]
    assert loggers[0].bar is not None and loggers[0].bar.total == 10
    assert loggers[1].bar is None
    for logger in loggers:
        logger.close()
