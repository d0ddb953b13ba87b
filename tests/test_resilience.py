"""Surviving kills, signals, corrupt checkpoints and bad numerics; launching under torchrun and accelerate.

The trainer runs as real processes here (``python -m clipforge train``, ``torchrun``, ``accelerate
launch``), killed and signalled from outside, as a scheduler would.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from checkpointing import dcp_weights, load_checkpoint, model_pieces, save_checkpoint
from ranks import free_port, launch_ranks

from clipforge.checkpoints import verify
from clipforge.train.checkpoint import Checkpointer, CorruptCheckpoint
from clipforge.train.config import load_config
from clipforge.train.loop import EXIT_PREEMPTED, NonFiniteError, train

BIN = Path(sys.executable).parent


def write_config(path: Path, synth_data, model_json, out: Path, checkpoint_every: int = 3, **train_options) -> Path:
    cfg = {
        "data": {
            "train_urls": f"{synth_data}/train/{{00000..00005}}.tar",
            "batch_size": 32,
            "num_workers": 1,
            "shuffle_buffer": 200,
            "shuffle_initial": 50,
        },
        "model": {"name": model_json},
        "optim": {"lr": 2e-3, "warmup_steps": 2, "weight_decay": 0.05},
        "train": {"output_dir": str(out), "steps": 12, **train_options},
        "checkpoint": {"every": checkpoint_every, "keep_last": 10},
        "logging": {"log_every": 1, "progress_bar": False, "tensorboard": False},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def env(**extra) -> dict[str, str]:
    out = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS")
    }
    out.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return out


def wait_for_step(run_dir: Path, step: int, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"trainer exited early with {process.returncode}")
        metrics = run_dir / "metrics.jsonl"
        if metrics.is_file() and max(losses(run_dir) or {0: 0}) >= step:
            return
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout} s")


@pytest.fixture(scope="module")
def reference_run(synth_data, tiny_model_json, tmp_path_factory):
    """An uninterrupted 12-step run, as a subprocess."""
    root = tmp_path_factory.mktemp("reference")
    config = write_config(root / "cfg.yaml", synth_data, tiny_model_json, root / "run")
    subprocess.run(
        [sys.executable, "-m", "clipforge", "train", str(config)], check=True, env=env(), capture_output=True
    )
    return root / "run"


def test_sigkill_then_resume_auto_is_exact(reference_run, synth_data, tiny_model_json, tmp_path):
    config = write_config(tmp_path / "cfg.yaml", synth_data, tiny_model_json, tmp_path / "run")
    command = [sys.executable, "-m", "clipforge", "train", str(config), "--resume", "auto"]
    process = subprocess.Popen(command, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_step(tmp_path / "run", 7, process)
    process.send_signal(signal.SIGKILL)  # no chance to clean up: mid-step, maybe mid-checkpoint
    process.wait()
    assert max(losses(tmp_path / "run")) < 12
    done = subprocess.run(command, env=env(), check=True, capture_output=True, text=True)
    # it continued from a checkpoint written before the kill, not from scratch
    assert re.search(r"resumed from \S+step_0000000[369] at step [369]", done.stdout + done.stderr), done.stderr[-2000:]
    expected, resumed = losses(reference_run), losses(tmp_path / "run")
    assert sorted(resumed) == list(range(1, 13))
    for step in range(1, 13):
        assert resumed[step] == expected[step], step  # bit-identical: same batches, same RNG, same updates
    final = "checkpoints/step_00000012"
    a, b = dcp_weights(reference_run / final), dcp_weights(tmp_path / "run" / final)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_corrupt_newest_checkpoint_is_skipped_with_a_clear_message(reference_run, tmp_path, caplog):
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(reference_run / "checkpoints", checkpoints, symlinks=True)
    weights = checkpoints / "step_00000012" / "__0_0.distcp"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated, as by a full disk
    with pytest.raises(CorruptCheckpoint, match=r"step_00000012: __0_0\.distcp has \d+ bytes.*truncated"):
        Checkpointer(checkpoints).load(checkpoints / "step_00000012", {})
    state = checkpoints / "step_00000009" / "state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped
    state.write_bytes(bytes(data))
    found = Checkpointer(checkpoints).latest_intact()
    assert found is not None and found.name == "step_00000006"
    assert "step_00000012" in caplog.text and "state.pt does not match its SHA-256" in caplog.text


def test_nonfinite_steps_are_skipped_then_abort_with_the_keys(synth_data, tiny_model_json, tmp_path, caplog):
    cfg = load_config(
        write_config(tmp_path / "cfg.yaml", synth_data, tiny_model_json, tmp_path / "run", max_nonfinite_steps=3)
    )
    cfg.optim.lr, cfg.optim.warmup_steps = 1e30, 0  # the first update blows the weights up; then every loss is NaN
    with pytest.raises(
        NonFiniteError,
        match=r"3 steps in a row .* at step 4 on rank 0; its batch's first keys: "
        r"\['\d{9}'",
    ):
        train(cfg)
    assert caplog.text.count("update skipped") == 3
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert math.isfinite(records[0]["train/loss"]) and records[2]["train/nonfinite_steps"] == 2


def test_fp16_with_a_gradient_scaler_trains_and_resumes_its_scale(synth_data, tiny_model_json, tmp_path):
    import torch

    config = write_config(
        tmp_path / "cfg.yaml",
        synth_data,
        tiny_model_json,
        tmp_path / "run",
        precision="fp16",
        steps=4,
        checkpoint_every=2,
    )
    result = train(load_config(config))
    assert not result["preempted"] and all(math.isfinite(v) for v in losses(tmp_path / "run").values())
    # resume from the step-2 checkpoint: the same later losses and the same scaler state as the uninterrupted run
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "run" / "checkpoints" / "step_00000002", resumed / "checkpoints" / "step_00000002")
    train(load_config(config, [f"train.output_dir={resumed}", "checkpoint.resume=auto"]))
    assert sorted(losses(resumed)) == [3, 4]
    assert all(losses(resumed)[step] == losses(tmp_path / "run")[step] for step in (3, 4))
    states = [
        torch.load(run / "checkpoints" / "step_00000004" / "state.pt", weights_only=True)["scaler"]
        for run in (tmp_path / "run", resumed)
    ]
    assert states[0] == states[1] and states[0]["scale"] > 0
    assert states[0]["_growth_tracker"] == 4  # counted from step 1, across the resume


def rank_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    return env(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )


def test_sigterm_to_one_rank_stops_both_at_the_same_step_with_a_checkpoint(synth_data, tiny_model_json, tmp_path):
    config = write_config(
        tmp_path / "cfg.yaml", synth_data, tiny_model_json, tmp_path / "run", steps=200, checkpoint_every=100
    )
    port = free_port()
    command = [sys.executable, "-m", "clipforge", "train", str(config)]
    ranks = [
        subprocess.Popen(
            command,
            env=rank_env(rank, 2, port),
            start_new_session=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for rank in range(2)
    ]
    wait_for_step(tmp_path / "run", 4, ranks[0])
    # as SLURM does on pre-emption: the signal goes to rank 1's whole process group, DataLoader worker included
    os.killpg(ranks[1].pid, signal.SIGTERM)
    outputs = [process.communicate(timeout=240)[0].decode() for process in ranks]
    assert [process.returncode for process in ranks] == [EXIT_PREEMPTED, EXIT_PREEMPTED], outputs
    result = json.loads(outputs[0].strip().splitlines()[-1])  # rank 0 prints the result; both log where they stopped
    assert result["step"] < 200 and result["preempted"]
    for rank, out in enumerate(outputs):
        assert f"rank {rank} WARNING clipforge.train: stopped at step {result['step']} on a signal" in out, out
    checkpoint = Path(result["checkpoint"])
    assert checkpoint.name == f"step_{result['step']:08d}"
    assert {p.name for p in checkpoint.iterdir()} >= {"data_rank0.json", "data_rank1.json", ".metadata", "__0_0.distcp"}
    assert "received SIGTERM" in outputs[1] and "Traceback" not in outputs[0] + outputs[1]


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_launchers_run_two_ranks_in_sync(launcher, synth_data, tiny_model_json, tmp_path):
    config = write_config(
        tmp_path / "cfg.yaml", synth_data, tiny_model_json, tmp_path / "run", steps=6, checkpoint_every=3
    )
    port = str(free_port())
    if launcher == "torchrun":
        command = [
            str(BIN / "torchrun"),
            "--nproc-per-node",
            "2",
            "--master-port",
            port,
            "-m",
            "clipforge",
            "train",
            str(config),
        ]
        extra = {}
    else:  # several CPU processes: --multi_gpu with ACCELERATE_USE_CPU (--cpu starts only one)
        command = [
            str(BIN / "accelerate"),
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            port,
            "-m",
            "clipforge",
            "train",
            str(config),
        ]
        extra = {"ACCELERATE_USE_CPU": "true"}
    done = subprocess.run(command, env=env(**extra), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for step in ("step_00000003", "step_00000006"):
        checkpoint = tmp_path / "run" / "checkpoints" / step
        digests = [json.loads((checkpoint / f"sync_rank{r}.json").read_text())["weights_sha256"] for r in range(2)]
        assert digests[0] == digests[1]  # both replicas hold identical weights
        assert (checkpoint / "data_rank1.json").is_file()
    data = [
        json.loads((tmp_path / "run" / "checkpoints" / "step_00000006" / f"data_rank{r}.json").read_text())
        for r in range(2)
    ]
    assert [(d["world_size"], d["consumed"]) for d in data] == [(2, {"0": 6 * 32})] * 2  # each rank: 6 local batches


def test_keep_last_prunes_older_checkpoints(tmp_path):
    import torch

    checkpointer = Checkpointer(tmp_path / "checkpoints", keep_last=2)
    model = torch.nn.Linear(3, 2)
    for step in (1, 2, 3, 4):
        checkpointer.save(step, model_pieces(model, step), "train: {}\n")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_00000003", "step_00000004"]
    assert (tmp_path / "checkpoints" / "latest").resolve().name == "step_00000004"


class _Payload:
    """An object whose unpickling would run code: what weights_only=True must refuse."""

    def __reduce__(self):
        return (Path.touch, (Path(os.environ["CLIPFORGE_TEST_MARKER"]),))


def test_loading_never_unpickles_arbitrary_objects(tmp_path, monkeypatch):
    import torch

    from clipforge.checkpoints import sha256

    model = torch.nn.Linear(3, 2)
    path = save_checkpoint(tmp_path / "checkpoints", model)
    marker = tmp_path / "code-ran"
    monkeypatch.setenv("CLIPFORGE_TEST_MARKER", str(marker))
    torch.save({"step": 1, "payload": _Payload()}, path / "state.pt")
    manifest = json.loads((path / "manifest.json").read_text())  # a consistent manifest: only the pickle is bad
    manifest["files"]["state.pt"] = {"bytes": (path / "state.pt").stat().st_size, "sha256": sha256(path / "state.pt")}
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptCheckpoint, match="state.pt does not load with weights_only=True.*Weights only load"):
        load_checkpoint(path, model)
    assert not marker.exists()


def test_a_checkpoint_of_a_newer_format_is_refused(tmp_path):
    import torch

    model = torch.nn.Linear(3, 2)
    path = save_checkpoint(tmp_path / "checkpoints", model)
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, "format": manifest["format"] + 1}))
    with pytest.raises(ValueError, match=r"is of format 3; this clipforge reads formats up to 2"):
        load_checkpoint(path, model)


def test_dcp_entries_that_would_run_code_are_never_unpickled(tmp_path, monkeypatch):
    """The optimizer's parameter groups are pickled entries of the DCP files (torch.distributed.checkpoint unpickles
    them with every class allowed): one that would run code is refused, naming it, and the code never runs."""
    import torch

    model = torch.nn.Linear(3, 2)
    pieces = model_pieces(model)
    marker = tmp_path / "code-ran"
    monkeypatch.setenv("CLIPFORGE_TEST_MARKER", str(marker))
    pieces["optimizer"].stateful.optimizer.param_groups[0]["eps"] = _Payload()
    path = Checkpointer(tmp_path / "checkpoints").save(1, pieces, "train: {}\n")
    with pytest.raises(CorruptCheckpoint, match=r"optimizer\.param_groups\.0\.eps is not plain data"):
        load_checkpoint(path, model)
    assert not marker.exists()


def _diverged_save(rank, world_size, out):
    import torch

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    if rank == 1:
        with torch.no_grad():
            model.weight[0, 0] += 1.0  # a replica that drifted
    try:
        save_checkpoint(Path(out), model, rank=rank)
    except RuntimeError as exc:
        return str(exc)
    return None


def test_diverged_replicas_are_refused_on_every_rank(tmp_path):
    from ranks import run_ranks

    messages = run_ranks(_diverged_save, 2, tmp_path / "ranks", str(tmp_path / "checkpoints"))
    assert all(m is not None and "ranks hold different weights" in m for m in messages), messages
    assert not list((tmp_path / "checkpoints").glob("step_*"))


def _save_with_own_buffers(rank, world_size, out):
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.BatchNorm1d(4) for _ in range(3)))  # the same replica on both ranks
    with torch.no_grad():
        for buffer in (model[i].running_mean for i in range(3)):
            buffer.fill_(10.0 + rank)  # but each rank's own batch statistics, as after a forward
    save_checkpoint(Path(out), model, rank=rank)


def test_a_ddp_checkpoint_holds_rank_0s_buffers(tmp_path):
    """Replicas' parameters are equal but their BatchNorm statistics are not; DDP broadcasts rank 0's before every
    forward, so rank 0's are the ones a resumed run must start from."""
    from checkpointing import dcp_weights
    from ranks import run_ranks

    run_ranks(_save_with_own_buffers, 2, tmp_path / "ranks", str(tmp_path / "checkpoints"))
    saved = dcp_weights(tmp_path / "checkpoints" / "step_00000001")
    assert [saved[f"{i}.running_mean"].tolist() for i in range(3)] == [[10.0] * 4] * 3


