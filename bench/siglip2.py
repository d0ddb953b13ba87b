"""A miniature of SigLIP 2's recipe: what each added objective does to a tiny ViT on grounded synthetic scenes.

    .venv/bin/python bench/siglip2.py                 # 3 seeds × 3 recipes, tiny-vit-64, batch 64, 300 steps
    .venv/bin/python bench/siglip2.py --quick         # 1 seed, 30 steps, small data: a smoke run of the harness

Three recipes, trained for the same steps on the same data, each seed from the same initial weights and the same
batches (``train.seed``):

* ``sigmoid``: the sigmoid loss alone (SigLIP);
* ``+ decoder``: plus LocCa's decoder at equal weight from the first step (captioning, referring expressions,
  grounded captions on the scenes' boxes);
* ``+ decoder + self-distillation + masked``: plus SILC's local-to-global self-distillation and TIPS's masked
  prediction from an EMA teacher, switched on for the last 20% of the steps (weights 1 and 0.25, as in the paper).

The data is ``clipforge prep synthetic --scenes 0.5``: half the training samples are scenes of 2-4 shapes with
their regions' boxes and captions. Each trained model is evaluated with ``clipforge eval --suite
eval/synthetic.yaml`` (run from ``--work``, where the suite's ``data/synth`` paths point at this bench's data):
zero-shot classification of shapes and colours, retrieval, the linear probe, zero-shot segmentation and the
per-patch segmentation probe (mIoU), referring expressions (accuracy). The table prints the median over seeds of
each metric, and each recipe's median steady-state step time (``perf/step_time_s`` after the first logging
windows) relative to sigmoid-only, at the same batch.

Everything runs as ``clipforge`` subprocesses with the configs this script writes under ``--work``; results
(``results.json``, ``table.md``) go there too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CLIPFORGE = [sys.executable, "-m", "clipforge"]

RECIPES = {
    "sigmoid": [],
    "+ decoder": [{"name": "locca", "weight": 1.0, "options": {"depth": 2, "width": 128, "heads": 4, "bins": 64}}],
    "+ decoder + self-distillation + masked": [
        {"name": "locca", "weight": 1.0, "options": {"depth": 2, "width": 128, "heads": 4, "bins": 64}},
        {
            "name": "self_distillation",
            "weight": 1.0,
            "start": 0.8,
            "options": {"masked_weight": 0.25, "local_crops": 4},
        },
    ],
}

COLUMNS = {
    "shapes top-1": "shapes/acc1",
    "colours top-1": "colors/acc1",
    "retrieval T→I R@1": "retrieval/image_retrieval_recall@1",
    "shapes probe": "shapes-probe/acc1",
    "zero-shot seg mIoU": "segmentation/miou",
    "seg probe mIoU": "segmentation-probe/miou",
    "referring acc": "referring/accuracy",
}


def run(argv: list[str], log: Path, cwd: Path = ROOT) -> None:
    with log.open("w") as out:
        done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)
    if done.returncode:
        tail = log.read_text().splitlines()[-15:]
        raise SystemExit(f"{' '.join(argv[2:5])} failed (rc {done.returncode}); {log}:\n" + "\n".join(tail))


def config(data: Path, out: Path, seed: int, steps: int, batch: int, terms: list[dict]) -> dict:
    return {
        "data": {
            "sources": [{"urls": f"{data}/train/{{00000..00019}}.tar"}],
            "batch_size": batch,
            "num_workers": 2,
            "shuffle_buffer": 2000,
        },
        "model": {"name": "tiny-vit-64", "init_logit_scale": 2.302585, "init_logit_bias": -10.0},
        "loss": {"kind": "siglip", "terms": terms},
        "optim": {"lr": 1.0e-3, "weight_decay": 1.0e-4, "beta2": 0.95, "warmup_steps": max(steps // 10, 1)},
        "train": {"output_dir": str(out), "steps": steps, "precision": "fp32", "seed": seed},
        "checkpoint": {"every": steps},
        "logging": {"log_every": max(steps // 10, 1)},
    }


def step_time(run_dir: Path) -> float:
    """The median of the logging windows' seconds per step, the first two (start-up, the shuffle buffer) left out."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    times = [row["perf/step_time_s"] for row in rows if "perf/step_time_s" in row]
    return statistics.median(times[2:] or times)


