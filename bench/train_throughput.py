"""Steady-state training throughput: ``open_clip_train.main`` against ``clipforge train``, same everything.

Both trainers run as subprocesses, one after the other and alternating (``--repeats``), on the same
shards, model, batch size, precision (fp32) and DataLoader worker count, for the same number of
steps. Each one's steady-state samples/s is the mean over its logging windows after the first
``--skip-windows`` (start-up, worker spawn and the first shuffle-buffer fill excluded):

* OpenCLIP: its own log line, ``Batch (t): <mean seconds per step over the window>``;
* clipforge: ``perf/samples_per_s`` in ``metrics.jsonl`` (steps × global batch / window wall time).

OpenCLIP's tar reader dies under webdataset 1.0.2 (``KeyError: 'fname'``, open_clip#935: webdataset
yields an empty end-of-shard marker its ``group_by_keys_nothrow`` does not expect); the wrapper
drops those markers before OpenCLIP's own grouping, and changes nothing else.

    python bench/train_throughput.py                       # demo model (tiny-rn-64, 64 px), batch 128, 2 workers
    python bench/train_throughput.py --model tiny-vit-64 --steps 120 --repeats 3

``--against REF`` adds a third trainer: clipforge as it was at git commit REF (checked out into a temporary
worktree and imported from there), so a change's cost to the default path is measured in the same run, against
the same OpenCLIP reference. ``--set KEY=VALUE`` overrides apply to the current clipforge only (REF may not know
the key), e.g. to compare the current default path without a newer speed-up::

    python bench/train_throughput.py --against df39410 --set train.trim_text_padding=false
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

OPEN_CLIP_WRAPPER = """
import sys
import open_clip
from open_clip_train import data, main

open_clip.add_model_config(sys.argv[1])

def tarfile_to_samples_nothrow(src, handler=data.log_and_continue):  # open_clip#935 under webdataset 1.0.2
    files = data.tar_file_expander(data.url_opener(src, handler=handler), handler=handler)
    return data.group_by_keys_nothrow((f for f in files if "fname" in f), handler=handler)

