"""The tables of docs/scaling.md: ``clipforge plan`` for four recipes at a 32k global batch on 8 to 1,024 H100s, and
the contrastive loss's memory from a 32k to a 1M global batch.

    PYTHONPATH=src .venv/bin/python bench/plan_tables.py --json /tmp/plan_tables.json     # every table, markdown
    PYTHONPATH=src .venv/bin/python bench/plan_tables.py --recipes "ViT-B/32" --gpus 8 64

Every figure is a plan (fake steps on this machine, clipforge.train.plan): no GPU is used, so the result does not
depend on the machine or its load, only on the code and torch. The assumptions are the plan's defaults (40% MFU of
the H100's dense bf16 peak, its memory less 2 GiB and 10% slack, 360 GB/s within a node and 45 GB/s across). A
step's time is its compute at that MFU or its parameter traffic, whichever is longer (DDP's bucketed all-reduce and
FSDP's prefetched gathers overlap the compute), plus the loss's embedding exchange (which sits between the forward
and the backward); a batch that does not fit is planned with GradCache micro-batches that do (one more forward),
unless its loss terms read or run the towers (LocCa, self-distillation), which GradCache cannot cache.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

RECIPES = {
    "ViT-B/32": ("configs/vit-b-32.yaml", []),
    "ViT-B/16": ("configs/vit-b-16.yaml", []),
    "ViT-L/14": ("configs/vit-l-14.yaml", []),
    "SigLIP 2 B/16": ("configs/siglip2-vit-b-16.yaml", []),
}
GLOBAL_BATCH = 32_768
LOSSES = {
    "CLIP, logits materialised (loss.tile_size: 0)": ("configs/vit-b-16.yaml", []),
    "CLIP, tiled (loss.tile_size: 4096)": ("configs/vit-b-16.yaml", ["loss.tile_size=4096"]),
    "SigLIP, all-gather": ("configs/siglip-vit-b-16.yaml", ["loss.siglip_exchange=all_gather"]),
    "SigLIP, ring": ("configs/siglip-vit-b-16.yaml", []),
    "SigLIP, ring, tiled (loss.tile_size: 4096)": ("configs/siglip-vit-b-16.yaml", ["loss.tile_size=4096"]),
}
LOSS_GLOBAL_BATCHES = (32_768, 65_536, 131_072, 262_144, 524_288, 1_048_576)


def recipe_rows(recipes: list[str], gpu_counts: list[int], gpu: str) -> list[dict]:
    from clipforge.train.config import load_config
    from clipforge.train.plan import plan_json, plan_run

    rows = []
    for recipe in recipes:
        path, overrides = RECIPES[recipe]
        for gpus in gpu_counts:
            for strategy in ("ddp", "fsdp"):
                cfg = load_config(
                    path,
                    [
                        *overrides,
                        f"data.batch_size={GLOBAL_BATCH // gpus}",
                        f"parallel.strategy={strategy}",
                        "model.grad_checkpointing=false",
                    ],
                )
                plan = plan_run(cfg, gpus, gpu, config_name=path)
                row = {"recipe": recipe, **plan_json(plan), "plan": plan}
                rows.append(row)
                print(f"{recipe} {gpus} {strategy}: planned in {plan.seconds:.0f} s", file=sys.stderr, flush=True)
    return rows


def loss_rows(gpus: int) -> list[dict]:
    """The objectives alone (``FakeRun.loss_step``) on ``gpus`` ranks: the memory they add at their peak, and the
    bytes each GPU sends, at each global batch."""
    from clipforge.train.config import load_config
    from clipforge.train.memory import FakeRun

    rows = []
    for name, (path, overrides) in LOSSES.items():
        cfg = load_config(path, [*overrides, f"data.batch_size={LOSS_GLOBAL_BATCHES[0] // gpus}"])
        with FakeRun(cfg, gpus) as run:
            for global_batch in LOSS_GLOBAL_BATCHES:
                started = time.perf_counter()
                loss = run.loss_step(global_batch // gpus)
                sent = sum(collective.sent for collective in loss.collectives)
                rows.append({"loss": name, "gpus": gpus, "global_batch": global_batch, "peak": loss.peak, "sent": sent})
                print(f"{name} {global_batch}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return rows


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:,.1f}" if nbytes >= 2**30 / 10 else f"{nbytes / 2**30:,.2f}"


def _duration(seconds: float) -> str:
    return f"{seconds * 1e3:,.0f} ms" if seconds < 10 else f"{seconds:,.0f} s"


def recipe_table(rows: list[dict], recipe: str) -> str:
    lines = [
        "| GPUs | strategy | batch per GPU | memory per GPU, no ckpt / ckpt (GiB) | largest batch per GPU, no ckpt / "
        "ckpt | sent per GPU per step (GiB) | its time | step, no ckpt / ckpt | samples/s, no ckpt / ckpt |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if row["recipe"] != recipe:
            continue
        plan = row["plan"]
        memory, largest, step, throughput = [], [], [], []
        for mode in (False, True):
            peak = plan.peaks.get(mode)
            fits = peak is not None and peak <= plan.budget
            memory.append("n/a" if peak is None else _gib(peak) + ("" if fits else " ✗"))
            best = plan.largest_batch.get(mode)
            largest.append("n/a" if best is None else f"{best:,}")
            work = plan.flops_per_sample + (plan.forward_flops_per_sample if mode else 0.0)
            accum = 1 if fits or not best else math.ceil(plan.local_batch / best)
            if accum > 1 and not plan.gradcache:  # terms that read or run the towers cannot be cached
                step.append("✗ (no GradCache with its terms)")
                throughput.append("—")
                continue
            if accum > 1:  # GradCache: every micro-batch's forward again, to rebuild its graph
                work += plan.forward_flops_per_sample
            seconds = plan.local_batch * work / (plan.mfu * plan.peak_tflops * 1e12)
            # DDP's bucketed all-reduce and FSDP's prefetched gathers overlap the compute; the loss's exchange sits
            # between the forward and the backward, and adds to it
            exchange = sum(t.seconds for t in plan.transfers if t.name.startswith("loss"))
            seconds = max(seconds, plan.communication_seconds - exchange) + exchange
            step.append(_duration(seconds) + (f" (accum {accum})" if accum > 1 else ""))
            throughput.append(f"{plan.global_batch / seconds:,.0f}")
        lines.append(
            f"| {plan.gpus:,} | {plan.strategy.upper()} | {plan.local_batch:,} | {' / '.join(memory)} | "
            f"{' / '.join(largest)} | {_gib(sum(t.sent for t in plan.transfers))} | "
            f"{_duration(plan.communication_seconds)} | {' / '.join(step)} | {' / '.join(throughput)} |"
        )
    return "\n".join(lines)


def loss_table(rows: list[dict]) -> str:
    batches = sorted({row["global_batch"] for row in rows})
    header = " | ".join(f"{batch // 1024:,}k" for batch in batches)
    lines = [f"| loss | {header} |", "|---|" + "---:|" * len(batches)]
    for name in dict.fromkeys(row["loss"] for row in rows):
        cells = []
        for batch in batches:
            (row,) = [r for r in rows if r["loss"] == name and r["global_batch"] == batch]
            cells.append(f"{_gib(row['peak'])} GiB, {_gib(row['sent'])} GiB sent")
        lines.append(f"| {name} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipes", nargs="*", default=list(RECIPES))
    parser.add_argument("--gpus", nargs="+", type=int, default=[8, 64, 256, 1024])
    parser.add_argument("--gpu", default="h100")
    parser.add_argument("--loss-gpus", nargs="*", type=int, default=[64, 1024], help="ranks of the loss tables")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    started = time.perf_counter()
    rows = recipe_rows(args.recipes, args.gpus, args.gpu)
    losses = [row for gpus in args.loss_gpus for row in loss_rows(gpus)]
    for recipe in args.recipes:
        print(f"\n### {recipe}\n\n{recipe_table(rows, recipe)}")
    for gpus in args.loss_gpus:
        table = loss_table([row for row in losses if row["gpus"] == gpus])
        print(f"\n### The loss from 32k to 1M on {gpus:,} GPUs\n\n{table}")
    print(f"\n(planned in {time.perf_counter() - started:,.0f} s)")
    if args.json:
        plain = [{key: value for key, value in row.items() if key != "plan"} for row in rows]
        Path(args.json).write_text(json.dumps({"recipes": plain, "losses": losses}, indent=2, default=str))


if __name__ == "__main__":
    sys.exit(main())