FAULTY_RANK = """
import os, sys
from clipforge.train import step

if os.environ["RANK"] == "1":  # this rank alone reports non-finite steps from its third step on
    original = step.PlainStep.__call__

    def faulty(self, batch, *recorder):
        out = original(self, batch, *recorder)
        self.calls = getattr(self, "calls", 0) + 1
        out["nonfinite"] = out["nonfinite"] or self.calls >= 3
        return out

    step.PlainStep.__call__ = faulty
from clipforge.cli import main

sys.exit(main(sys.argv[1:]))
"""


def test_a_numerics_abort_on_one_rank_stops_every_rank(synth_data, tiny_model_json, tmp_path):
    config = write_config(
        tmp_path / "cfg.yaml",
        synth_data,
        tiny_model_json,
        tmp_path / "run",
        steps=50,
        checkpoint_every=100,
        max_nonfinite_steps=2,
    )
    script = tmp_path / "faulty.py"
    script.write_text(FAULTY_RANK)
    (code0, out0), (code1, out1) = launch_ranks([sys.executable, str(script), "train", str(config)], 2)
    assert code0 != 0 and code1 != 0
    assert (
        "NonFiniteError: 2 steps in a row with a non-finite loss or gradient, the last at step 4 on rank 1" in out1
    ), out1[-3000:]
    assert "NonFiniteError: step 4: another rank reached train.max_nonfinite_steps" in out0, out0[-3000:]


