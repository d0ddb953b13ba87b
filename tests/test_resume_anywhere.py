"""The trainer resumed with another global batch (another data.batch_size, or another world size) trains on the same
number of samples, along the same learning-rate schedule counted in samples; the checkpoints it resumes from were
written in the background (``checkpoint.async_save``)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from ranks import launch_ranks

from clipforge.train.config import load_config
from clipforge.train.loop import train


def write_config(path: Path, synth_data: Path, model_json: str, out: Path) -> Path:
    cfg = {
        "data": {
            "train_urls": f"{synth_data}/train/{{00000..00005}}.tar",
            "batch_size": 16,
            "num_workers": 1,
            "shuffle_buffer": 50,
            "shuffle_initial": 10,
        },
        "model": {"name": model_json},
        "optim": {"lr": 1e-3, "warmup_steps": 2},
        "train": {"output_dir": str(out), "steps": 6},
        "checkpoint": {"every": 2, "keep_last": 5, "async_save": True},
        "logging": {"log_every": 1, "progress_bar": False, "tensorboard": False, "plot": False},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def metric(run_dir: Path, name: str) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[name] for r in records if name in r}


def from_step_2(run: Path, copy: Path) -> Path:
    """A copy of ``run`` whose latest checkpoint is the one of step 2."""
    shutil.copytree(run, copy, symlinks=True)
    for later in copy.glob("checkpoints/step_*"):
        if later.name != "step_00000002":
            shutil.rmtree(later)
    (copy / "checkpoints" / "latest").unlink()
    os.symlink("step_00000002", copy / "checkpoints" / "latest")
    (copy / "metrics.jsonl").write_text("")
    return copy


def train_state(checkpoint: Path) -> dict:
    return torch.load(checkpoint / "state.pt", weights_only=True)["train"]


def test_half_the_batch_takes_twice_the_steps_along_the_same_schedule(synth_data, tiny_model_json, tmp_path):
    config = write_config(tmp_path / "cfg.yaml", synth_data, tiny_model_json, tmp_path / "run")
    assert train(load_config(config))["step"] == 6
    resumed = from_step_2(tmp_path / "run", tmp_path / "resumed")
    result = train(load_config(config, [f"train.output_dir={resumed}", "checkpoint.resume=auto", "data.batch_size=8"]))
    assert result["step"] == 2 + (6 - 2) * 16 // 8  # the same 96 samples in all
    assert train_state(resumed / "checkpoints" / "step_00000010") == {"step": 10, "samples": 96, "reference_batch": 16}
    original, halved = metric(tmp_path / "run", "train/lr"), metric(resumed, "train/lr")
    for step in (3, 4, 5, 6):  # the rate after `step` full-batch steps = after 2 + 2 × (step - 2) half-batch steps
        assert halved[2 + 2 * (step - 2)] == pytest.approx(original[step], rel=1e-12, abs=1e-15), step


@pytest.mark.slow
def test_two_ranks_resume_on_one(synth_data, tiny_model_json, tmp_path):
    config = write_config(tmp_path / "cfg.yaml", synth_data, tiny_model_json, tmp_path / "run")
    command = [str(Path(sys.executable).parent / "python"), "-m", "clipforge", "train", str(config)]
    results = launch_ranks(command, 2, timeout=600)
    assert all(code == 0 for code, _ in results), results[0][1][-3000:]
    assert {p.name for p in (tmp_path / "run" / "checkpoints" / "step_00000002").iterdir()} >= {
        "__0_0.distcp",
        "__1_0.distcp",
        "data_rank1.json",
    }
    resumed = from_step_2(tmp_path / "run", tmp_path / "resumed")
    result = train(load_config(config, [f"train.output_dir={resumed}", "checkpoint.resume=auto"]))
    assert result["step"] == 2 + (6 - 2) * 2  # one rank: half the global batch
    assert train_state(resumed / "checkpoints" / "step_00000010")["samples"] == 6 * 32
