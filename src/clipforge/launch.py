"""``clipforge submit``: render ``slurm/train.sbatch`` for one run and hand it to ``sbatch``.

The templates ship as package data (``clipforge/templates/{train,eval}.sbatch``; ``slurm/`` in the repository
links to them). The training template is the same file users can ``sbatch`` by hand; submission fills its two
marked blocks — the ``#SBATCH`` options (nodes, GPUs, tasks and CPUs for the chosen launcher, partition, time,
account, pre-emption signal, requeue, log file) and the settings (resolved config, launcher, interpreter, set-up
line) — and writes into the run directory::

    RUN/slurm/config.yaml      the resolved config the job trains (checkpoint.resume=auto, train.requeue)
    RUN/slurm/train.sbatch     the rendered script
    RUN/slurm/JOBID.out        the job's log (appended to by every requeued restart)

Nothing is written or submitted when the config is invalid (it is loaded and validated first) or when the run
would refuse to start on the world size the job asks for (``clipforge.train.preflight.check_run``: output directory,
eval suite, resume target, shards and sample counts for nodes × processes per node × data.num_workers readers);
``--dry-run`` makes the same checks and only prints the script.

Every value that reaches an ``#SBATCH`` line is checked against what SLURM accepts (``--time``, ``--mem``, partition,
account and QOS names, ``--sbatch-arg``) and written as sbatch reads it: sbatch splits an ``#SBATCH`` line into
arguments at blanks, except inside double or single quotes, where a backslash escapes the next character, and an
unquoted ``#`` ends the line (``get_argument`` in SLURM's ``src/sbatch/opt.c``); a line break ends the directive
and, being the script's first command, every directive after it. So a value with a control character is refused
(one line naming the option and the value) and one with a blank, a quote, ``#`` or ``\\`` is double-quoted. The
settings are shell assignments quoted with ``shlex.quote``; ``--setup`` is a shell line by design, run by ``eval``.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

LAUNCHERS = ("srun", "torchrun", "accelerate")
_BLOCK = re.compile(r"(# >>> {name}[^\n]*\n)(.*?)(# <<< {name}\n)", re.S)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # a line break ends an #SBATCH directive; none belongs in a value
_PLAIN = re.compile(r"[A-Za-z0-9_.,:/=@%+-]+")  # what sbatch's directive reader takes as it is, unquoted
_NAME = re.compile(r"[^\s,\"'\\#=]+")  # a partition, account or QOS name
_TIME = re.compile(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?")
_MEMORY = re.compile(r"\d+(?:[KMGT]B?)?", re.I)  # SLURM's str_to_mbytes: megabytes, or K, M, G, T (+ optional B)
_LONG_OPTION = re.compile(r"(--[A-Za-z][A-Za-z0-9-]*)(?:=(.*))?", re.S)
# Options submit writes itself: set through its own options, not --sbatch-arg, so that what the pre-flight checked
# (the world size) and what it prints (the log path) are what the job gets.
_OWN_OPTIONS = {
    "--job-name": "--job-name",
    "--nodes": "--nodes",
    "--ntasks-per-node": "--procs-per-node and --launcher",
    "--ntasks": "--nodes and --procs-per-node",
    "--cpus-per-task": "--cpus-per-proc",
    "--gpus-per-node": "--gpus-per-node",
    "--partition": "--partition",
    "--time": "--time",
    "--account": "--account",
    "--qos": "--qos",
    "--mem": "--mem",
    "--signal": "--signal-seconds",
    "--requeue": "--no-requeue",
    "--no-requeue": "--no-requeue",
    "--open-mode": "(fixed: append, for requeued restarts)",
    "--output": "(fixed: RUN/slurm/%j.out)",
    "--chdir": "(fixed: the directory submit runs in)",
}


class SubmitError(ValueError):
    """The submission cannot be made; the message says which option or file."""


@dataclass
class JobSpec:
    """What the job asks SLURM for and how it launches the ranks."""

    nodes: int = 1
    gpus_per_node: int = 0
    procs_per_node: int | None = None
    """Training processes per node (default: the GPUs per node; 1 on a CPU-only job)."""
    cpus_per_proc: int | None = None
    """CPUs per training process (default: data.num_workers + 1: the workers plus the training process)."""
    launcher: str = "srun"
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    qos: str | None = None
    mem: str | None = None
    job_name: str | None = None
    signal_seconds: int = 300
    requeue: bool = True
    setup: str | None = None
    python: str = sys.executable
    sbatch_args: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise SubmitError(f"--nodes: must be >= 1, got {self.nodes}")
        if self.gpus_per_node < 0:
            raise SubmitError(f"--gpus-per-node: must be >= 0, got {self.gpus_per_node}")
        if self.procs_per_node is None:
            self.procs_per_node = self.gpus_per_node or 1
        if self.procs_per_node < 1:
            raise SubmitError(f"--procs-per-node: must be >= 1, got {self.procs_per_node}")
        if self.gpus_per_node and self.procs_per_node != self.gpus_per_node:
            raise SubmitError(
                f"--procs-per-node {self.procs_per_node} with --gpus-per-node {self.gpus_per_node}: "
                "clipforge runs one process per GPU"
            )
        if self.launcher not in LAUNCHERS:
            raise SubmitError(f"--launcher: {self.launcher!r} is not one of {', '.join(LAUNCHERS)}")
        if self.signal_seconds < 0:
            raise SubmitError(f"--signal-seconds: must be >= 0, got {self.signal_seconds}")
        for name in ("job_name", "partition", "time", "account", "qos", "mem"):
            if getattr(self, name) is not None:
                check_value(f"--{name.replace('_', '-')}", getattr(self, name))
        if self.partition is not None and not all(_NAME.fullmatch(name) for name in self.partition.split(",")):
            raise SubmitError(
                f"--partition {self.partition!r}: not a SLURM partition name (no blanks, quotes, '#', '=' or '\\'; "
                "several partitions are comma-separated: gpu,a100)"
            )
        for option, value in (("--account", self.account), ("--qos", self.qos)):
            if value is not None and not _NAME.fullmatch(value):
                raise SubmitError(f"{option} {value!r}: not a SLURM name (no blanks, commas, quotes, '#', '=' or '\\')")
        if self.time is not None:
            check_time(self.time)
        if self.mem is not None and not _MEMORY.fullmatch(self.mem):
            raise SubmitError(
                f"--mem {self.mem!r}: not a SLURM memory size (megabytes, or a number with a unit K, M, G or T: 400G)"
            )
        for argument in self.sbatch_args:
            _sbatch_arg(argument)


def check_value(option: str, value: str) -> None:
    """Refuse a value that cannot go into an ``#SBATCH`` line: empty, or holding a control character (a line break
    would end the directive, and sbatch would read the rest of the line as the script's first command)."""
    if not value:
        raise SubmitError(f"{option}: an empty value")
    bad = _CONTROL.search(value)
    if bad:
        raise SubmitError(
            f"{option} {value!r}: holds a control character ({bad.group()!r}); an #SBATCH line takes none"
        )


