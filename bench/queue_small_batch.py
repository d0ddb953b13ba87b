"""Does the negative queue help at a small batch? The demo recipe at batch 32, with and without
``loss.queue_size``, same data, steps and seed; prints held-out zero-shot accuracy and retrieval of each.

    python bench/queue_small_batch.py                          # batch 32, 1200 steps, queue 1024, momentum 0.99
    python bench/queue_small_batch.py --batch-size 16 --steps 2000 --queue-size 8192

Needs the demo's data (``make demo`` writes it, or ``clipforge prep synthetic --out data/synth``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(args, out: Path, queue_size: int) -> tuple[dict, float]:
    command = [
        sys.executable,
        "-m",
        "clipforge",
        "train",
        str(ROOT / "configs" / "demo.yaml"),
        "--set",
        f"data.batch_size={args.batch_size}",
        "--set",
        f"train.steps={args.steps}",
        "--set",
        f"checkpoint.every={args.steps}",
        "--set",
        f"train.output_dir={out}",
        "--set",
        f"optim.warmup_steps={args.steps // 14}",
        "--set",
        f"optim.lr={args.lr}",
        "--set",
        f"loss.queue_size={queue_size}",
        "--set",
        f"loss.queue_momentum={args.momentum}",
        "--set",
        "logging.progress_bar=false",
        "--set",
        "logging.tensorboard=false",
        "--set",
        "logging.plot=false",
        "--set",
        "logging.log_every=100",
    ]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"clipforge train failed:\n{(done.stdout + done.stderr)[-3000:]}")
    results = json.loads((out / "eval" / f"step_{args.steps:08d}.json").read_text())
    return results, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--queue-size", type=int, default=1024)
    parser.add_argument("--momentum", type=float, default=0.99)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()
    if not (ROOT / "data" / "synth" / "eval" / "colors" / "train" / "nshards.txt").is_file():
        parser.error("the demo data is missing: run `make demo` or `clipforge prep synthetic --out data/synth`")
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for queue_size in (0, args.queue_size):
            results, seconds = run(args, Path(scratch) / f"queue_{queue_size}", queue_size)
            rows.append((queue_size, results, seconds))
    print(f"# demo recipe, batch {args.batch_size}, {args.steps} steps, momentum {args.momentum}, lr {args.lr}\n")
    print("| loss.queue_size | shapes top-1 | colors top-1 | retrieval t→i R@1 | i→t R@1 | minutes |")
    print("|---:|---:|---:|---:|---:|---:|")
    for queue_size, results, seconds in rows:
        print(
            f"| {queue_size} | {results['shapes']['acc1']:.1%} | {results['colors']['acc1']:.1%} | "
            f"{results['retrieval']['image_retrieval_recall@1']:.1%} | "
            f"{results['retrieval']['text_retrieval_recall@1']:.1%} | {seconds / 60:.1f} |"
        )


if __name__ == "__main__":
    main()
