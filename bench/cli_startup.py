"""Start-up time of the ``clipforge`` commands a user types first: wall time and time spent importing.

    .venv/bin/python bench/cli_startup.py                 # 5 runs of each command, medians
    .venv/bin/python bench/cli_startup.py --runs 9 --top 8

Each command runs in a fresh subprocess (``python -m clipforge ...``, what the console script runs), as a user
starts it: ``--help``, ``train --help``, ``prep inspect`` on four tiny synthetic shards (32 samples, written here
into a temporary directory) and ``submit --dry-run`` of ``configs/demo.yaml``. Wall time is measured on plain
runs; import time on separate runs under ``-X importtime`` (the sum of the top-level cumulative figures, i.e.
every import the command made, at start-up or later), whose heaviest top-level imports ``--top`` lists.
Target (issue "A user's first hour"): every one of these under 1.5 s. docs/benchmarks.md has the figures.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def write_shards(out: Path) -> Path:
    from clipforge.data.shards import SyntheticSpec, write_synthetic

    spec = SyntheticSpec(
        out=str(out),
        num_samples=32,
        samples_per_shard=8,
        num_eval_samples=4,
        num_retrieval_samples=4,
        num_eval_train_samples=0,
        num_workers=1,
    )
    write_synthetic(spec, progress=False)
    return out / "train"


def commands(shards: Path) -> dict[str, list[str]]:
    return {
        "--help": ["--help"],
        "train --help": ["train", "--help"],
        "prep inspect": ["prep", "inspect", str(shards), "--no-write", "--quiet", "--workers", "1"],
        "submit --dry-run": [
            "submit",
            str(REPO / "configs" / "demo.yaml"),
            "--gpus-per-node",
            "0",
            "--dry-run",
            "--set",
            f"data.sources=[{{urls: '{shards}/{{00000..00003}}.tar'}}]",  # the run's checks read the shards
            "--set",
            "data.batch_size=8",
            "--set",
            "eval.suite=null",  # eval/synthetic.yaml's data is not here
        ],
    }


def run(arguments: list[str], importtime: bool = False) -> tuple[float, str]:
    """Wall seconds of ``python [-X importtime] -m clipforge ARGUMENTS`` and its stderr."""
    command = [sys.executable, *(["-X", "importtime"] if importtime else []), "-m", "clipforge", *arguments]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(arguments)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return seconds, done.stderr


def top_level_imports(importtime_log: str) -> dict[str, float]:
    """Seconds per top-level import (cumulative, its own imports included) from ``-X importtime`` output."""
    found: dict[str, float] = {}
    for line in importtime_log.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative, name = line[len("import time:") :].split("|")
        if name.startswith("  ", 1):  # " name" at the top level; two more spaces per nesting level
            continue
        found[name.strip()] = found.get(name.strip(), 0.0) + int(cumulative) / 1e6
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="runs of each command, wall and importtime each (5)")
    parser.add_argument("--top", type=int, default=5, help="heaviest top-level imports listed per command (5)")
    args = parser.parse_args()
    env_note = f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs"
    with tempfile.TemporaryDirectory() as tmp:
        shards = write_shards(Path(tmp))
        print(f"clipforge start-up, median of {args.runs} runs ({env_note})\n")
        print(f"{'command':<18} {'wall s':>7} {'(min-max)':>13} {'import s':>9}")
        heaviest = {}
        for name, arguments in commands(shards).items():
            walls = [run(arguments)[0] for _ in range(args.runs)]
            logs = [run(arguments, importtime=True)[1] for _ in range(args.runs)]
            imports = [top_level_imports(log) for log in logs]
            total = statistics.median(sum(found.values()) for found in imports)
            spread = f"({min(walls):.2f}-{max(walls):.2f})"
            print(f"{name:<18} {statistics.median(walls):>7.2f} {spread:>13} {total:>9.2f}")
            heaviest[name] = sorted(imports[len(imports) // 2].items(), key=lambda item: -item[1])[: args.top]
    print("\nheaviest top-level imports (cumulative s, one -X importtime run):")
    for name, items in heaviest.items():
        print(f"  {name:<18} " + ", ".join(f"{module} {seconds:.2f}" for module, seconds in items))


if __name__ == "__main__":
    main()