def _save_then_load_own_rng(rank, world_size, out):
    import random as python_random

    import torch

    from clipforge.train.state import RNGState

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)  # the same replica on both ranks
    torch.manual_seed(100 + rank)  # but each rank's generators are its own
    python_random.seed(rank)
    saved = RNGState("cpu").state_dict()
    save_checkpoint(Path(out), model, rank=rank, data={"rank": rank})
    torch.manual_seed(12345)
    python_random.seed(12345)
    pieces = load_checkpoint(Path(out) / "step_00000001", model, rank)
    restored = RNGState("cpu").state_dict()
    return {
        "torch": torch.equal(restored["torch"], saved["torch"]),
        "python": tuple(restored["python"][1]) == saved["python"][1],
        "data": pieces["data"].stateful.state,
        "draw": torch.rand(3),
    }


def test_every_rank_resumes_its_own_random_generators(tmp_path):
    from ranks import run_ranks

    ranks = run_ranks(_save_then_load_own_rng, 2, tmp_path / "ranks", str(tmp_path / "checkpoints"))
    assert all(r["torch"] and r["python"] for r in ranks), ranks
    assert [r["data"] for r in ranks] == [{"rank": 0}, {"rank": 1}]
    assert ranks[0]["draw"].tolist() != ranks[1]["draw"].tolist()  # rank 1 did not get rank 0's stream
    assert {"rng_rank0.pt", "rng_rank1.pt"} <= {p.name for p in (tmp_path / "checkpoints" / "step_00000001").iterdir()}


