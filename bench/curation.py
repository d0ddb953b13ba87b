"""DataComp in miniature on the synthetic set: does curation pay, and does distillation?

    python bench/curation.py --out runs/bench-curation --teacher runs/demo/checkpoints/latest   (about 50 min, 2 cores)
    python bench/curation.py --out runs/bench-curation --steps 150 --seeds 0 --teacher runs/demo/checkpoints/latest

1. ``clipforge prep synthetic --noise 0.3``: the clean set's images with 30% of the captions swapped for another
   sample's (``train/noisy_keys.tsv`` lists them).
2. A teacher trained on the clean set (configs/demo.yaml, or ``--teacher CKPT``) scores the noisy set
   (``prep score``); ``prep filter --top-fraction F`` keeps the best F of it; the removed keys are compared with
   the swapped ones: precision and recall of removing mismatched pairs (also at other fractions, from the table).
3. The demo model is trained on the noisy and on the filtered (resharded) set, the same steps and seeds;
   held-out zero-shot shapes top-1 (half the shapes in unseen colours), median over seeds.
4. A smaller student (``STUDENT``) is trained on the clean set with and without distillation from the teacher's
   stored embeddings (``prep score`` of the clean set, ``data.teacher``, ``loss.distill_weight``), same steps.

Prints a markdown table of every figure and writes it, with the raw numbers, to OUT/results.{md,json}. Every
step is skipped when its output exists, so an interrupted bench resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
STUDENT = {  # a quarter of the demo ResNet's width, half its text tower
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "patch_size": None},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def clipforge(*arguments: str, log: Path | None = None) -> None:
    """Run ``python -m clipforge ARGUMENTS`` from the repository root; its output goes to ``log``."""
    command = [sys.executable, "-m", "clipforge", *arguments]
    print("$", " ".join(command[2:]), flush=True)
    with open(log, "w") if log else open(os.devnull, "w") as stream:
        result = subprocess.run(command, cwd=ROOT, stdout=stream, stderr=subprocess.STDOUT)
    if result.returncode:
        raise SystemExit(f"failed ({result.returncode}): {' '.join(command[2:])}; see {log}")


def shapes_top1(run_dir: Path) -> float:
    results = sorted((run_dir / "eval").glob("step_*.json"))
    if not results:
        raise SystemExit(f"{run_dir}: no eval results")
    return float(json.loads(results[-1].read_text())["shapes"]["acc1"])


def train(out: Path, name: str, steps: int, seed: int, urls: str, suite: Path, *extra: str) -> float:
    run_dir = out / "runs" / f"{name}-s{seed}"
    if not any((run_dir / "eval").glob("step_*.json")):
        arguments = [f"data.sources=[{{urls: '{urls}'}}]", f"train.steps={steps}", f"train.seed={seed}"]
        arguments += [f"data.seed={seed}", f"train.output_dir={run_dir}", f"checkpoint.every={steps}"]
        arguments += [f"eval.suite={suite}", "logging.progress_bar=false", "logging.tensorboard=false", *extra]
        overrides = [item for argument in arguments for item in ("--set", argument)]
        clipforge("train", "configs/demo.yaml", *overrides, log=out / "runs" / f"{name}-s{seed}.log")
    return shapes_top1(run_dir)


def urls_of(directory: Path) -> str:
    shards = sorted(path.name for path in directory.glob("*.tar"))
    return str(directory / f"{{{shards[0][:-4]}..{shards[-1][:-4]}}}.tar")


def removal_quality(table: pd.DataFrame, noisy: set[str], fraction: float) -> dict[str, float]:
    """Precision and recall of removing the noisy pairs when keeping the best ``fraction`` by CLIP score."""
    keep = max(1, round(fraction * len(table)))
    removed = set(table.sort_values("score", ascending=False, kind="stable")["key"].iloc[keep:])
    hits = len(removed & noisy)
    return {
        "keep_fraction": fraction,
        "removed": len(removed),
        "precision": hits / len(removed) if removed else 0.0,
        "recall": hits / len(noisy) if noisy else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench-curation", help="working directory (resumable)")
    parser.add_argument("--clean", default="data/synth", help="the clean synthetic set (written if absent)")
    parser.add_argument("--teacher", help="a checkpoint trained on the clean set (default: train configs/demo.yaml)")
    parser.add_argument("--noise", type=float, default=0.3, help="share of swapped captions (0.3)")
    parser.add_argument("--top-fraction", type=float, default=0.7, help="CLIP-score filter: keep this share (0.7)")
    parser.add_argument("--steps", type=int, default=700, help="training steps of every compared run (700)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of every compared run")
    parser.add_argument("--distill-weight", type=float, default=0.5, help="loss.distill_weight of the student (0.5)")
    parser.add_argument("--workers", type=int, default=2, help="processes for prep steps (2)")
    args = parser.parse_args()
    out = (ROOT / args.out).resolve()
    clean = (ROOT / args.clean).resolve()
    (out / "runs").mkdir(parents=True, exist_ok=True)
    started = time.time()
    workers = ["--workers", str(args.workers)]
    if not (clean / "train" / "sizes.json").is_file():
        clipforge("prep", "synthetic", "--out", str(clean), *workers, "--quiet", log=out / "clean.log")
    noisy = out / "noisy"
    if not (noisy / "train" / "noisy_keys.tsv").is_file():
        clipforge("prep", "synthetic", "--out", str(noisy), "--noise", str(args.noise), *workers, "--quiet")
    suite = out / "shapes.yaml"
    suite.write_text(
        f"name: shapes\ndatasets:\n  - name: shapes\n    task: zeroshot_classification\n"
        f"    path: {clean / 'eval' / 'shapes'}\n"
    )
    teacher = Path(args.teacher).resolve() if args.teacher else out / "teacher" / "checkpoints" / "latest"
    if not teacher.is_dir():
        overrides = ["--set", f"data.sources=[{{urls: '{urls_of(clean / 'train')}'}}]"]
        overrides += ["--set", f"train.output_dir={out / 'teacher'}", "--set", f"eval.suite={suite}"]
        clipforge("train", "configs/demo.yaml", *overrides, log=out / "teacher.log")

    # --- score and filter the noisy set
    scores = out / "noisy-scores"
    if not (scores / "scores.parquet").is_file():
        clipforge("prep", "score", str(noisy / "train"), "--model", str(teacher), "--out", str(scores), *workers)
    kept = out / "kept"
    clipforge("prep", "filter", str(scores), "--out", str(kept), "--top-fraction", str(args.top_fraction))
    filtered = out / "filtered"
    if not (filtered / "sizes.json").is_file():
        clipforge("prep", "reshard", str(noisy / "train"), "--kept", str(kept), "--out", str(filtered))
    table = pd.read_parquet(scores / "scores.parquet")
    swapped = set(pd.read_csv(noisy / "train" / "noisy_keys.tsv", sep="\t", dtype=str)["key"])
    quality = [removal_quality(table, swapped, f) for f in sorted({0.5, 0.6, args.top_fraction, 0.8, 0.9})]
    print(json.dumps(quality, indent=1), flush=True)

    # --- equal steps: noisy vs filtered
    noisy_top1 = [train(out, "noisy", args.steps, s, urls_of(noisy / "train"), suite) for s in args.seeds]
    filtered_top1 = [train(out, "filtered", args.steps, s, urls_of(filtered), suite) for s in args.seeds]

    # --- equal steps: a small student with and without distillation from the teacher's stored embeddings
    clean_scores = out / "clean-scores"
    if not (clean_scores / "scores.parquet").is_file():
        clipforge("prep", "score", str(clean / "train"), "--model", str(teacher), "--out", str(clean_scores), *workers)
    student = out / "student.json"
    student.write_text(json.dumps(STUDENT, indent=1))
    clean_urls = urls_of(clean / "train")
    plain = [train(out, "student", args.steps, s, clean_urls, suite, f"model.name={student}") for s in args.seeds]
    distil = ("loss.distill_weight=" + str(args.distill_weight), f"data.teacher={clean_scores}")
    distilled = [
        train(out, "student-distilled", args.steps, s, clean_urls, suite, f"model.name={student}", *distil)
        for s in args.seeds
    ]
    report(out, args, quality, noisy_top1, filtered_top1, plain, distilled, started)


def report(out, args, quality, noisy_top1, filtered_top1, plain, distilled, started) -> None:
    median = statistics.median
    machine = f"{platform.machine()} {os.cpu_count()}-core CPU"
    lines = [
        f"DataComp in miniature (bench/curation.py), {machine}, {time.strftime('%Y-%m-%d')}; "
        f"{args.steps} steps × batch 128, seeds {args.seeds}, noise {args.noise}, took {time.time() - started:.0f} s",
        "",
        "| CLIP-score filter keeps | removed | precision | recall |",
        "|---:|---:|---:|---:|",
        *(f"| {q['keep_fraction']:.0%} | {q['removed']} | {q['precision']:.1%} | {q['recall']:.1%} |" for q in quality),
        "",
        "| run (held-out shapes top-1) | per seed | median |",
        "|---|---|---:|",
    ]
    for name, values in (
        ("demo model, noisy set", noisy_top1),
        (f"demo model, filtered set (top {args.top_fraction:.0%})", filtered_top1),
        ("small student", plain),
        (f"small student + distillation (λ={args.distill_weight})", distilled),
    ):
        lines.append(f"| {name} | {', '.join(f'{v:.1%}' for v in values)} | {median(values):.1%} |")
    text = "\n".join(lines)
    print(text)
    (out / "results.md").write_text(text + "\n")
    (out / "results.json").write_text(
        json.dumps(
            {
                "machine": machine,
                "args": vars(args),
                "removal": quality,
                "noisy": noisy_top1,
                "filtered": filtered_top1,
                "student": plain,
                "student_distilled": distilled,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