def evaluate(checkpoint: Path, work: Path, out: Path, log: Path) -> dict[str, float]:
    """The synthetic suite, whose paths (``data/synth/...``) start at the working directory: here ``work``."""
    suite = ROOT / "eval" / "synthetic.yaml"
    run(CLIPFORGE + ["eval", str(checkpoint), "--suite", str(suite), "--out", str(out), "--no-plots", "--quiet"],
        log, cwd=work)  # fmt: skip
    results = json.loads(next(out.glob("*.json")).read_text())
    flat = {}
    for name, metrics in results.items():
        for key, value in metrics.items():
            if isinstance(value, int | float):
                flat[f"{name}/{key}"] = float(value)
    return flat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--work", type=Path, default=Path("/tmp/clipforge-siglip2"))
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--quick", action="store_true", help="1 seed, 30 steps, small data")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.steps = args.seeds[:1], 30
    work = args.work.resolve()
    data = work / "data" / "synth"
    work.mkdir(parents=True, exist_ok=True)
    if not (data / "eval" / "referring").exists():
        samples = ["--num-samples", "4000", "--samples-per-shard", "200"] if args.quick else []
        run(CLIPFORGE + ["prep", "synthetic", "--out", str(data), "--scenes", "0.5", "--quiet", *samples],
            work / "prep.log")  # fmt: skip
    results_file = work / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    for seed in args.seeds:  # seed-major: every finished seed gives every recipe's row
        for recipe in args.recipes:
            tag = f"{recipe}|{seed}|{args.steps}|{args.batch_size}"
            if tag in results:
                continue
            name = f"{list(RECIPES).index(recipe)}-seed{seed}-{args.steps}"
            out = work / "runs" / name
            cfg = config(data, out, seed, args.steps, args.batch_size, RECIPES[recipe])
            config_file = work / f"{name}.yaml"
            config_file.write_text(yaml.safe_dump(cfg, sort_keys=False))
            started = time.perf_counter()
            if not (out / "checkpoints" / "latest").exists():
                run(CLIPFORGE + ["train", str(config_file)], work / f"{name}.train.log")
            seconds = time.perf_counter() - started
            metrics = evaluate(out / "checkpoints" / "latest", work, work / "eval" / name, work / f"{name}.eval.log")
            results[tag] = {**metrics, "step_time_s": step_time(out), "train_s": seconds}
            results_file.write_text(json.dumps(results, indent=1))
            print(f"{recipe}, seed {seed}: " + ", ".join(f"{k} {metrics.get(v, float('nan')):.3f}"
                                                       for k, v in COLUMNS.items()), flush=True)  # fmt: skip
    print(table(results, args), flush=True)


def table(results: dict, args) -> str:
    header = "| recipe | " + " | ".join(COLUMNS) + " | step time vs sigmoid |"
    lines = [
        f"# tiny-vit-64, batch {args.batch_size}, {args.steps} steps, seeds {args.seeds}, median; "
        f"{os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}",
        header,
        "|" + "---|" * (len(COLUMNS) + 2),
    ]
    base = None
    for recipe in args.recipes:
        rows = [results[f"{recipe}|{seed}|{args.steps}|{args.batch_size}"] for seed in args.seeds]
        medians = {key: statistics.median(row.get(key, float("nan")) for row in rows) for key in COLUMNS.values()}
        step = statistics.median(row["step_time_s"] for row in rows)
        base = base or step
        cells = " | ".join(f"{100 * medians[key]:.1f}" for key in COLUMNS.values())
        lines.append(f"| {recipe} | {cells} | {step / base:.2f}× ({step:.3f} s) |")
    text = "\n".join(lines)
    (args.work / "table.md").write_text(text + "\n")
    return text


if __name__ == "__main__":
    main()