def test_ctrl_c_checkpoints_and_exits_75_without_a_traceback(synth_data, tiny_model_json, tmp_path):
    """SIGINT to the trainer's whole process group, as a terminal sends it (DataLoader workers included)."""
    config = write_config(
        tmp_path / "cfg.yaml", synth_data, tiny_model_json, tmp_path / "run", steps=400, checkpoint_every=100
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "clipforge", "train", str(config)],
        env=env(),
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_step(tmp_path / "run", 3, process)
    os.killpg(process.pid, signal.SIGINT)
    out, err = process.communicate(timeout=240)
    assert process.returncode == EXIT_PREEMPTED, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["preempted"] and 3 <= result["step"] < 100
    checkpoint = tmp_path / "run" / "checkpoints" / f"step_{result['step']:08d}"
    assert Path(result["checkpoint"]) == checkpoint == (tmp_path / "run" / "checkpoints" / "latest").resolve()
    verify(checkpoint)
    assert "received SIGINT: stopping after this step with a checkpoint" in err
    assert f"stopped at step {result['step']} on a signal" in err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert not (tmp_path / "run" / "train.lock").exists()


SLOW_PUBLISH = """
import sys, time
from clipforge.train import checkpoint

original = checkpoint.Checkpointer._publish

def slow(self, temporary, final, step):  # from step 4 on: every file written, the rename not yet made
    if step >= 4:
        print(f"publishing step {step}", file=sys.stderr, flush=True)
        time.sleep(120)
    original(self, temporary, final, step)

checkpoint.Checkpointer._publish = slow
from clipforge.cli import main

sys.exit(main(sys.argv[1:]))
"""


