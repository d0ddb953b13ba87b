"""Steady-state training throughput: ``open_clip_train.main`` against ``clipforge train``, same everything.

Both trainers run as subprocesses, one after the other and alternating (``--repeats``), on the same
shards, model, batch size, precision (fp32) and DataLoader worker count, for the same number of
steps. Odd repeats run the trainers in the reverse order, so that a machine speeding up or slowing
down over the run (this 2-core machine drifts by 15% within minutes) favours none of them. Each
one's steady-state samples/s is the mean over its logging windows after the first ``--skip-windows``
(start-up, worker spawn and the first shuffle-buffer fill excluded):

* OpenCLIP: its own log line, ``Batch (t): <mean seconds per step over the window>``;
* clipforge: ``perf/samples_per_s`` in ``metrics.jsonl`` (steps × global batch / window wall time).

OpenCLIP's tar reader dies under webdataset 1.0.2 (``KeyError: 'fname'``, open_clip#935: webdataset
yields an empty end-of-shard marker its ``group_by_keys_nothrow`` does not expect); the wrapper
drops those markers before OpenCLIP's own grouping, and changes nothing else.

    python bench/train_throughput.py                       # demo model (tiny-rn-64, 64 px), batch 128, 2 workers
    python bench/train_throughput.py --model tiny-vit-64 --steps 120 --repeats 3

On a GPU (``bench/gpu_check.sh`` runs this), the same comparison with open_clip_train's ``--precision amp_bf16``
(and ``--torchcompile`` with ``--compile``, clipforge's ``speed.compile``), shards written at ``--shard-image-size``::

    python bench/train_throughput.py --device cuda --model ViT-B-16 --precision bf16 --batch-size 256 \
        --shard-image-size 256 --workers 8 --steps 60 --repeats 1 [--compile]

Each trainer's model TFLOP/s (``clipforge.train.flops``, the count behind ``perf/mfu``: OpenCLIP's at the full
context length it always runs, clipforge's at each batch's trimmed length, from its ``metrics.jsonl``) and its
fraction of this CPU's fp32 GEMM peak (``clipforge.train.peak``: probed once at ``--threads`` and cached) are
printed too.

``--against REF`` adds a third trainer: clipforge as it was at git commit REF (checked out into a temporary
worktree and imported from there), so a change's cost to the default path is measured in the same run, against
the same OpenCLIP reference. ``--set KEY=VALUE`` overrides apply to the current clipforge only (REF may not know
the key), e.g. to compare the current default path without a newer speed-up::

    python bench/train_throughput.py --against df39410 --set speed.trim_text_padding=false
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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

OPEN_CLIP_WRAPPER = """
import sys
import open_clip
from open_clip_train import data, main

if sys.argv[1]:  # one of configs/models/*.json; empty: an open_clip architecture by name
    open_clip.add_model_config(sys.argv[1])

def tarfile_to_samples_nothrow(src, handler=data.log_and_continue):  # open_clip#935 under webdataset 1.0.2
    files = data.tar_file_expander(data.url_opener(src, handler=handler), handler=handler)
    return data.group_by_keys_nothrow((f for f in files if "fname" in f), handler=handler)

