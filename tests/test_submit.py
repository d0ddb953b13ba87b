"""``clipforge submit`` without a cluster: rendering, validation, refusal before any work.

The rendered ``#SBATCH`` header is read here as sbatch reads it (``sbatch_arguments``, a port of SLURM's own
reader), so a value that sbatch would split, cut at a ``#`` or end with a line break fails here. The real
submissions (sbatch, pre-emption, requeue) are in tests/test_slurm.py against a running SLURM.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
from pathlib import Path

import pytest

from clipforge.cli import main
from clipforge.data.shards import write_tar
from clipforge.launch import JobSpec, SubmitError, check_time, render, template_path

REPO = Path(__file__).resolve().parents[1]
BLANKS = " \t\n\v\f\r"  # C's isspace


def sbatch_arguments(script: str) -> list[str]:
    """The arguments sbatch takes from a batch script's ``#SBATCH`` lines, by SLURM's rules (``_opt_batch_script``
    and ``get_argument`` in src/sbatch/opt.c): lines end at ``\\n``; a line that starts with ``#SBATCH`` holds
    arguments; the first line whose first non-blank character is not ``#`` is a command and no directive after it
    is read; arguments are split at blanks except inside single or double quotes (dropped), a backslash keeps the
    next character (a blank outside quotes too), an unquoted ``#`` ends the line; an unmatched quote or a leading
    ``:`` is fatal; a ``hetjob``/``packjob`` argument starts a heterogeneous job's next component."""
    arguments = []
    for line in script.split("\n"):
        if not line.startswith("#SBATCH"):
            if line.strip(BLANKS) and not line.lstrip(BLANKS).startswith("#"):
                break
            continue
        rest, i = line[len("#SBATCH") :], 0
        while True:
            while i < len(rest) and rest[i] in BLANKS:
                i += 1
            if i == len(rest) or rest[i] == "#":
                break
            assert rest[i] != ":", f"sbatch: unexpected ':' in {line!r}"
            word, quote, escaped = [], None, False
            while i < len(rest) and (quote or rest[i] not in BLANKS):
                char = rest[i]
                if escaped:
                    escaped = False
                elif char == "\\":
                    i += 1
                    if i < len(rest) and rest[i] == " ":
                        word.append(" ")
                        i += 1
                    else:
                        escaped = True
                    continue
                elif quote:
                    if char == quote:
                        quote, i = None, i + 1
                        continue
                elif char in "\"'":
                    quote, i = char, i + 1
                    continue
                elif char == "#":
                    break
                word.append(char)
                i += 1
            assert quote is None, f"sbatch: unmatched {quote} in {line!r}"
            if not word:  # sbatch's reader returns no argument: the rest of the line is not read
                break
            argument = "".join(word)
            assert argument.lower() not in ("hetjob", "packjob"), f"a heterogeneous job separator in {line!r}"
            arguments.append(argument)
            if i < len(rest) and rest[i] == "#":
                break
    return arguments


def options(script: str) -> list[str]:
    return sbatch_arguments(script)


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


def demo(run_dir: Path, synth_data: Path, suite: Path, *arguments: str) -> list[str]:
    """``clipforge submit configs/demo.yaml`` on the test's 6 shards (3,000 samples) and suite, into ``run_dir``."""
    urls = f"{synth_data}/train/{{00000..00005}}.tar"
    return [
        "submit",
        str(REPO / "configs" / "demo.yaml"),
        "--set",
        f"train.output_dir={run_dir}",
        "--set",
        f"data.sources=[{{urls: '{urls}'}}]",
        "--set",
        f"eval.suite={suite}",
        *arguments,
    ]


