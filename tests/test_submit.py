"""``clipforge submit`` without a cluster: rendering, validation, refusal before any work.

The real submissions (sbatch, pre-emption, requeue) are in tests/test_slurm.py against a running SLURM.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from clipforge.cli import main
from clipforge.launch import JobSpec, SubmitError, render, template_path

REPO = Path(__file__).resolve().parents[1]


def options(script: str) -> list[str]:
    block = script.split("# >>> sbatch options")[1].split("# <<< sbatch options")[0]
    return [line.removeprefix("#SBATCH ") for line in block.splitlines() if line.startswith("#SBATCH ")]


def settings(script: str) -> dict[str, str]:
    block = script.split("# >>> settings")[1].split("# <<< settings")[0]
    return dict(line.split("=", 1) for line in block.splitlines()[1:] if "=" in line)


@pytest.mark.parametrize(("launcher", "tasks", "cpus"), [("srun", 8, 5), ("torchrun", 1, 40), ("accelerate", 1, 40)])
def test_rendered_options_follow_the_launcher(launcher, tasks, cpus, tmp_path):
    spec = JobSpec(
        nodes=4,
        gpus_per_node=8,
        launcher=launcher,
        partition="gpu",
        time="48:00:00",
        account="proj",
        signal_seconds=240,
        setup="module load cuda",
        sbatch_args=["--exclusive"],
    )
    script = render(template_path().read_text(), spec, tmp_path / "cfg.yaml", tmp_path / "run", Path("/work"), 4)
    assert options(script) == [
        "--job-name=run",
        "--nodes=4",
        f"--ntasks-per-node={tasks}",
        f"--cpus-per-task={cpus}",
        "--gpus-per-node=8",
        "--partition=gpu",
        "--time=48:00:00",
        "--account=proj",
        "--signal=USR1@240",
        "--requeue",
        "--open-mode=append",
        f"--output={tmp_path / 'run' / 'slurm' / '%j.out'}",
        "--chdir=/work",
        "--exclusive",
    ]
    assert settings(script) == {
        "CONFIG": str(tmp_path / "cfg.yaml"),
        "LAUNCHER": launcher,
        "PYTHON": spec.python,
        "PROCS_PER_NODE": "8",
        "REQUEUE": "true",
        "SETUP": "'module load cuda'",
    }
    # sbatch reads #SBATCH lines only before the first command: every one of them must come before `set -e...`
    first_command = next(i for i, line in enumerate(script.splitlines()) if line and not line.startswith("#"))
    assert all(i < first_command for i, line in enumerate(script.splitlines()) if line.startswith("#SBATCH"))
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    subprocess.run(["bash", "-n", str(path)], check=True)  # the rendered script parses


def test_dry_run_prints_the_script_and_writes_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(
        [
            "submit",
            str(REPO / "configs" / "demo.yaml"),
            "--set",
            f"train.output_dir={run_dir}",
            "--gpus-per-node",
            "0",
            "--procs-per-node",
            "2",
            "--no-requeue",
            "--signal-seconds",
            "0",
            "--dry-run",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert out.startswith("#!/bin/bash\n")
    assert options(out)[:4] == ["--job-name=run", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=3"]
    assert "--no-requeue" in options(out) and not any(o.startswith("--signal") for o in options(out))
    assert not any(o.startswith("--gpus") for o in options(out))
    assert settings(out)["REQUEUE"] == "false"
    assert not run_dir.exists()


def test_bad_config_is_refused_before_anything_is_written(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(
        [
            "submit",
            str(REPO / "configs" / "demo.yaml"),
            "--set",
            f"train.output_dir={run_dir}",
            "--set",
            "optim.learning_rate=1e-3",
            "--gpus-per-node",
            "0",
        ]
    )
    assert code == 2
    assert "optim.learning_rate" in capsys.readouterr().err
    assert not run_dir.exists()


def test_inconsistent_job_shapes_are_refused():
    with pytest.raises(SubmitError, match="one process per GPU"):
        JobSpec(gpus_per_node=8, procs_per_node=4)
    with pytest.raises(SubmitError, match="--nodes"):
        JobSpec(nodes=0)
    with pytest.raises(SubmitError, match="--launcher"):
        JobSpec(launcher="mpirun")


def test_submit_calls_sbatch_with_the_rendered_script(tmp_path, capsys, monkeypatch):
    """A stand-in sbatch on PATH records its arguments and the script it was given, and answers as sbatch does."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "sbatch"
    fake.write_text(
        f'#!/bin/bash\necho "$@" > {tmp_path}/args\ncp "${{@: -1}}" {tmp_path}/submitted\necho \'4242;cluster\'\n'
    )
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    run_dir = tmp_path / "run"
    code = main(
        [
            "submit",
            str(REPO / "configs" / "demo.yaml"),
            "--set",
            f"train.output_dir={run_dir}",
            "--set",
            "train.steps=10",
            "--gpus-per-node",
            "0",
            "--launcher",
            "torchrun",
            "--procs-per-node",
            "2",
            "--time",
            "1:00:00",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "submitted job 4242" in out and str(run_dir / "slurm" / "4242.out") in out
    assert (tmp_path / "args").read_text().split() == ["--parsable", str(run_dir / "slurm" / "train.sbatch")]
    submitted = (tmp_path / "submitted").read_text()
    assert submitted == (run_dir / "slurm" / "train.sbatch").read_text()
    assert "--ntasks-per-node=1" in options(submitted) and "--cpus-per-task=6" in options(submitted)
    config = (run_dir / "slurm" / "config.yaml").read_text()
    assert "steps: 10" in config and "resume: auto" in config and "requeue: true" in config
    assert settings(submitted)["CONFIG"] == str(run_dir / "slurm" / "config.yaml")


def test_missing_sbatch_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    code = main(
        [
            "submit",
            str(REPO / "configs" / "demo.yaml"),
            "--set",
            f"train.output_dir={tmp_path / 'run'}",
            "--gpus-per-node",
            "0",
        ]
    )
    assert code == 2
    assert "sbatch is not on PATH" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("environment", "nccl", "gloo"),
    [
        ({}, "", ""),  # not set: each library chooses, as before
        ({"CLIPFORGE_SOCKET_IFNAME": "ib0"}, "ib0", "ib0"),
        ({"CLIPFORGE_SOCKET_IFNAME": "ib0", "NCCL_SOCKET_IFNAME": "^docker,lo"}, "^docker,lo", "ib0"),
    ],
)
def test_the_job_exports_the_socket_interface_to_the_ranks(environment, nccl, gloo, tmp_path):
    """train.sbatch run by bash with stand-ins for scontrol and srun: srun's environment is what every rank gets."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (
        ("scontrol", "echo node0"),
        ("srun", 'echo "ranks see NCCL=[$NCCL_SOCKET_IFNAME] GLOO=[$GLOO_SOCKET_IFNAME]"'),
    ):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod((bin_dir / name).stat().st_mode | stat.S_IEXEC)
    base = {k: v for k, v in os.environ.items() if not k.endswith("SOCKET_IFNAME") and not k.startswith("SLURM_")}
    env = {
        **base,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "CLIPFORGE_CONFIG": "cfg.yaml",
        "SLURM_JOB_ID": "42",
        "SLURM_JOB_NODELIST": "node0",
        "SLURM_NNODES": "1",
        **environment,
    }
    done = subprocess.run(["bash", str(template_path())], env=env, capture_output=True, text=True, check=True)
    assert f"ranks see NCCL=[{nccl}] GLOO=[{gloo}]" in done.stdout, done.stdout + done.stderr
    assert f"sockets NCCL {nccl or 'auto'} gloo {gloo or 'auto'}" in done.stdout
