"""The trainer under ``parallel.strategy: fsdp`` on 2 gloo ranks: sharded checkpoints (each rank its own DCP shard),
exact resume from them, ``clipforge export`` / ``eval`` reading them directly, atomicity when a save dies, a corrupt
shard named; and checkpoints of the single-file layout still resuming.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from ranks import launch_ranks, run_ranks

from clipforge.checkpoints import CorruptCheckpoint, read_weights, sha256, verify
from clipforge.cli import main
from clipforge.train.checkpoint import Checkpointer

BIN = Path(sys.executable).parent


def write_config(path: Path, synth_data: Path, model_json: str, out: Path, **parallel) -> Path:
    cfg = {
        "data": {
            "train_urls": f"{synth_data}/train/{{00000..00005}}.tar",
            "batch_size": 16,
            "num_workers": 1,
            "shuffle_buffer": 50,
            "shuffle_initial": 10,
        },
        "model": {"name": model_json},
        "optim": {"lr": 1e-3, "warmup_steps": 1},
        "train": {"output_dir": str(out), "steps": 6},
        "checkpoint": {"every": 3, "keep_last": 5},
        "parallel": parallel,
        "logging": {"log_every": 1, "progress_bar": False, "tensorboard": False, "plot": False},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def train_ranks(config: Path, *extra: str) -> None:
    results = launch_ranks(
        [str(BIN / "python"), "-m", "clipforge", "train", str(config), *extra], 2, timeout=400, OMP_NUM_THREADS="1"
    )
    assert all(code == 0 for code, _ in results), results[0][1][-3000:] + results[1][1][-3000:]


@pytest.fixture(scope="module")
def fsdp_run(synth_data, tiny_model_json, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp") / "run"
    train_ranks(write_config(out.parent / "cfg.yaml", synth_data, tiny_model_json, out, strategy="fsdp"))
    return out


def test_fsdp_checkpoints_are_sharded_and_resume_exactly(fsdp_run, synth_data, tiny_model_json, tmp_path):
    checkpoint = fsdp_run / "checkpoints" / "step_00000006"
    names = {p.name for p in checkpoint.iterdir()}
    assert {".metadata", "__0_0.distcp", "__1_0.distcp", "state.pt", "manifest.json"} <= names  # a shard per rank
    assert "model.safetensors" not in names
    # resume from step 3 in a copy: the same losses at steps 4-6 and the same final weights, bit for bit
    resumed = tmp_path / "run"
    shutil.copytree(fsdp_run, resumed, symlinks=True)
    shutil.rmtree(resumed / "checkpoints" / "step_00000006")
    (resumed / "checkpoints" / "latest").unlink()
    os.symlink("step_00000003", resumed / "checkpoints" / "latest")
    (resumed / "metrics.jsonl").write_text("")
    train_ranks(
        write_config(tmp_path / "cfg.yaml", synth_data, tiny_model_json, resumed, strategy="fsdp"), "--resume", "auto"
    )
    expected, got = losses(fsdp_run), losses(resumed)
    assert sorted(got) == [4, 5, 6] and all(got[step] == expected[step] for step in got), (got, expected)
    a, b = read_weights(checkpoint), read_weights(resumed / "checkpoints" / "step_00000006")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_export_and_eval_read_sharded_checkpoints(fsdp_run, synth_suite, tmp_path):
    from safetensors.torch import load_file

    checkpoint = fsdp_run / "checkpoints" / "step_00000006"
    assert main(["export", str(checkpoint), "--format", "open_clip", "--out", str(tmp_path / "exported")]) == 0
    exported = load_file(tmp_path / "exported" / "open_clip_model.safetensors")
    weights = read_weights(checkpoint)
    assert exported.keys() == weights.keys() and all(torch.equal(exported[k], weights[k]) for k in weights)
    assert (
        main(
            [
                "eval",
                str(checkpoint),
                "--suite",
                str(synth_suite),
                "--out",
                str(tmp_path / "eval"),
                "--quiet",
                "--no-plots",
                "--workers",
                "0",
            ]
        )
        == 0
    )
    assert list((tmp_path / "eval").glob("*.json"))


def test_a_corrupt_shard_is_named(fsdp_run, tmp_path):
    copy = tmp_path / "step"
    shutil.copytree(fsdp_run / "checkpoints" / "step_00000006", copy)
    data = bytearray((copy / "__1_0.distcp").read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / "__1_0.distcp").write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpoint, match=r"__1_0\.distcp does not match its SHA-256"):
        verify(copy)


def test_metadata_that_would_run_code_is_refused(fsdp_run, tmp_path):
    import pickle

    copy = tmp_path / "step"
    shutil.copytree(fsdp_run / "checkpoints" / "step_00000006", copy)
    marker = tmp_path / "code-ran"
    (copy / ".metadata").write_bytes(pickle.dumps(_Payload(str(marker))))
    manifest = json.loads((copy / "manifest.json").read_text())  # a consistent manifest: only the pickle is bad
    metadata = copy / ".metadata"
    manifest["files"][".metadata"] = {"bytes": metadata.stat().st_size, "sha256": sha256(metadata)}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptCheckpoint, match=r"\.metadata does not load safely.*not allowed"):
        read_weights(copy)
    assert not marker.exists()


class _Payload:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def _save_twice_dying_in_the_second(rank, world_size, out, model_json):
    import torch.distributed.checkpoint as dcp
    from checkpointing import model_pieces

    from clipforge.distributed import DistInfo
    from clipforge.models import ModelConfig, build_model
    from clipforge.train.parallel import parallelize

    torch.manual_seed(0)
    model = parallelize(
        build_model(ModelConfig(name=model_json)).model, DistInfo(rank=rank, world_size=world_size), "fsdp"
    )
    checkpointer = Checkpointer(Path(out), rank=rank)
    checkpointer.save(1, model_pieces(model, 1), "train: {}\n")
    original = dcp.FileSystemWriter.write_data

    def dying(self, plan, planner):  # a kill in the middle of writing the shards of step 2
        if rank == 1:
            os._exit(9)
        return original(self, plan, planner)

    dcp.FileSystemWriter.write_data = dying
    checkpointer.save(2, model_pieces(model, 2), "train: {}\n")


def test_a_save_killed_midway_leaves_the_previous_checkpoint_intact(tmp_path, tiny_model_json):
    with pytest.raises(Exception):  # noqa: B017 — rank 1 dies (exit 9) and its peer with it: any error will do
        run_ranks(
            _save_twice_dying_in_the_second,
            2,
            tmp_path / "ranks",
            str(tmp_path / "checkpoints"),
            tiny_model_json,
            timeout=300,
        )
    checkpointer = Checkpointer(tmp_path / "checkpoints")
    assert [p.name for p in checkpointer.complete()] == ["step_00000001"]
    assert checkpointer.latest_intact().name == "step_00000001"
    assert (tmp_path / "checkpoints" / "latest").resolve().name == "step_00000001"
    assert read_weights(tmp_path / "checkpoints" / "step_00000001")


def test_a_checkpoint_of_the_single_file_layout_with_a_numbered_optimizer_still_resumes(
    synth_data, tiny_model_json, tmp_path
):
    """The single-file layout as its oldest checkpoints have it: model.safetensors, and state.pt holding the step,
    the optimizer numbered in its groups' order (optimizer.state_dict()) and the scheduler at its top."""
    from checkpointing import as_older_layout, dcp_contents

    from clipforge.train.config import load_config
    from clipforge.train.loop import train

    full, old = tmp_path / "full", tmp_path / "old"
    cfg = load_config(write_config(tmp_path / "cfg.yaml", synth_data, tiny_model_json, full))
    train(cfg)
    shutil.copytree(full, old, symlinks=True)
    shutil.rmtree(old / "checkpoints" / "step_00000006")
    (old / "checkpoints" / "latest").unlink()
    os.symlink("step_00000003", old / "checkpoints" / "latest")
    step3 = old / "checkpoints" / "step_00000003"
    saved, state = dcp_contents(step3), torch.load(step3 / "state.pt", weights_only=True)
    groups = saved["optimizer"]["param_groups"]
    number = {name: index for index, name in enumerate(name for group in groups for name in group["params"])}
    optimizer = {
        "state": {number[name]: entry for name, entry in saved["optimizer"]["state"].items()},
        "param_groups": [{**group, "params": [number[name] for name in group["params"]]} for group in groups],
    }
    oldest = {"step": state["train"]["step"], "optimizer": optimizer, "scheduler": state["schedule"]}
    as_older_layout(step3, saved["model"], oldest)
    (old / "metrics.jsonl").write_text("")
    cfg = load_config(
        write_config(tmp_path / "cfg_old.yaml", synth_data, tiny_model_json, old), ["checkpoint.resume=auto"]
    )
    train(cfg)
    expected, got = losses(full), losses(old)
    assert sorted(got) == [4, 5, 6] and all(got[step] == expected[step] for step in got)
    assert main(["export", str(step3), "--format", "open_clip", "--out", str(tmp_path / "exported")]) == 0
