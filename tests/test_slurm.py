"""``clipforge submit`` and ``slurm/*.sbatch`` against a real single-node SLURM (tests/slurm_cluster.py).

The cluster (slurmctld + slurmd + munged, Debian's slurm-wlm 22.05) is installed if missing and started once for
this module; every test here is skipped, with the reason printed, when it cannot start (not root, no package
mirror, a daemon that dies). All carry the ``slurm`` marker: ``pytest -m "not slow and not slurm"`` leaves them out
(and installs nothing). Jobs train the demo config (its model and recipe; the test's small shards, 40
steps) with 2 CPU processes on gloo.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from checkpointing import dcp_weights
from slurm_cluster import SlurmCluster, SlurmUnavailable

from clipforge.train.checkpoint import verify

REPO = Path(__file__).resolve().parents[1]
CLIPFORGE = [sys.executable, "-m", "clipforge"]
STEPS = 40
pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    try:
        running = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    except SlurmUnavailable as exc:
        pytest.skip(f"SLURM could not start here: {exc}")
    yield running
    running.stop()


def demo_overrides(synth_data: Path, suite: Path, run_dir: Path) -> list[str]:
    """configs/demo.yaml, shortened to 40 steps on the test shards."""
    urls = f"{synth_data}/train/{{00000..00005}}.tar"
    return [
        "--set",
        f"data.sources=[{{urls: '{urls}'}}]",
        "--set",
        "data.batch_size=32",
        "--set",
        "data.num_workers=1",
        "--set",
        "data.shuffle_buffer=200",
        "--set",
        f"train.steps={STEPS}",
        "--set",
        "checkpoint.every=10",
        "--set",
        f"train.output_dir={run_dir}",
        "--set",
        f"eval.suite={suite}",
        "--set",
        "eval.batch_size=100",
        "--set",
        "logging.log_every=5",
    ]


def submit(cluster, synth_data, suite, run_dir, *extra: str) -> tuple[subprocess.CompletedProcess, str]:
    command = [
        *CLIPFORGE,
        "submit",
        str(REPO / "configs" / "demo.yaml"),
        *demo_overrides(synth_data, suite, run_dir),
        "--gpus-per-node",
        "0",
        "--procs-per-node",
        "2",
        "--cpus-per-proc",
        "1",
        *extra,
    ]
    done = subprocess.run(command, cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=600)
    assert "submitted job" in done.stdout, done.stdout + done.stderr
    job_id = done.stdout.split("submitted job")[1].split()[0]
    return done, job_id


def job_field(cluster, job_id: str, name: str) -> str:
    shown = subprocess.run(["scontrol", "show", "job", job_id], env=cluster.env, capture_output=True, text=True)
    for item in shown.stdout.split():
        if item.startswith(f"{name}="):
            return item.split("=", 1)[1]
    raise AssertionError(f"no {name} in scontrol show job {job_id}: {shown.stdout}{shown.stderr}")


def wait_for_job(cluster, job_id: str, timeout_s: float = 420) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = job_field(cluster, job_id, "JobState")
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state
        time.sleep(1)
    raise AssertionError(f"job {job_id} still {state} after {timeout_s} s")


def final_weights(run_dir: Path) -> dict:
    checkpoint = run_dir / "checkpoints" / f"step_{STEPS:08d}"
    verify(checkpoint)
    return dcp_weights(checkpoint)


@pytest.fixture(scope="module")
def uninterrupted(cluster, synth_data, synth_suite, tmp_path_factory):
    """The demo config submitted with the default launcher (srun, a task per rank) and waited for."""
    run_dir = tmp_path_factory.mktemp("slurm_runs") / "uninterrupted"
    done, job_id = submit(cluster, synth_data, synth_suite, run_dir, "--wait")
    return {"run_dir": run_dir, "job_id": job_id, "submit": done}


def test_submit_runs_the_demo_config_to_completion(cluster, uninterrupted):
    run_dir, job_id, done = uninterrupted["run_dir"], uninterrupted["job_id"], uninterrupted["submit"]
    log = (run_dir / "slurm" / f"{job_id}.out").read_text(errors="replace")
    assert done.returncode == 0, done.stdout + done.stderr + log[-3000:]
    assert f"job {job_id} ended with exit code 0" in done.stdout
    assert str(run_dir / "slurm" / f"{job_id}.out") in done.stdout  # the log path is printed
    assert job_field(cluster, job_id, "JobState") == "COMPLETED"
    script = (run_dir / "slurm" / "train.sbatch").read_text()
    for option in (
        "--nodes=1",
        "--ntasks-per-node=2",
        "--cpus-per-task=1",
        "--signal=USR1@300",
        "--requeue",
        "--open-mode=append",
    ):
        assert f"#SBATCH {option}\n" in script
    assert "--gpus-per-node" not in script.split("# <<< sbatch options")[0].split("# >>> sbatch options")[1]
    # both ranks ran (gloo, world size 2) and rank 0 wrote the final checkpoint and the eval results
    assert "rank 0 INFO" in log and "rank 1 INFO" in log
    assert f"step {STEPS}/{STEPS}" in log
    final_weights(run_dir)
    results = json.loads((run_dir / "eval" / f"step_{STEPS:08d}.json").read_text())
    assert set(results) == {"shapes", "colors", "retrieval"} and results["shapes"]["num_samples"] == 300
    config = (run_dir / "slurm" / "config.yaml").read_text()
    assert "resume: auto" in config and "requeue: true" in config


@pytest.mark.parametrize("launcher", ["srun", "torchrun", pytest.param("accelerate", marks=pytest.mark.slow)])
def test_preempted_job_checkpoints_requeues_and_resumes_to_the_same_weights(
    launcher, cluster, uninterrupted, synth_data, synth_suite, tmp_path
):
    run_dir = tmp_path / "preempted"
    _, job_id = submit(cluster, synth_data, synth_suite, run_dir, "--launcher", launcher)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # mid-run: after the step-10 checkpoint, well before the end
        lines = metrics.read_text().splitlines() if metrics.is_file() else []
        if lines and json.loads(lines[-1])["step"] >= 15:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"job {job_id} did not reach step 15: {(run_dir / 'slurm' / f'{job_id}.out').read_text()[-3000:]}")
    # What SLURM does at --signal=USR1@N before the time limit, or a pre-empting scheduler: SIGUSR1 to the job's tasks
    subprocess.run(["scancel", "--signal=USR1", job_id], env=cluster.env, check=True)
    state = wait_for_job(cluster, job_id)
    log = (run_dir / "slurm" / f"{job_id}.out").read_text(errors="replace")
    assert state == "COMPLETED", log[-4000:]
    assert job_field(cluster, job_id, "Restarts") == "1", log[-4000:]
    stopped = [line for line in log.splitlines() if "stopped at step" in line]
    assert len(stopped) == 2, log[-4000:]  # both ranks, at the same step
    step = int(stopped[0].split("stopped at step ")[1].split()[0])
    assert f"stopped at step {step} " in stopped[1] and 15 <= step < STEPS
    assert f"requeueing SLURM job {job_id}" in log
    assert "(restart 1)" in log
    assert log.count(f"resumed from {run_dir / 'checkpoints' / f'step_{step:08d}'} at step {step}") == 2
    # the requeued job ran to the end; its weights are the uninterrupted run's, bit for bit
    expected, got = final_weights(uninterrupted["run_dir"]), final_weights(run_dir)
    assert expected.keys() == got.keys()
    assert all(expected[name].equal(got[name]) for name in expected)
    assert (run_dir / "eval" / f"step_{STEPS:08d}.json").is_file()


def test_eval_sbatch_evaluates_a_checkpoint(cluster, uninterrupted, synth_suite, tmp_path):
    checkpoint = uninterrupted["run_dir"] / "checkpoints" / "latest"
    out = tmp_path / "eval_out"
    env = {**cluster.env, "CLIPFORGE_PYTHON": sys.executable}
    # the template asks for a GPU; this node has none (on a CPU partition a user overrides it the same way)
    done = subprocess.run(
        [
            "sbatch",
            "--wait",
            "--parsable",
            "--gpus-per-node=0",
            "--cpus-per-task=2",
            f"--output={tmp_path}/%j.out",
            str(REPO / "slurm" / "eval.sbatch"),
            str(checkpoint),
            str(synth_suite),
            "--out",
            str(out),
            "--no-plots",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    job_id = done.stdout.strip().split(";")[0]
    log = (tmp_path / f"{job_id}.out").read_text(errors="replace") if job_id else ""
    assert done.returncode == 0, done.stderr + log[-3000:]
    results = list(out.glob("*.json"))
    assert len(results) == 1, log[-3000:]
    # the same numbers the trainer's final evaluation of that checkpoint wrote, to float32 rounding (the trainer's
    # ResNet tower runs channels-last, the loaded checkpoint in the standard layout)
    trained = json.loads((uninterrupted["run_dir"] / "eval" / f"step_{STEPS:08d}.json").read_text())
    evaluated = json.loads(results[0].read_text())
    assert _metrics(evaluated) == pytest.approx(_metrics(trained), rel=1e-5, abs=1e-6)
    assert len(_metrics(trained)) > 20


def _metrics(results) -> dict[str, float]:
    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}/{key}", item)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[prefix] = float(value)

    walk("", results)
    return {key: value for key, value in flat.items() if "time" not in key and "seconds" not in key}
