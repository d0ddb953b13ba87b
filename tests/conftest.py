"""Shared fixtures: a small synthetic data set and a tiny model config, made once per session."""

from __future__ import annotations

import json
import os
from pathlib import Path

# As `clipforge train` and `clipforge eval` do (clipforge.cli.main): OpenMP threads that spin while they wait take the
# cores DataLoader workers and other ranks need; on 2 shared cores torch code ran up to 10x slower without this.
# OpenMP reads it when torch loads, so it is set before any test module imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest

from clipforge.data.shards import SyntheticSpec, write_synthetic

# The trained checkpoint and probe suite that several evaluation test files share.
pytest_plugins = ["eval_fixtures"]

TINY_MODEL = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def _write_model(tmp_path_factory, name: str, config: dict) -> str:
    path = tmp_path_factory.mktemp("models") / f"{name}.json"
    path.write_text(json.dumps(config))
    return str(path)


@pytest.fixture(scope="session")
def tiny_model_json(tmp_path_factory) -> str:
    """A tiny ViT (32 px, patch 8)."""
    return _write_model(tmp_path_factory, "test-tiny-32", TINY_MODEL)


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> Path:
    """3,000 training samples in 6 shards at 32 px, and small eval sets."""
    out = tmp_path_factory.mktemp("synth")
    write_synthetic(
        SyntheticSpec(
            out=str(out),
            num_samples=3000,
            samples_per_shard=500,
            image_size=32,
            num_eval_samples=300,
            num_retrieval_samples=100,
            num_workers=2,
        ),
        progress=False,
    )
    return out


@pytest.fixture(scope="session")
def synth_suite(synth_data, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("suite") / "suite.yaml"
    path.write_text(
        "name: synthetic\ndatasets:\n"
        + "".join(
            f"  - name: {name}\n    task: {task}\n    path: {synth_data / 'eval' / name}\n"
            for name, task in (
                ("shapes", "zeroshot_classification"),
                ("colors", "zeroshot_classification"),
                ("retrieval", "zeroshot_retrieval"),
            )
        )
    )
    return path


TINY_RESNET = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "patch_size": None},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="session")
def tiny_resnet_json(tmp_path_factory) -> str:
    """A tiny CLIP-ResNet: learns the synthetic shapes much faster than a tiny ViT on a CPU."""
    return _write_model(tmp_path_factory, "test-tiny-rn-32", TINY_RESNET)