def test_a_second_ctrl_c_aborts_at_once_leaving_the_previous_checkpoint_latest(synth_data, tiny_model_json, tmp_path):
    from clipforge.train.loop import EXIT_ABORTED

    config = write_config(
        tmp_path / "cfg.yaml", synth_data, tiny_model_json, tmp_path / "run", steps=400, checkpoint_every=2
    )
    script = tmp_path / "slow_publish.py"
    script.write_text(SLOW_PUBLISH)
    process = subprocess.Popen(
        [sys.executable, str(script), "train", str(config)],
        env=env(),
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    checkpoints = tmp_path / "run" / "checkpoints"
    deadline = time.time() + 240
    while not list(checkpoints.glob(".step_00000004.*.tmp/config.yaml")):  # the checkpoint of step 4 is written
        assert process.poll() is None and time.time() < deadline, process.communicate()[1][-3000:]
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGINT)  # stop after this step: it waits for the checkpoint being published
    time.sleep(1.5)  # a second Ctrl-C, not the launcher's copy of the first
    os.killpg(process.pid, signal.SIGINT)
    started = time.time()
    _, err = process.communicate(timeout=60)
    assert process.returncode == EXIT_ABORTED, err[-3000:]
    assert time.time() - started < 30  # at once, not after the 120 s publish
    assert "aborted on a second Ctrl-C: no checkpoint of this step" in err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert (checkpoints / "latest").resolve() == checkpoints / "step_00000002"
    verify(checkpoints / "latest")
    assert not list(checkpoints.glob(".*")) and not (tmp_path / "run" / "train.lock").exists()


def test_a_ctrl_c_repeated_within_a_second_is_the_same_ctrl_c():
    """A terminal's Ctrl-C reaches torchrun and its ranks, and torchrun forwards it again: one request to stop."""
    from clipforge.train.loop import StopSignals

    stop = StopSignals()
    stop._handle(signal.SIGINT, None)
    stop._handle(signal.SIGINT, None)
    assert stop.received == signal.SIGINT
    stop._interrupted_at -= StopSignals.REPEAT_S + 0.1
    with pytest.raises(KeyboardInterrupt):
        stop._handle(signal.SIGINT, None)


def test_a_torn_last_metrics_line_is_dropped_on_resume(reference_run, synth_data, tiny_model_json, tmp_path):
    """As a kill during an append leaves metrics.jsonl: --resume auto warns naming the file and continues, and the
    file is valid JSONL again, with the uninterrupted run's records."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference_run, run_dir, symlinks=True)
    for step in (9, 12):  # killed after step 7's record: the newest checkpoint is step 6's
        shutil.rmtree(run_dir / "checkpoints" / f"step_{step:08d}")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text("\n".join(lines[:7]) + "\n" + lines[7][: len(lines[7]) // 2])
    config = write_config(tmp_path / "cfg.yaml", synth_data, tiny_model_json, run_dir)
    done = subprocess.run(
        [sys.executable, "-m", "clipforge", "train", str(config), "--resume", "auto"],
        env=env(),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{run_dir / 'metrics.jsonl'}: dropped its torn last line 8" in done.stderr
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/loss" in r] == list(range(1, 13))
    assert losses(run_dir) == losses(reference_run)


def test_two_metric_loggers_on_one_file_never_interleave_within_a_line(tmp_path):
    """Even if two writers ever ran (the run directory's lock is there to stop that): whole records, appended."""
    from clipforge.train.metrics import LoggingConfig, MetricLogger

    cfg = LoggingConfig(tensorboard=False, progress_bar=False)
    first, second = (MetricLogger(tmp_path, cfg, 100, 0, True) for _ in range(2))
    for step in range(1, 6):
        first.log(step, {"train/loss": 1.0 / step, "note": "x" * 50})
        second.log(step, {"train/loss": 2.0})
    first.close()
    second.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]  # the second's: it replaced the file, whole
