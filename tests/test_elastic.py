"""torchrun's elastic restart: a rank SIGKILLed mid-run, torchrun (``--max-restarts 1``) restarts the group, the run
resumes from its last checkpoint and finishes, every time.

    pytest -m slow tests/test_elastic.py        (10 tries, ~35 s each on a 2-core CPU)

Each try is the command a user types, on the real launcher: ``torchrun --nproc-per-node 2 --max-restarts 1 -m clipforge
train configs/demo.yaml --set ...`` with a tiny model and synthetic data. torchrun's agent keeps one rendezvous store
for the whole job: unless each restart's ranks keep their keys apart (``clipforge.distributed.init_process_group``),
a restarted rank can connect to the address its killed predecessor left there (gloo: ``connectFullMesh failed ...
Connection refused``, or a connect that hangs).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from ranks import free_port
from test_resilience import BIN, env

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
TRIES = 10
STEPS = 6
TRY_TIMEOUT_S = 240  # one try takes 35-70 s on a 2-core machine, quiet or busy: a try past this has hung


def torchrun_command(synth_data: Path, model_json: str, run_dir: Path) -> list[str]:
    options = {
        "data.sources": "[]",
        "data.train_urls": f"{synth_data}/train/{{00000..00005}}.tar",
        "data.batch_size": 16,
        "data.num_workers": 0,
        "data.shuffle_buffer": 50,
        "model.name": model_json,
        "train.output_dir": run_dir,
        "train.steps": STEPS,
        "checkpoint.every": 2,
        "checkpoint.resume": "auto",  # as torchrun restarts the same command, the restarted run finds the checkpoint
        "eval.suite": "null",
        "logging.log_every": 1,
        "logging.progress_bar": "false",
        "logging.tensorboard": "false",
    }
    command = [str(BIN / "torchrun"), "--nproc-per-node", "2", "--max-restarts", "1", "--master-port", str(free_port())]
    command += ["-m", "clipforge", "train", str(CONFIG)]
    for key, value in options.items():
        command += ["--set", f"{key}={value}"]
    return command


def last_logged_step(run_dir: Path) -> int:
    """The highest step in ``metrics.jsonl``; a line still being written (or cut by the kill) is not counted."""
    steps = [0]
    metrics = run_dir / "metrics.jsonl"
    for line in metrics.read_text().splitlines() if metrics.is_file() else []:
        try:
            steps.append(json.loads(line).get("step", 0))
        except json.JSONDecodeError:
            continue
    return max(steps)


def worker_pids(launcher_pid: int) -> dict[int, int]:
    """torchrun's workers, by rank: the children of ``launcher_pid`` whose environment has a RANK."""
    workers = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            environ = (stat.parent / "environ").read_bytes().split(b"\0") if parent == launcher_pid else []
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
        for entry in environ:
            if entry.startswith(b"RANK="):
                workers[int(entry[5:])] = int(stat.parent.name)
    return workers


def kill_rank_and_finish(command: list[str], run_dir: Path, victim: int, log: Path) -> str:
    """Run ``command``, SIGKILL rank ``victim`` once step 3 is logged (the step-2 checkpoint is published by then);
    "" if torchrun then restarted the group and the run resumed and finished, otherwise what went wrong."""
    start = time.monotonic()
    with log.open("w") as output:
        launcher = subprocess.Popen(command, env=env(), stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            killed = False
            while launcher.poll() is None and time.monotonic() - start < TRY_TIMEOUT_S:
                if not killed and last_logged_step(run_dir) >= 3:
                    victim_pid = worker_pids(launcher.pid).get(victim)
                    if victim_pid is not None:
                        os.kill(victim_pid, signal.SIGKILL)
                        killed = True
                time.sleep(0.05)
        finally:
            if launcher.poll() is None:  # nothing outlives the try: torchrun's workers run in sessions of their own
                for group in [*worker_pids(launcher.pid).values(), launcher.pid]:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(group, signal.SIGKILL)
            launcher.wait()
    text = log.read_text(errors="replace")
    if launcher.returncode == -signal.SIGKILL:
        return f"hung: not done after {TRY_TIMEOUT_S} s"
    if not killed:
        return f"rank {victim} never killed (exit {launcher.returncode})"
    if launcher.returncode != 0:
        lines = text.splitlines()
        joining = [
            line for line in lines if re.search(r"connectFullMesh failed|join the process group|still joining", line)
        ]
        errors = [line for line in lines if re.search(r"\w+Error: \S", line) and "ChildFailedError" not in line]
        return f"exit {launcher.returncode}: {(joining or errors or [text[-300:]])[-1]}"
    resumed = re.search(r"rank 0 INFO clipforge.train: resumed from \S+step_0000000([24]) at step \1", text)
    if resumed is None:
        return "finished without resuming from a checkpoint"
    if f'{{"step": {STEPS}, "checkpoint": ' not in text or last_logged_step(run_dir) != STEPS:
        return f"did not reach step {STEPS}"
    return ""


@pytest.mark.slow
def test_a_killed_rank_is_restarted_by_torchrun_and_the_run_finishes(synth_data, tiny_model_json, tmp_path):
    failures = {}
    for attempt in range(TRIES):
        run_dir = tmp_path / f"run{attempt}"
        victim = attempt % 2  # rank 0 (the one that writes the checkpoint) and rank 1 in turn
        log = tmp_path / f"torchrun{attempt}.log"
        problem = kill_rank_and_finish(torchrun_command(synth_data, tiny_model_json, run_dir), run_dir, victim, log)
        if problem:
            failures[f"try {attempt} (rank {victim} killed, log {log})"] = problem
    assert not failures, f"{len(failures)} of {TRIES} tries did not finish: {failures}"