def test_dry_run_prints_the_script_and_writes_nothing(tmp_path, capsys, synth_data, synth_suite):
    run_dir = tmp_path / "run"
    code = main(
        [
            *demo(run_dir, synth_data, synth_suite),
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


def test_submit_calls_sbatch_with_the_rendered_script(tmp_path, capsys, monkeypatch, synth_data, synth_suite):
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
            *demo(run_dir, synth_data, synth_suite),
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


# ------------------------------------------------------------------------------------- values in the #SBATCH header


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--job-name", "x\ntouch M"], r"--job-name 'x\\ntouch M': holds a control character \('\\n'\)"),
        (["--job-name", "x\rtouch M"], r"--job-name 'x\\rtouch M': holds a control character"),
        (["--job-name", ""], r"--job-name: an empty value"),
        (["--partition", "gpu a100"], r"--partition 'gpu a100': not a SLURM partition name .*gpu,a100"),
        (["--partition", "gpu\n#SBATCH --x"], r"--partition .*holds a control character"),
        (["--account", "my proj"], r"--account 'my proj': not a SLURM name"),
        (["--qos", "high#x"], r"--qos 'high#x': not a SLURM name"),
        (["--mem", "400 GB"], r"--mem '400 GB': not a SLURM memory size"),
        (["--time", "99:99"], r"--time 99:99: SLURM reads MM:SS, 99 minutes 99 seconds = 01:40:39; refused"),
        (["--time", "1-30"], r"--time 1-30: SLURM reads D-HH, .* = 2-06:00:00; refused: hours must be below 24"),
        (["--time", "24 h"], r"--time '24 h': not a SLURM time"),
        (["--sbatch-arg=-C a100"], r"--sbatch-arg '-C a100': give one long sbatch option"),
        (["--sbatch-arg=--comment=a\nb"], r"--sbatch-arg '--comment=a\\nb': holds a control character"),
        (["--sbatch-arg=--nodes=16"], r"--sbatch-arg --nodes=16: clipforge submit writes --nodes itself; use --nodes"),
        (["--sbatch-arg=--output=/tmp/x"], r"writes --output itself"),
    ],
    ids=lambda value: repr(value) if isinstance(value, list) else None,
)
def test_a_value_sbatch_would_misread_is_refused_in_one_line(arguments, message, tmp_path, capsys):
    """Refused before the config's data is looked at (the JobSpec is checked first) and before anything is written."""
    run_dir = tmp_path / "run"
    code = main(
        [
            "submit",
            str(REPO / "configs" / "demo.yaml"),
            "--set",
            f"train.output_dir={run_dir}",
            "--gpus-per-node",
            "0",
            *arguments,
            "--dry-run",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and re.search(message, err), err
    assert not run_dir.exists() and not (tmp_path / "M").exists()


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("90", 90 * 60),
        ("90:30", 90 * 60 + 30),  # MM:SS: the leading field is unbounded
        ("48:00:00", 48 * 3600),
        ("2-12", 2 * 86400 + 12 * 3600),
        ("2-12:30", 2 * 86400 + 12 * 3600 + 30 * 60),
        ("0-23:59:59", 86399),
        ("UNLIMITED", None),
    ],
)
def test_every_slurm_time_format_is_accepted(value, seconds):
    check_time(value)
    JobSpec(time=value)


@pytest.mark.parametrize("value", ["99:99", "1:60:00", "1-24", "1-12:60", "0-1:2:60", "1:2:3:4", "-5", "1-", "4h"])
def test_a_time_slurm_would_misread_or_refuse_is_refused(value):
    with pytest.raises(SubmitError, match=f"--time '?{re.escape(value)}"):
        check_time(value)


def hostile_job(tmp_path: Path) -> tuple[str, JobSpec, Path, Path, Path]:
    """A script rendered with every option set to a value holding blanks, quotes, ``#``, ``\\``, ``%`` or ``$(...)``."""
    run_dir = tmp_path / "my runs" / 'exp 1 "it\'s" #2 100%'
    workdir = tmp_path / "work dir #1"
    config_path = tmp_path / "it's $(touch M3) dir" / "config.yaml"
    spec = JobSpec(
        nodes=2,
        gpus_per_node=4,
        partition="gpu,a100",
        time="2-00:00:00",
        account="proj-1",
        qos="high",
        mem="400G",
        job_name="x\"; touch M # \\ 'q' $(id) 100% hetjob",
        setup="echo one'; touch M; echo '\n$(touch M2) `touch M4`",
        python=str(tmp_path / "py thon's" / "bin" / "python"),
        sbatch_args=['--comment=two words # and a "quote"', "--exclusive", "--constraint=a100|h100"],
    )
    return (
        render(template_path().read_text(), spec, config_path, run_dir, workdir, 2),
        spec,
        run_dir,
        workdir,
        config_path,
    )


def test_every_value_reaches_sbatch_as_one_argument_and_no_line_is_injected(tmp_path):
    script, spec, run_dir, workdir, _ = hostile_job(tmp_path)
    assert sbatch_arguments(script) == [
        f"--job-name={spec.job_name}",
        "--nodes=2",
        "--ntasks-per-node=4",
        "--cpus-per-task=3",
        "--gpus-per-node=4",
        "--partition=gpu,a100",
        "--time=2-00:00:00",
        "--account=proj-1",
        "--qos=high",
        "--mem=400G",
        "--signal=USR1@300",
        "--requeue",
        "--open-mode=append",
        f"--output={str(run_dir / 'slurm').replace('%', '%%')}/%j.out",  # %% is SLURM's literal %
        f"--chdir={workdir}",
        '--comment=two words # and a "quote"',
        "--exclusive",
        "--constraint=a100|h100",
    ]
    # nothing but comments and directives before the template's own first command
    lines = script.split("\n")
    first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.lstrip().startswith("#"))
    assert lines[first_command] == "set -euo pipefail"
    assert all(line.startswith("#SBATCH --") for line in lines if line.startswith("#SBATCH"))
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    subprocess.run(["bash", "-n", str(path)], check=True)