data.tarfile_to_samples_nothrow = tarfile_to_samples_nothrow
main.main(sys.argv[2:])
"""


def ensure_shards(out: Path, samples: int) -> str:
    sizes = out / "train" / "sizes.json"
    if sizes.is_file() and sum(json.loads(sizes.read_text()).values()) < samples:
        import shutil

        shutil.rmtree(out)  # written for a shorter run
    if not sizes.is_file():
        from clipforge.data.shards import SyntheticSpec, write_synthetic

        write_synthetic(
            SyntheticSpec(
                out=str(out),
                num_samples=samples,
                samples_per_shard=500,
                image_size=64,
                num_eval_samples=60,
                num_retrieval_samples=20,
                num_workers=2,
            ),
            progress=False,
        )
    shards = sorted((out / "train").glob("*.tar"))
    return f"{out}/train/{{{shards[0].stem}..{shards[-1].stem}}}.tar", sum(json.loads(sizes.read_text()).values())


def model_json(name: str) -> Path:
    path = Path(name)
    return path if path.suffix == ".json" else ROOT / "configs" / "models" / f"{name}.json"


def environment(threads: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
    return env


def run_open_clip(args, urls: str, work: Path, index: int) -> list[float]:
    name = f"openclip_{index}"
    command = [
        sys.executable,
        "-c",
        OPEN_CLIP_WRAPPER,
        str(model_json(args.model)),
        "--train-data",
        urls,
        "--dataset-type",
        "webdataset",
        "--train-num-samples",
        str(args.steps * args.batch_size),
        "--batch-size",
        str(args.batch_size),
        "--workers",
        str(args.workers),
        "--epochs",
        "1",
        "--lr",
        str(args.lr),
        "--wd",
        "0.1",
        "--warmup",
        "10",
        "--precision",
        "fp32",
        "--model",
        model_json(args.model).stem,
        "--log-every-n-steps",
        str(args.log_every),
        "--logs",
        str(work),
        "--name",
        name,
        "--save-frequency",
        "1",
        "--report-to",
        "",
        "--seed",
        "0",
        "--device",
        "cpu",
        "--grad-clip-norm",
        "1.0",
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=environment(args.threads), cwd=work)
    log = done.stdout + done.stderr
    if done.returncode != 0:
        raise RuntimeError(f"open_clip_train failed ({done.returncode}):\n{log[-4000:]}")
    step_times = [float(m) for m in re.findall(r"Batch \(t\): ([0-9.]+),", log)]
    return [args.batch_size / t for t in step_times[args.skip_windows :]]


def run_clipforge(
    args,
    urls: str,
    work: Path,
    index: int,
    tree: Path = ROOT,
    label: str = "clipforge",
    overrides: tuple[str, ...] = (),
) -> list[float]:
    out = work / f"{label}_{index}"
    env = environment(args.threads)
    if tree != ROOT:  # an older checkout: its src/ ahead of the installed (editable) clipforge
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree / "src"), env.get("PYTHONPATH")]))
    command = [
        sys.executable,
        "-m",
        "clipforge",
        "train",
        str(tree / "configs" / "demo.yaml"),
        "--set",
        f"data.train_urls={urls}",
        "--set",
        "data.sources=[]",
        "--set",
        f"data.batch_size={args.batch_size}",
        "--set",
        f"data.num_workers={args.workers}",
        "--set",
        f"model.name={model_json(args.model)}",
        "--set",
        f"optim.lr={args.lr}",
        "--set",
        "optim.warmup_steps=10",
        "--set",
        f"train.steps={args.steps}",
        "--set",
        f"train.checkpoint_every={args.steps}",
        "--set",
        f"train.output_dir={out}",
        "--set",
        "train.precision=fp32",
        "--set",
        "eval.suite=null",
        "--set",
        f"logging.log_every={args.log_every}",
        "--set",
        "logging.progress_bar=false",
        "--set",
        "logging.tensorboard=false",
        "--set",
        "logging.plot=false",
        *[part for kv in overrides for part in ("--set", kv)],
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=work)
    if done.returncode != 0:
        raise RuntimeError(f"{label} train failed ({done.returncode}):\n{(done.stdout + done.stderr)[-4000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["perf/samples_per_s"] for r in records if "perf/samples_per_s" in r]
    return rates[args.skip_windows : -1]  # the last window is cut short by the end of the run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-rn-64", help="configs/models/NAME.json or a JSON path")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--skip-windows", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="OMP threads of each trainer")
    parser.add_argument("--against", metavar="REF", help="also time clipforge as of this git commit")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for the current clipforge only (repeatable)",
    )
    parser.add_argument("--data-dir", default=str(Path(tempfile.gettempdir()) / "clipforge-bench-train"))
    args = parser.parse_args()
    if args.steps // args.log_every <= args.skip_windows + 1:
        parser.error("--steps must give more logging windows than --skip-windows + 1")

    import open_clip
    import torch

    urls, available = ensure_shards(Path(args.data_dir), max(10_000, args.steps * args.batch_size))
    if args.steps * args.batch_size > available:
        parser.error(f"{args.steps} steps × {args.batch_size} exceed the {available} samples of {args.data_dir}")
    print(
        f"# training throughput, steady state: {args.model}, batch {args.batch_size}, fp32, {args.workers} "
        f"workers, {args.steps} steps, {args.repeats} alternating repeats"
    )
    print(
        f"# torch {torch.__version__}, open_clip {open_clip.__version__}, python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, {args.threads} threads per trainer\n"
    )
    if args.overrides:
        print(f"# clipforge overrides: {' '.join(args.overrides)}")
    ours, theirs, before = [], [], []
    with tempfile.TemporaryDirectory() as scratch, contextlib.ExitStack() as stack:
        old = stack.enter_context(worktree(args.against, Path(scratch))) if args.against else None
        for index in range(args.repeats):
            ours.append(
                statistics.mean(run_clipforge(args, urls, Path(scratch), index, overrides=tuple(args.overrides)))
            )
            theirs.append(statistics.mean(run_open_clip(args, urls, Path(scratch), index)))
            line = f"repeat {index}: clipforge {ours[-1]:.1f} samples/s, open_clip_train {theirs[-1]:.1f} samples/s"
            if old is not None:
                before.append(statistics.mean(run_clipforge(args, urls, Path(scratch), index, old, "clipforge_ref")))
                line += f", clipforge@{args.against} {before[-1]:.1f} samples/s"
            print(line, flush=True)
    mine, reference = statistics.median(ours), statistics.median(theirs)
    print("\n| trainer | samples/s (median of repeats) | ratio |")
    print("|---|---:|---:|")
    print(f"| open_clip_train.main | {reference:.1f} | 1.00 |")
    if before:
        print(
            f"| clipforge train @ {args.against} | {statistics.median(before):.1f} | "
            f"{statistics.median(before) / reference:.2f} |"
        )
    print(f"| clipforge train | {mine:.1f} | {mine / reference:.2f} |")
    if before:
        paired = [now / then for now, then in zip(ours, before)]  # same repeat, adjacent in time: less drift
        print(
            f"\nclipforge now / @{args.against}: {mine / statistics.median(before):.3f} (medians); per repeat "
            f"{', '.join(f'{r:.3f}' for r in paired)}, median {statistics.median(paired):.3f}"
        )


@contextlib.contextmanager
def worktree(ref: str, scratch: Path):
    """REF checked out (detached) in a temporary git worktree, removed afterwards."""
    path = scratch / "ref-tree"
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), ref],
        check=True,
        capture_output=True,
        text=True,
    )
    try:
        shown = subprocess.run(
            ["git", "-C", str(path), "log", "-1", "--format=%h %s"], capture_output=True, text=True, check=True
        ).stdout.strip()
        imported = subprocess.run(
            [sys.executable, "-c", "import clipforge; print(clipforge.__file__)"],
            env={**os.environ, "PYTHONPATH": str(path / "src")},
            capture_output=True,
            text=True,
        )
        if not imported.stdout.startswith(str(path)):
            raise RuntimeError(f"clipforge@{ref} does not import from its worktree: {imported.stdout}{imported.stderr}")
        print(f"# clipforge@{ref}: {shown[:100]}")
        yield path
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)], capture_output=True)


if __name__ == "__main__":
    main()
