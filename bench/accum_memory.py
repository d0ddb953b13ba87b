"""Peak memory of one training step with GradCache accumulation against one plain step, in one run.

    .venv/bin/python bench/accum_memory.py                 # demo model, batch 512, accum_steps 1 / 4 / 16

Each setting runs in a fresh subprocess (peak resident memory above the state after building the
model and the batch). With train.accum_steps = k the activations held at once are one micro-batch's,
so the peak should fall towards the model + optimizer + feature-cache floor as k grows, while the
loss still contrasts all 512 samples.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys


def _rss_mb() -> float:
    with open("/proc/self/statm") as stream:
        return int(stream.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(model_name: str, batch: int, accum_steps: int) -> dict:
    import torch

    from clipforge.losses import ClipLoss
    from clipforge.models import ModelConfig, build_model
    from clipforge.train.step import build_step

    torch.manual_seed(0)
    built = build_model(ModelConfig(name=model_name))
    model = built.model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    step = build_step(
        model,
        ClipLoss(),
        optimizer,
        scheduler,
        device="cpu",
        precision="fp32",
        grad_clip_norm=1.0,
        max_logit_scale=100.0,
        accum_steps=accum_steps,
    )
    size = built.model_cfg["vision_cfg"]["image_size"]
    data = {"images": torch.randn(batch, 3, size, size), "texts": built.tokenizer(["a red circle"] * batch)}
    baseline = _rss_mb()
    metrics = step(data)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"peak_mb": peak - baseline, "loss": metrics["loss"].item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-rn-64")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--accum", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), int(args.one[2]))))
        return
    print(f"one step of {args.model}, batch {args.batch}, CPU fp32: peak memory above model + batch")
    print(f"{'accum_steps':>11} {'micro-batch':>11} {'peak MB':>8} {'vs plain':>8} {'loss':>8}")
    plain = None
    for accum in args.accum:
        proc = subprocess.run(
            [sys.executable, __file__, "--one", args.model, str(args.batch), str(accum)],
            capture_output=True,
            text=True,
            check=True,
        )
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        plain = plain or result["peak_mb"]
        print(
            f"{accum:>11} {args.batch // accum:>11} {result['peak_mb']:>8.0f} {result['peak_mb'] / plain:>8.2f} "
            f"{result['loss']:>8.4f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