def check_time(value: str) -> None:
    """Refuse a ``--time`` SLURM would not read, or would read other than it looks: SLURM takes minutes, MM:SS,
    HH:MM:SS, D-HH, D-HH:MM and D-HH:MM:SS (or INFINITE / UNLIMITED) and any number in any field, so ``99:99``
    (MM:SS) is 99 minutes and 99 seconds, 1:40:39. A field past its range (seconds or minutes of 60 or more, hours
    of 24 or more after days) is refused here as the typo it almost always is; the leading field is unbounded
    (``48:00:00``, ``90:00``)."""
    if value.upper() in ("INFINITE", "UNLIMITED"):
        return
    match = _TIME.fullmatch(value)
    if match is None:
        raise SubmitError(f"--time {value!r}: not a SLURM time (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS)")
    days, *written = (None if group is None else int(group) for group in match.groups())
    written = [number for number in written if number is not None]
    units = ("hours", "minutes", "seconds") if days is not None or len(written) == 3 else ("minutes", "seconds")
    fields = dict(zip(units, written))
    seconds = (
        (days or 0) * 86400 + fields.get("hours", 0) * 3600 + fields.get("minutes", 0) * 60 + fields.get("seconds", 0)
    )
    bounded = list(fields.items())[0 if days is not None else 1 :]  # the leading field is unbounded: 48:00:00, 90:00
    for unit, number in bounded:
        limit = 24 if unit == "hours" else 60
        if number >= limit:
            form = ("D-" if days is not None else "") + ":".join(field[0].upper() * 2 for field in fields)
            whole_days, rest = divmod(seconds, 86400)
            reading = (
                f"{whole_days}-" * bool(whole_days) + f"{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
            )
            spelled = " ".join([f"{days} days"] * (days is not None) + [f"{n} {name}" for name, n in fields.items()])
            raise SubmitError(
                f"--time {value}: SLURM reads {form}, {spelled} = {reading}; refused: {unit} must be below {limit} "
                "(24:00:00 is 24 hours, 2-00:00:00 2 days)"
            )


