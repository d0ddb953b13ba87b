"""Checkpoints written by the revision before the components step (tests/fixtures/old_checkpoints: the plain
single-process layout, the async-checkpoint DCP layout, a momentum-queue run) resume with this code to the losses that
revision logged when it resumed them itself, and export to a transformers CLIPModel that embeds as the fixture's own
weights do in open_clip. The references are the old code's numbers (expected.json) and the weights read from the
fixture with safetensors and torch.distributed.checkpoint directly, never through clipforge."""

from __future__ import annotations

import json
import math
import tarfile
import warnings
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from clipforge.cli import main
from clipforge.train import config as train_config

FIXTURES = Path(__file__).parent / "fixtures" / "old_checkpoints"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())
RUNS = sorted(EXPECTED["runs"])

# The one place where config key names are adapted: the fixtures' runs were configured with the old names
# (expected.json). A key that moved since is written where the project's table of moved keys (the one its config
# errors quote to a user with an old config) says it went; a revision without that table reads every key where the
# fixtures' runs had it.
RENAMED: dict[str, str] = getattr(train_config, "MOVED", {})


def current(overrides: list[str]) -> list[str]:
    """The old run's ``KEY=VALUE`` overrides, under this code's key names."""
    renamed = []
    for override in overrides:
        key, value = override.split("=", 1)
        renamed.append(f"{RENAMED.get(key, key)}={value}")
    return renamed


def run_overrides(run: str, output_dir: str) -> list[str]:
    """The configuration the old run had (output directory apart): what resuming it takes."""
    return current([*EXPECTED["common"], *EXPECTED["runs"][run]["overrides"], f"train.output_dir={output_dir}"])


# Loss agreement: bit-identical with the thread count that wrote the fixtures (one); with two torch threads the
# reductions run in another order and the second resumed loss moves by one ulp (1.1e-7 relative), as it may on other
# CPUs. A piece left unrestored moves these losses by 0.2% to 48% (measured: the weights, the optimizer, the step
# counter, the data position, the queue).
RELATIVE = 1e-6


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    """A copy of the fixtures (inputs and step-2 checkpoints) to run in: their configs name relative paths."""
    with tarfile.open(FIXTURES / "old_checkpoints.tar.xz") as archive:
        # filter="data" (no links out of the folder, no device files) where tarfile has it: Python 3.12, 3.11.4, 3.10.12
        archive.extractall(tmp_path, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    (tmp_path / "empty.yaml").write_text("{}\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


@pytest.mark.parametrize("run", RUNS)
def test_an_old_checkpoint_resumes_to_the_old_codes_losses(work, run):
    expected = EXPECTED["runs"][run]
    command = ["train", "empty.yaml", "--resume", expected["checkpoint"]]
    for override in run_overrides(run, "resumed"):
        command += ["--set", override]
    assert main(command) == 0
    got, want = losses(work / "resumed"), {int(step): loss for step, loss in expected["resumed_losses"].items()}
    assert sorted(got) == sorted(want) == list(range(EXPECTED["checkpoint_step"] + 1, EXPECTED["steps"] + 1))
    for step, loss in want.items():
        assert got[step] == pytest.approx(loss, rel=RELATIVE, abs=0), (step, got, want)


def fixture_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's model weights, read by safetensors or by torch.distributed.checkpoint itself."""
    if (checkpoint / "model.safetensors").is_file():
        return load_file(checkpoint / "model.safetensors")
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with warnings.catch_warnings():  # one process: "torch.distributed is ... uninitialized, assuming ..."
        warnings.simplefilter("ignore", UserWarning)
        dcp_to_torch_save(checkpoint, checkpoint.parent / "converted.pt")
    return torch.load(checkpoint.parent / "converted.pt", weights_only=True)["model"]


@pytest.mark.parametrize("run", RUNS)
@torch.no_grad()
def test_an_old_checkpoint_exports_to_transformers(work, run):
    from transformers import CLIPModel, CLIPProcessor

    checkpoint = work / EXPECTED["runs"][run]["checkpoint"]
    assert main(["export", str(checkpoint), "--format", "hf", "--out", str(work / "hf")]) == 0
    hf, processor = CLIPModel.from_pretrained(work / "hf").eval(), CLIPProcessor.from_pretrained(work / "hf")
    open_clip.add_model_config(work / "micro-clip.json")
    reference = open_clip.create_model("micro-clip", pretrained=None)
    reference.load_state_dict(fixture_weights(checkpoint))
    reference.eval()
    captions = ["a large red square right of a large yellow cross", "there is a yellow triangle at the top"]
    pictures = [Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), np.uint8)) for seed in (0, 1)]
    inputs = processor(text=captions, images=pictures, return_tensors="pt", padding=True)
    output = hf(**inputs)
    ours_image = reference.encode_image(inputs["pixel_values"], normalize=True)
    ours_text = reference.encode_text(open_clip.get_tokenizer("micro-clip")(captions), normalize=True)
    assert (output.image_embeds - ours_image).abs().max() < 1e-5
    assert (output.text_embeds - ours_text).abs().max() < 1e-5
    assert hf.logit_scale.item() == reference.logit_scale.item() != math.log(1 / 0.07)