def test_the_settings_block_holds_each_value_as_it_was_given(tmp_path):
    """The settings are shell assignments: run, they give back each value unchanged and run nothing (the set-up line
    is run by the job's ``eval``, by design, not by its assignment)."""
    script, spec, _, _, config_path = hostile_job(tmp_path)
    block = script.split("# >>> settings")[1].split("\n", 1)[1].split("# <<< settings")[0]
    show = 'printf "%s\\0" "$CONFIG" "$LAUNCHER" "$PYTHON" "$PROCS_PER_NODE" "$REQUEUE" "$SETUP"'
    done = subprocess.run(["bash", "-c", block + show], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert done.stdout.split("\0")[:-1] == [str(config_path), "srun", spec.python, "4", "true", spec.setup]
    assert not any((tmp_path / name).exists() for name in ("M", "M2", "M3", "M4"))


def test_a_run_directory_with_a_line_break_is_refused(tmp_path):
    spec = JobSpec(job_name="fine")
    with pytest.raises(SubmitError, match=r"train.output_dir '.*\\n.*': holds a control character"):
        render(template_path().read_text(), spec, tmp_path / "c.yaml", tmp_path / "a\nb", tmp_path, 2)


def test_a_template_whose_options_come_after_a_command_is_refused(tmp_path):
    text = template_path().read_text().replace("# >>> sbatch options", "module load cuda\n# >>> sbatch options", 1)
    with pytest.raises(SubmitError, match=r"block comes after its first command \(line \d+: 'module load cuda'\)"):
        render(text, JobSpec(), tmp_path / "c.yaml", tmp_path / "run", tmp_path, 2)


# --------------------------------------------------------------------------------------- the run's own checks first


def test_a_layout_train_would_refuse_is_refused_before_anything_is_written(
    tmp_path, capsys, monkeypatch, synth_data, synth_suite
):
    """6 shards for 2 nodes × 2 GPUs × 2 workers = 8 readers: `train` refuses it at start, so submit refuses it (with
    --dry-run too, and with an sbatch at hand, which is never called) and writes nothing; the same config on 2 ranks ×
    2 workers is accepted."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\ntouch {tmp_path}/sbatch-called\necho 1\n")
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    run_dir = tmp_path / "run"
    layout = ["--set", "data.num_workers=2", "--nodes", "2", "--gpus-per-node", "2"]
    for dry_run in (["--dry-run"], []):
        assert main([*demo(run_dir, synth_data, synth_suite), *layout, *dry_run]) == 2
        err = capsys.readouterr().err
        assert "6 shards cannot feed world_size × num_workers = 8 readers disjointly" in err, err
        assert not run_dir.exists() and not (tmp_path / "sbatch-called").exists()
    fits = ["--set", "data.num_workers=2", "--gpus-per-node", "0", "--procs-per-node", "2", "--dry-run"]
    assert main([*demo(run_dir, synth_data, synth_suite), *fits]) == 0
    assert "#SBATCH --ntasks-per-node=2" in capsys.readouterr().out and not run_dir.exists()


def test_empty_data_a_missing_suite_and_an_unwritable_run_dir_are_refused(tmp_path, capsys, synth_data, synth_suite):
    empty = tmp_path / "empty"
    for shard in range(3):
        write_tar(empty / f"{shard:05d}.tar", iter([]))
    (empty / "sizes.json").write_text(json.dumps({f"{shard:05d}.tar": 0 for shard in range(3)}))
    (tmp_path / "a-file").write_text("")
    cases = {
        r"data.sources\[0\]: its 3 shards \(.*empty/\{00000..00002\}.tar\) hold 0 samples": [
            "--set",
            f"data.sources=[{{urls: '{empty}/{{00000..00002}}.tar'}}]",
        ],
        r"missing.yaml": ["--set", f"eval.suite={tmp_path / 'missing.yaml'}"],
        r"train.output_dir: .*a-file/run cannot be created: .*a-file is a file, not a directory": [
            "--set",
            f"train.output_dir={tmp_path / 'a-file' / 'run'}",
        ],
    }
    for message, overrides in cases.items():
        run_dir = tmp_path / "run"
        code = main([*demo(run_dir, synth_data, synth_suite), *overrides, "--gpus-per-node", "0", "--dry-run"])
        err = capsys.readouterr().err
        assert code == 2 and re.search(message, err), err
        assert not run_dir.exists()