def _sbatch_arg(argument: str) -> tuple[str, str | None]:
    """An ``--sbatch-arg``: a long option, ``--name`` or ``--name=value``, not one submit writes itself."""
    check_value("--sbatch-arg", argument)
    match = _LONG_OPTION.fullmatch(argument)
    if match is None:
        raise SubmitError(
            f"--sbatch-arg {argument!r}: give one long sbatch option, --name or --name=value (e.g. --constraint=a100)"
        )
    name, value = match.groups()
    if name in _OWN_OPTIONS:
        raise SubmitError(f"--sbatch-arg {argument}: clipforge submit writes {name} itself; use {_OWN_OPTIONS[name]}")
    if value == "":
        raise SubmitError(f"--sbatch-arg {argument!r}: an empty value")
    return name, value


def sbatch_quote(value: str) -> str:
    """``value`` as sbatch's ``#SBATCH`` reader gets it back as one argument: as it is when plain, else in double
    quotes with ``\\`` and ``"`` backslash-escaped. ``check_value`` must have accepted it."""
    if _PLAIN.fullmatch(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def template_path(name: str = "train.sbatch") -> Path:
    """A job template shipped with the package (``slurm/`` in the repository links to the same files)."""
    path = Path(str(resources.files("clipforge") / "templates" / name))
    if not path.is_file():
        raise SubmitError(f"the SLURM template {path} is missing from the installed package; pass --template PATH")
    return path


def _directive(name: str, value: str, where: str | None = None) -> str:
    """``--name=value`` as an ``#SBATCH`` argument; ``where`` names the value's source in an error (default: name)."""
    check_value(where or name, value)
    return f"{name}={sbatch_quote(value)}"


def sbatch_options(spec: JobSpec, run_dir: Path, workdir: Path, num_workers: int) -> list[str]:
    """The job's ``#SBATCH`` arguments, each one argument as sbatch reads it (``sbatch_quote``)."""
    cpus_per_proc = spec.cpus_per_proc or num_workers + 1
    if spec.launcher == "srun":  # a task per rank
        tasks, cpus_per_task = spec.procs_per_node, cpus_per_proc
    else:  # a task per node; its launcher starts the node's ranks
        tasks, cpus_per_task = 1, cpus_per_proc * spec.procs_per_node
    if "\\" in str(run_dir):
        raise SubmitError(
            f"train.output_dir {str(run_dir)!r}: holds a backslash, which in --output makes SLURM write the log "
            "without replacing %j (sbatch --help: filename pattern); choose a path without one"
        )
    options = [
        _directive(
            "--job-name",
            spec.job_name or run_dir.name,
            None if spec.job_name else f"--job-name (the run directory's name, train.output_dir {str(run_dir)!r})",
        ),
        f"--nodes={spec.nodes}",
        f"--ntasks-per-node={tasks}",
        f"--cpus-per-task={cpus_per_task}",
    ]
    if spec.gpus_per_node:
        options.append(f"--gpus-per-node={spec.gpus_per_node}")
    for name in ("partition", "time", "account", "qos", "mem"):
        if getattr(spec, name):
            options.append(_directive(f"--{name}", getattr(spec, name)))
    if spec.signal_seconds:
        options.append(f"--signal=USR1@{spec.signal_seconds}")
    options.append("--requeue" if spec.requeue else "--no-requeue")
    log = str(run_dir / "slurm").replace("%", "%%") + "/%j.out"  # %% is a literal % in SLURM's filename patterns
    options += [
        "--open-mode=append",
        _directive("--output", log, "train.output_dir"),
        _directive("--chdir", str(workdir), "the working directory"),
    ]
    for argument in spec.sbatch_args:
        name, value = _sbatch_arg(argument)
        options.append(name if value is None else f"{name}={sbatch_quote(value)}")
    return options


def _first_command(text: str) -> int | None:
    """The index of the first line sbatch takes for a command (it reads no ``#SBATCH`` line after it): the first
    whose first non-blank character is not ``#``."""
    for index, line in enumerate(text.split("\n")):
        stripped = line.lstrip(" \t\r\v\f")
        if stripped and not stripped.startswith("#"):
            return index
    return None


def render(template: str, spec: JobSpec, config_path: Path, run_dir: Path, workdir: Path, num_workers: int) -> str:
    """The template with its option and settings blocks replaced for this job."""
    options = "".join(f"#SBATCH {option}\n" for option in sbatch_options(spec, run_dir, workdir, num_workers))
    settings = {
        "CONFIG": str(config_path),
        "LAUNCHER": spec.launcher,
        "PYTHON": spec.python,
        "PROCS_PER_NODE": str(spec.procs_per_node),
        "REQUEUE": "true" if spec.requeue else "false",
        "SETUP": spec.setup or "",
    }
    settings_text = "".join(f"{key}={shlex.quote(value)}\n" for key, value in settings.items())
    for name, body in (("sbatch options", options), ("settings", settings_text)):
        pattern = re.compile(_BLOCK.pattern.format(name=re.escape(name)), re.S)
        match = pattern.search(template)
        if not match:
            raise SubmitError(f"the SLURM template has no '# >>> {name}' ... '# <<< {name}' block")
        first = _first_command(template[: match.start()])
        if name == "sbatch options" and first is not None:
            line = template.split("\n")[first].strip()
            raise SubmitError(
                f"the SLURM template's '# >>> sbatch options' block comes after its first command (line {first + 1}: "
                f"{line!r}); sbatch reads no #SBATCH line after that"
            )
        template = pattern.sub(lambda match, body=body: match.group(1) + body + match.group(3), template, count=1)
    return template


def default_setup() -> str | None:
    """Activate the virtual environment clipforge runs from, if it runs from one."""
    if sys.prefix != sys.base_prefix and (Path(sys.prefix) / "bin" / "activate").is_file():
        return f"source {shlex.quote(str(Path(sys.prefix) / 'bin' / 'activate'))}"
    return None


def submit(
    config: str,
    overrides: list[str],
    spec: JobSpec,
    *,
    dry_run: bool = False,
    wait: bool = False,
    template: str | None = None,
) -> dict:
    """Validate the config, make the run's pre-flight checks for the job's world size (nodes × processes per node),
    render the script, write both into RUN/slurm/, ``sbatch`` it; returns what happened (``checks``: what the
    pre-flight found). With ``dry_run`` everything but the writing and the submission."""
    from clipforge.config import to_yaml
    from clipforge.train.config import load_config

    cfg = load_config(config, [*overrides, "checkpoint.resume=auto", f"train.requeue={str(spec.requeue).lower()}"])
    run_dir = Path(cfg.train.output_dir).resolve()
    workdir = Path.cwd()
    slurm_dir = run_dir / "slurm"
    config_path = slurm_dir / "config.yaml"
    text = Path(template).read_text() if template else template_path().read_text()
    script = render(text, spec, config_path, run_dir, workdir, cfg.data.num_workers)
    if os.path.lexists(slurm_dir) and not slurm_dir.is_dir():
        raise SubmitError(f"{slurm_dir} is not a directory: clipforge submit writes the job's script and log there")
    sbatch = shutil.which("sbatch")
    if sbatch is None and not dry_run:
        raise SubmitError("sbatch is not on PATH: clipforge submit needs a SLURM client (or use --dry-run)")
    from clipforge.train.preflight import check_run  # torch and the trainer: only once the config is valid

    checks = check_run(cfg, world_size=spec.nodes * spec.procs_per_node)
    if dry_run:
        return {"script": script, "config": to_yaml(cfg), "checks": checks}
    slurm_dir.mkdir(parents=True, exist_ok=True)
    config_path.write_text(to_yaml(cfg))
    script_path = slurm_dir / "train.sbatch"
    script_path.write_text(script)
    command = [sbatch, "--parsable", *(["--wait"] if wait else []), str(script_path)]
    done = subprocess.run(command, capture_output=True, text=True)
    job_id = done.stdout.strip().splitlines()[0].split(";")[0] if done.stdout.strip() else None
    if job_id is None:
        raise SubmitError(f"sbatch {script_path} failed ({done.returncode}): {done.stderr.strip()}")
    return {
        "checks": checks,
        "job_id": job_id,
        "script": str(script_path),
        "config": str(config_path),
        "log": str(slurm_dir / f"{job_id}.out"),
        "returncode": done.returncode,
        "stderr": done.stderr.strip(),
    }


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "submit",
        help="render slurm/train.sbatch for a run and submit it with sbatch",
        description="Validate CONFIG (with --set overrides), make the checks `clipforge train --dry-run` makes for "
        "the world size the job asks for (nodes × processes per node: the output directory, the eval suite, the resume "
        "target, enough shards for world size × data.num_workers readers, sample counts), write the resolved config "
        "and the rendered sbatch script to RUN/slurm/ (RUN = train.output_dir), submit it with sbatch and print the "
        "job id and log path. Values that go into #SBATCH lines are checked against what SLURM accepts and quoted as "
        "sbatch reads them (docs/slurm.md). The job asks for --signal=USR1@SECONDS and --requeue: on the signal the "
        "trainer checkpoints and requeues the job, which resumes from that checkpoint (checkpoint.resume=auto). To "
        "continue on another node count, submit the same CONFIG with the new --nodes (and the same train.output_dir): "
        "the model, optimizer and data position are resharded, the rest of the epoch reads each remaining "
        "sample once, and train.steps keeps its sample count (docs/training.md, 'Resume anywhere'). "
        "SECONDS must cover the pre-emption checkpoint (bench/checkpoint_time.py measures it).",
    )
    parser.add_argument("config", help="run config YAML, e.g. configs/vit-b-32.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--nodes", type=int, default=1, help="nodes (1)")
    parser.add_argument(
        "--gpus-per-node",
        type=int,
        required=True,
        help="GPUs per node, one training process each; 0 for CPU-only nodes (gloo)",
    )
    parser.add_argument(
        "--procs-per-node", type=int, help="training processes per node (default: --gpus-per-node, or 1 on CPU nodes)"
    )
    parser.add_argument("--cpus-per-proc", type=int, help="CPUs per training process (default: data.num_workers + 1)")
    parser.add_argument(
        "--launcher",
        choices=LAUNCHERS,
        default="srun",
        help="srun: a task per rank (default); torchrun / accelerate: a task per node running the "
        "launcher, c10d rendezvous on the first node",
    )
    parser.add_argument("--partition", "-p", help="SLURM partition")
    parser.add_argument(
        "--time",
        "-t",
        help="time limit as SLURM writes it: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS, e.g. 24:00:00 "
        "(default: the partition's); a field after the first past its range (99:99) is refused",
    )
    parser.add_argument("--account", "-A", help="SLURM account")
    parser.add_argument("--qos", help="quality of service")
    parser.add_argument("--mem", help="memory per node: megabytes, or with a unit K, M, G or T, e.g. 400G")
    parser.add_argument("--job-name", help="job name (default: the run directory's name)")
    parser.add_argument(
        "--signal-seconds",
        type=int,
        default=300,
        help="ask SLURM for SIGUSR1 this long before the time limit (300; 0: no signal)",
    )
    parser.add_argument(
        "--no-requeue", action="store_true", help="on the signal only checkpoint and exit (75); do not requeue the job"
    )
    parser.add_argument(
        "--setup",
        help="shell line the job runs first, e.g. 'module load cuda/12.4; source "
        "venv/bin/activate' (default: activate the venv clipforge runs from)",
    )
    parser.add_argument(
        "--sbatch-arg",
        action="append",
        default=[],
        metavar="OPTION",
        help="extra #SBATCH option, a long one: --name or --name=value, e.g. --sbatch-arg=--exclusive (repeatable; "
        "not one this command sets through its own options)",
    )
    parser.add_argument(
        "--template", help="sbatch template with the same two marked blocks (default: slurm/train.sbatch)"
    )
    parser.add_argument(
        "--wait", action="store_true", help="wait for the job to end (sbatch --wait); exit with its exit code"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="make the checks and print the rendered script; write and submit nothing"
    )
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    spec = JobSpec(
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        procs_per_node=args.procs_per_node,
        cpus_per_proc=args.cpus_per_proc,
        launcher=args.launcher,
        partition=args.partition,
        time=args.time,
        account=args.account,
        qos=args.qos,
        mem=args.mem,
        job_name=args.job_name,
        signal_seconds=args.signal_seconds,
        requeue=not args.no_requeue,
        setup=args.setup if args.setup is not None else default_setup(),
        sbatch_args=args.sbatch_arg,
    )
    result = submit(args.config, args.set, spec, dry_run=args.dry_run, wait=args.wait, template=args.template)
    if args.dry_run:
        print(result["script"], end="")
        return 0
    print(
        f"submitted job {result['job_id']}\n  script {result['script']}\n  config {result['config']}\n"
        f"  log    {result['log']}"
    )
    if args.wait:
        print(f"job {result['job_id']} ended with exit code {result['returncode']}")
        return result["returncode"]
    return 0
