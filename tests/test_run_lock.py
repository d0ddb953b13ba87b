"""The run directory's lock (``clipforge.train.lock``): a second trainer on one ``train.output_dir`` stops in one line
naming the holder; a dead holder's lock is taken over (on this host, or an earlier attempt of the same SLURM job)
with a warning, any other only with ``--take-over-lock``; only rank 0 takes it."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_resilience import env, wait_for_step, write_config

from clipforge.distributed import DistInfo
from clipforge.train.lock import LOCK_NAME, Holder, RunLock, RunLocked, hold_run_dir


def write_holder(run_dir: Path, **fields) -> Holder:
    """A lock file as another trainer would have left it (this process's record, with ``fields`` changed)."""
    holder = dataclasses.replace(Holder.this_process({}), token="someone-else", **fields)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LOCK_NAME).write_text(json.dumps(dataclasses.asdict(holder)))
    return holder


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_second_trainer_is_refused_in_one_line_naming_the_holder(tmp_path):
    first = RunLock(tmp_path / "run", {}).acquire()
    try:
        recorded = json.loads((tmp_path / "run" / LOCK_NAME).read_text())
        assert recorded["pid"] == os.getpid() and recorded["host"] == first.me.host
        with pytest.raises(RunLocked) as refused:
            RunLock(tmp_path / "run", {}).acquire()
        message = str(refused.value)
        assert "\n" not in message
        assert f"host {first.me.host}, pid {os.getpid()}, started {first.me.started}" in message
        assert "running on this host" in message and "--take-over-lock" in message
    finally:
        first.release()
    assert not (tmp_path / "run" / LOCK_NAME).exists()
    RunLock(tmp_path / "run", {}).acquire().release()  # free again
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == []  # no private or stale files left


def test_a_dead_holder_on_this_host_is_taken_over_with_a_warning(tmp_path, caplog):
    holder = write_holder(tmp_path, pid=dead_pid())
    lock = RunLock(tmp_path, {}).acquire()
    try:
        assert f"its holder ({holder.describe()}) is no longer running" in caplog.text
        assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == lock.me.token
    finally:
        lock.release()


def test_a_reused_pid_is_not_mistaken_for_the_holder(tmp_path, caplog):
    me = Holder.this_process({})
    write_holder(tmp_path, process_start=(me.process_start or 0) + 1)  # our pid, but another process's start time
    RunLock(tmp_path, {}).acquire().release()
    assert "is no longer running" in caplog.text


def test_a_holder_on_another_host_needs_take_over_lock(tmp_path, caplog):
    holder = write_holder(tmp_path, host="node-elsewhere", pid=12345)
    with pytest.raises(RunLocked, match="host node-elsewhere, pid 12345.*on another host it cannot be checked"):
        RunLock(tmp_path, {}).acquire()
    lock = RunLock(tmp_path, {}, take_over=True).acquire()
    lock.release()
    assert f"held by {holder.describe()}; --take-over-lock" in caplog.text


def test_a_requeued_slurm_job_takes_over_its_own_earlier_lock(tmp_path, caplog):
    write_holder(tmp_path, host="node-elsewhere", slurm_job="4242", slurm_restart=0)
    with pytest.raises(RunLocked, match="SLURM job 4242"):  # another job entirely
        RunLock(tmp_path, {"SLURM_JOB_ID": "777", "SLURM_RESTART_COUNT": "1"}).acquire()
    with pytest.raises(RunLocked):  # the same attempt (another step of the same job): not an earlier one
        RunLock(tmp_path, {"SLURM_JOB_ID": "4242"}).acquire()
    lock = RunLock(tmp_path, {"SLURM_JOB_ID": "4242", "SLURM_RESTART_COUNT": "1"}).acquire()
    lock.release()
    assert "an earlier attempt of this job" in caplog.text


def test_release_leaves_a_lock_taken_over_by_another_trainer(tmp_path):
    first = RunLock(tmp_path, {}).acquire()
    second = RunLock(tmp_path, {}, take_over=True).acquire()
    first.release()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == second.me.token
    second.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_an_unusable_output_dir_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"train.output_dir .*/file/run: cannot take the run's lock: Not a directory"):
        RunLock(tmp_path / "file" / "run", {}).acquire()


def _lock_on_ranks(rank, world_size, run_dir):
    try:
        with hold_run_dir(run_dir, DistInfo(rank=rank, world_size=world_size, local_world_size=world_size), {}) as lock:
            held = (Path(run_dir) / LOCK_NAME).is_file()  # by rank 0, which may have released it when rank 1 looks
            return {"lock": lock is not None, "file": held if rank == 0 else None}
    except RunLocked as exn:
        return {"refused": str(exn)}


def test_only_rank_0_takes_the_lock_and_every_rank_stops_when_it_cannot(tmp_path):
    from ranks import run_ranks

    ranks = run_ranks(_lock_on_ranks, 2, tmp_path / "ok", str(tmp_path / "run"), timeout=120)
    assert ranks == [{"lock": True, "file": True}, {"lock": False, "file": None}]
    assert not (tmp_path / "run" / LOCK_NAME).exists()
    write_holder(tmp_path / "run", host="node-elsewhere")
    ranks = run_ranks(_lock_on_ranks, 2, tmp_path / "refused", str(tmp_path / "run"), timeout=120)
    assert "host node-elsewhere" in ranks[0]["refused"]
    assert ranks[1]["refused"].startswith("rank 0 could not take the lock")


def test_two_trainers_on_one_run_directory(synth_data, tiny_model_json, tmp_path):
    """The second `clipforge train` stops in one line naming the first; once the first is killed (SIGKILL: its lock
    stays), `--resume auto` takes the lock over and continues."""
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "cfg.yaml", synth_data, tiny_model_json, run_dir, steps=400, checkpoint_every=2)
    command = [sys.executable, "-m", "clipforge", "train", str(config), "--resume", "auto"]
    first = subprocess.Popen(command, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_step(run_dir, 3, first)
        second = subprocess.run(command, env=env(), capture_output=True, text=True, timeout=240)
        assert first.poll() is None  # the first one was left alone
        assert second.returncode == 2, second.stderr[-3000:]
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in second.stderr, second.stderr
        assert lines[0].startswith(f"clipforge train: error: RunLocked: {run_dir} is in use by another clipforge")
        assert f"pid {first.pid}, started " in lines[0]
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    started = time.time()
    third = subprocess.run([*command, "--set", "train.steps=6"], env=env(), capture_output=True, text=True, timeout=240)
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"taking over the lock of {run_dir}: its holder (host" in third.stderr
    assert f"pid {first.pid}" in third.stderr and "is no longer running" in third.stderr
    assert not (run_dir / LOCK_NAME).exists() and time.time() - started < 240
