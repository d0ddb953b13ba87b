"""Peak memory and time of the contrastive loss, forward + backward: OpenCLIP's against ours, in one run.

    .venv/bin/python bench/loss_memory.py                      # CLIP + SigLIP, 4k/16k/32k both, 64k ours only
    .venv/bin/python bench/loss_memory.py --kinds clip --batches 4096 16384

Each measurement runs in a fresh subprocess on the CPU (peak resident memory of that process
above its state just before the loss, and wall time of one forward + backward on random
L2-normalised 512-d features at logit scale 100/7). The subprocess has an address-space limit,
so a loss that does not fit reports "out of memory" instead of invoking the kernel's OOM killer.
Targets (issue #3): ours ≤ 1/10 of OpenCLIP's peak at 32,768 at ≤ 1.3× its time; 65,536 fits.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

MEMORY_LIMIT_GB = float(os.environ.get("CLIPFORGE_BENCH_MEMORY_GB", "22"))


def _rss_mb() -> float:
    with open("/proc/self/statm") as stream:
        return int(stream.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(implementation: str, kind: str, batch: int, dim: int, tile: int) -> dict:
    """Runs inside the subprocess."""
    resource.setrlimit(resource.RLIMIT_AS, (int(MEMORY_LIMIT_GB * 2**30), resource.RLIM_INFINITY))
    import open_clip.loss
    import torch
    import torch.nn.functional as F

    from clipforge.losses import ClipLoss, SigLipLoss

    torch.manual_seed(0)
    image = F.normalize(torch.randn(batch, dim), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(batch, dim), dim=-1).requires_grad_()
    scale = torch.tensor(100 / 7, requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)
    if implementation == "openclip":
        loss_fn = open_clip.loss.ClipLoss() if kind == "clip" else open_clip.loss.SigLipLoss()
    else:
        loss_fn = ClipLoss(tile_size=tile) if kind == "clip" else SigLipLoss(tile_size=tile)
    args = (image, text, scale) if kind == "clip" else (image, text, scale, bias)
    baseline = _rss_mb()
    start = time.perf_counter()
    out = loss_fn(*args)
    loss = out["contrastive"] if isinstance(out, dict) else out
    loss.backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"peak_mb": peak - baseline, "seconds": seconds, "loss": loss.item()}


def run_one(implementation: str, kind: str, batch: int, dim: int, tile: int) -> dict:
    command = [sys.executable, __file__, "--one", implementation, kind, str(batch), str(dim), str(tile)]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        reason = (
            "out of memory"
            if "MemoryError" in proc.stderr or "alloc" in proc.stderr.lower() or proc.returncode < 0
            else proc.stderr.strip().splitlines()[-1]
        )
        return {"error": reason}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", nargs="+", default=["clip", "siglip"])
    parser.add_argument("--batches", nargs="+", type=int, default=[4096, 16384, 32768, 65536])
    parser.add_argument("--openclip-max", type=int, default=32768, help="largest batch to try OpenCLIP at")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--tile", type=int, default=4096)
    parser.add_argument("--one", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        implementation, kind, batch, dim, tile = args.one
        print(json.dumps(measure(implementation, kind, int(batch), int(dim), int(tile))))
        return
    print(
        f"loss forward+backward on CPU, {args.dim}-d features, tile {args.tile}, "
        f"address-space limit {MEMORY_LIMIT_GB:g} GB per measurement"
    )
    print(
        f"{'loss':7} {'batch':>7} | {'OpenCLIP MB':>11} {'s':>7} | {'ours MB':>9} {'s':>7} | "
        f"{'memory ratio':>12} {'time ratio':>10} | {'|Δloss|':>8}"
    )
    for kind in args.kinds:
        for batch in args.batches:
            theirs = (
                run_one("openclip", kind, batch, args.dim, args.tile)
                if batch <= args.openclip_max
                else {"error": "not run"}
            )
            ours = run_one("ours", kind, batch, args.dim, args.tile)

            def cell(result, key, width, fmt):
                return f"{format(result[key], fmt):>{width}}" if key in result else f"{result['error']:>{width}}"

            if "error" not in theirs and "error" not in ours:
                memory_ratio, time_ratio = ours["peak_mb"] / theirs["peak_mb"], ours["seconds"] / theirs["seconds"]
                ratios = f"{memory_ratio:>12.3f} {time_ratio:>10.2f} | {abs(ours['loss'] - theirs['loss']):>8.1e}"
            else:
                ratios = f"{'':>12} {'':>10} | {'':>8}"
            print(
                f"{kind:7} {batch:>7} | {cell(theirs, 'peak_mb', 11, '.0f')} {cell(theirs, 'seconds', 7, '.2f')} | "
                f"{cell(ours, 'peak_mb', 9, '.0f')} {cell(ours, 'seconds', 7, '.2f')} | {ratios}",
                flush=True,
            )


if __name__ == "__main__":
    main()
