"""``clipforge submit``: render ``slurm/train.sbatch`` for one run and hand it to ``sbatch``.

The templates ship as package data (``clipforge/templates/{train,eval}.sbatch``; ``slurm/`` in the repository
links to them). The training template is the same file users can ``sbatch`` by hand; submission fills its two
marked blocks — the ``#SBATCH`` options (nodes, GPUs, tasks and CPUs for the chosen launcher, partition, time,
account, pre-emption signal, requeue, log file) and the settings (resolved config, launcher, interpreter, set-up
line) — and writes into the run directory::

    RUN/slurm/config.yaml      the resolved config the job trains (train.resume=auto, train.requeue)
    RUN/slurm/train.sbatch     the rendered script
    RUN/slurm/JOBID.out        the job's log (appended to by every requeued restart)

Nothing is written or submitted when the config is invalid (it is loaded and validated first), and
``--dry-run`` only prints the script.
"""

from __future__ import annotations

import argparse
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


def template_path(name: str = "train.sbatch") -> Path:
    """A job template shipped with the package (``slurm/`` in the repository links to the same files)."""
    path = Path(str(resources.files("clipforge") / "templates" / name))
    if not path.is_file():
        raise SubmitError(f"the SLURM template {path} is missing from the installed package; pass --template PATH")
    return path


def sbatch_options(spec: JobSpec, run_dir: Path, workdir: Path, num_workers: int) -> list[str]:
    cpus_per_proc = spec.cpus_per_proc or num_workers + 1
    if spec.launcher == "srun":  # a task per rank
        tasks, cpus_per_task = spec.procs_per_node, cpus_per_proc
    else:  # a task per node; its launcher starts the node's ranks
        tasks, cpus_per_task = 1, cpus_per_proc * spec.procs_per_node
    options = [
        f"--job-name={spec.job_name or run_dir.name}",
        f"--nodes={spec.nodes}",
        f"--ntasks-per-node={tasks}",
        f"--cpus-per-task={cpus_per_task}",
    ]
    if spec.gpus_per_node:
        options.append(f"--gpus-per-node={spec.gpus_per_node}")
    for name in ("partition", "time", "account", "qos", "mem"):
        if getattr(spec, name):
            options.append(f"--{name}={getattr(spec, name)}")
    if spec.signal_seconds:
        options.append(f"--signal=USR1@{spec.signal_seconds}")
    options.append("--requeue" if spec.requeue else "--no-requeue")
    options += ["--open-mode=append", f"--output={run_dir / 'slurm' / '%j.out'}", f"--chdir={workdir}"]
    return options + list(spec.sbatch_args)


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
        if not pattern.search(template):
            raise SubmitError(f"the SLURM template has no '# >>> {name}' ... '# <<< {name}' block")
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
    """Validate the config, render the script, write both into RUN/slurm/, ``sbatch`` it; returns what happened."""
    from clipforge.config import load_config, to_yaml

    cfg = load_config(config, [*overrides, "train.resume=auto", f"train.requeue={str(spec.requeue).lower()}"])
    run_dir = Path(cfg.train.output_dir).resolve()
    workdir = Path.cwd()
    slurm_dir = run_dir / "slurm"
    config_path = slurm_dir / "config.yaml"
    text = Path(template).read_text() if template else template_path().read_text()
    script = render(text, spec, config_path, run_dir, workdir, cfg.data.num_workers)
    if dry_run:
        return {"script": script, "config": to_yaml(cfg)}
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise SubmitError("sbatch is not on PATH: clipforge submit needs a SLURM client (or use --dry-run)")
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
        description="Validate CONFIG (with --set overrides), write the resolved config and the rendered sbatch script "
        "to RUN/slurm/ (RUN = train.output_dir), submit it with sbatch and print the job id and log "
        "path. The job asks for --signal=USR1@SECONDS and --requeue: on the signal the trainer "
        "checkpoints and requeues the job, which resumes from that checkpoint (train.resume=auto). To continue "
        "on another node count, submit the same CONFIG with the new --nodes (and the same train.output_dir): "
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
    parser.add_argument("--time", "-t", help="time limit, e.g. 24:00:00 (default: the partition's)")
    parser.add_argument("--account", "-A", help="SLURM account")
    parser.add_argument("--qos", help="quality of service")
    parser.add_argument("--mem", help="memory per node, e.g. 400G")
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
        help="extra #SBATCH option, e.g. --sbatch-arg=--exclusive (repeatable)",
    )
    parser.add_argument(
        "--template", help="sbatch template with the same two marked blocks (default: slurm/train.sbatch)"
    )
    parser.add_argument(
        "--wait", action="store_true", help="wait for the job to end (sbatch --wait); exit with its exit code"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the rendered script; write and submit nothing")
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