data.tarfile_to_samples_nothrow = tarfile_to_samples_nothrow
main.main(sys.argv[2:])
"""


def ensure_shards(out: Path, samples: int, image_size: int = 64) -> str:
    out = out / f"{image_size}px"
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
                image_size=image_size,
                num_eval_samples=60,
                num_retrieval_samples=20,
                num_workers=os.cpu_count() or 2,
            ),
            progress=False,
        )
    shards = sorted((out / "train").glob("*.tar"))
    return f"{out}/train/{{{shards[0].stem}..{shards[-1].stem}}}.tar", sum(json.loads(sizes.read_text()).values())


def model_json(name: str) -> Path:
    path = Path(name)
    return path if path.suffix == ".json" else ROOT / "configs" / "models" / f"{name}.json"


def environment(threads: int, device: str = "cpu") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def is_builtin(model: str) -> bool:
    """An open_clip architecture by name (ViT-B-16), not one of configs/models/*.json."""
    return not model.endswith(".json") and not (ROOT / "configs" / "models" / f"{model}.json").is_file()


OPEN_CLIP_PRECISION = {"fp32": "fp32", "bf16": "amp_bf16"}


def run_open_clip(args, urls: str, work: Path, index: int) -> list[float]:
    name = f"openclip_{index}"
    command = [
        sys.executable,
        "-c",
        OPEN_CLIP_WRAPPER,
        "" if is_builtin(args.model) else str(model_json(args.model)),
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
        OPEN_CLIP_PRECISION[args.precision],
        "--model",
        args.model if is_builtin(args.model) else model_json(args.model).stem,
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
        args.device,
        "--grad-clip-norm",
        "1.0",
        *(["--torchcompile"] if args.compile else []),
    ]
    env = environment(args.threads, args.device)
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=work)
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
) -> list[tuple[float, float | None]]:
    """(samples/s, model TFLOP/s or None for a clipforge without perf/model_tflops_per_device) of each window."""
    out = work / f"{label}_{index}"
    env = environment(args.threads, args.device)
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
        f"model.name={args.model if is_builtin(args.model) else model_json(args.model)}",
        "--set",
        f"optim.lr={args.lr}",
        "--set",
        "optim.warmup_steps=10",
        "--set",
        f"train.steps={args.steps}",
        "--set",
        f"checkpoint.every={args.steps}",
        "--set",
        f"train.output_dir={out}",
        "--set",
        f"train.precision={args.precision}",
        "--set",
        f"speed.compile={str(args.compile).lower()}",
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
    command = [in_layout_of(tree, part) for part in command]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=work)
    if done.returncode != 0:
        raise RuntimeError(f"{label} train failed ({done.returncode}):\n{(done.stdout + done.stderr)[-4000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in records if "perf/samples_per_s" in r][args.skip_windows : -1]  # the last is cut short
    return [(r["perf/samples_per_s"], r.get("perf/model_tflops_per_device")) for r in windows]


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
        "--only-against",
        action="store_true",
        help="with --against: time only the two clipforges (a change's cost to the default path, in half the time)",
    )
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="bf16: open_clip's amp_bf16")
    parser.add_argument("--compile", action="store_true", help="speed.compile / open_clip's --torchcompile")
    parser.add_argument("--shard-image-size", type=int, default=64, help="side of the synthetic shards' images")
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
    if args.only_against and not args.against:
        parser.error("--only-against needs --against REF")
    if args.steps // args.log_every <= args.skip_windows + 1:
        parser.error("--steps must give more logging windows than --skip-windows + 1")

    import open_clip
    import torch

    from clipforge.train.peak import peak_tflops

    urls, available = ensure_shards(
        Path(args.data_dir), max(10_000, args.steps * args.batch_size), args.shard_image_size
    )
    if args.steps * args.batch_size > available:
        parser.error(f"{args.steps} steps × {args.batch_size} exceed the {available} samples of {args.data_dir}")
    print(
        f"# training throughput, steady state: {args.model}, batch {args.batch_size}, {args.precision}"
        f"{', compiled' if args.compile else ''}, {args.device}, {args.workers} "
        f"workers, {args.steps} steps, {args.repeats} alternating repeats"
    )
    print(
        f"# torch {torch.__version__}, open_clip {open_clip.__version__}, python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, {args.threads} threads per trainer"
        f"{', ' + torch.cuda.get_device_name() if args.device == 'cuda' else ''}, {time.strftime('%Y-%m-%d')}\n"
    )
    if args.overrides:
        print(f"# clipforge overrides: {' '.join(args.overrides)}")
    flops = full_length_flops(args.model)
    torch.set_num_threads(args.threads)
    peak, source = peak_tflops(args.device, args.precision)
    print(f"# peak: {peak:.4g} TFLOP/s per device ({source}; clipforge.train.peak)")
    ours, theirs, before = [], [], []
    with tempfile.TemporaryDirectory() as scratch, contextlib.ExitStack() as stack:
        old = stack.enter_context(worktree(args.against, Path(scratch))) if args.against else None

        def clipforge_now(index):
            ours.append(window_means(run_clipforge(args, urls, Path(scratch), index, overrides=tuple(args.overrides))))

        def open_clip_train(index):
            rates = run_open_clip(args, urls, Path(scratch), index)
            theirs.append((statistics.mean(rates), statistics.mean(rates) * flops / 1e12))

        def clipforge_then(index):
            before.append(window_means(run_clipforge(args, urls, Path(scratch), index, old, "clipforge_ref")))

        trainers = [clipforge_now] + ([] if args.only_against else [open_clip_train])
        trainers += [clipforge_then] if old is not None else []
        for index in range(args.repeats):
            for trainer in trainers if index % 2 == 0 else trainers[::-1]:
                trainer(index)
            line = f"repeat {index}: clipforge {ours[-1][0]:.1f} samples/s"
            line += "" if args.only_against else f", open_clip_train {theirs[-1][0]:.1f} samples/s"
            if old is not None:
                line += f", clipforge@{args.against} {before[-1][0]:.1f} samples/s"
            print(line, flush=True)
    mine = median_of(ours)
    reference = median_of(theirs) if theirs else median_of(before)  # --only-against: ratios to the revision
    print("\n| trainer | samples/s (median of repeats) | ratio | model TFLOP/s | MFU (of the peak above) |")
    print("|---|---:|---:|---:|---:|")
    if theirs:
        print(row("open_clip_train.main", reference, reference, peak))
    if before:
        print(row(f"clipforge train @ {args.against}", median_of(before), reference, peak))
    print(row("clipforge train", mine, reference, peak))
    if before:
        paired = [now[0] / then[0] for now, then in zip(ours, before)]  # same repeat, adjacent in time: less drift
        print(
            f"\nclipforge now / @{args.against}: {mine[0] / median_of(before)[0]:.3f} (medians); per repeat "
            f"{', '.join(f'{r:.3f}' for r in paired)}, median {statistics.median(paired):.3f}"
        )


def full_length_flops(model: str) -> float:
    """Model FLOPs of one training sample at the full context length and on every token (what open_clip_train
    always runs)."""
    from clipforge.models import ModelConfig
    from clipforge.train.flops import count_train_flops

    cfg = ModelConfig(name=model if is_builtin(model) else str(model_json(model)))
    return count_train_flops(cfg, pooled_last_block=False).train()


def window_means(windows: list[tuple[float, float | None]]) -> tuple[float, float | None]:
    rates, tflops = zip(*windows)
    return statistics.mean(rates), None if None in tflops else statistics.mean(tflops)


def median_of(runs: list[tuple[float, float | None]]) -> tuple[float, float | None]:
    tflops = [t for _, t in runs]
    return statistics.median(r for r, _ in runs), None if None in tflops else statistics.median(tflops)


def row(label: str, result: tuple[float, float | None], reference: tuple[float, float | None], peak: float) -> str:
    rate, tflops = result
    if tflops is None:
        return f"| {label} | {rate:.1f} | {rate / reference[0]:.2f} | n/a | n/a |"
    return f"| {label} | {rate:.1f} | {rate / reference[0]:.2f} | {tflops:.4f} | {tflops / peak:.1%} |"


def in_layout_of(tree: Path, argument: str) -> str:
    """``argument`` (a ``--set KEY=VALUE`` value) with KEY as ``tree``'s config names it: a checkout from before the
    train section was split into checkpoint/parallel/speed reads those keys under ``train.``."""
    from clipforge.train.config import MOVED

    if tree == ROOT or "class SpeedConfig" in (tree / "src/clipforge/train/config.py").read_text():
        return argument
    key, equals, value = argument.partition("=")
    old = {new: old for old, new in MOVED.items()}.get(key)
    return f"{old}={value}" if equals and old else argument


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
