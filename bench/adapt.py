"""Adaptation in miniature: the demo model, pretrained on the synthetic scenes, adapted to handwritten digits.

    python bench/adapt.py                 (3 seeds; about 15 minutes on 2 free cores once the pretrained model exists)
    python bench/adapt.py --quick         (1 seed, a short pretraining on a small synthetic set, few steps: a smoke run)

1. The pretrained model: the demo's (``runs/demo/checkpoints/latest`` with ``data/synth``, when both are there),
   else configs/demo.yaml's model and settings trained on ``clipforge prep synthetic`` data under WORK, once: it is
   kept in WORK/pretrain-STEPS and reused by later runs.
2. The target: scikit-learn's 1,797 handwritten digits (8 × 8, ``sklearn.datasets.load_digits``) upscaled to the
   model's 64 px (bilinear, grey as RGB), split 75/25 stratified (seed 0) into an image folder WORK/digits/{train,test}
   with ``classnames.txt`` (zero ... nine) and ``zeroshot_classification_templates.txt`` (``TEMPLATES``), which
   ``clipforge eval`` and ``clipforge prep labelled`` both read. Retention: the synthetic shapes and colours sets the
   demo evaluates (mean of the two top-1s, as ``clipforge wise-ft`` scores a suite).
3. Per seed, each from the pretrained model, ``clipforge train`` with a config this script writes:
   - full fine-tuning: every weight, the contrastive loss on ONE fixed prompt per class ("a photo of the digit
     {c}.", ``prep labelled --templates``) with ``loss.positives: caption``, so the images of a class in a batch
     are all positives of its one prompt and never negatives: supervised contrastive over the classes. clipforge has
     no cross-entropy objective on a zero-shot-initialised head (the WiSE-FT paper's fine-tuning); this is its
     contrastive counterpart;
   - LoRA: the same objective, data and steps, with LoRA adapters (rank 8, q k v out and mlp) on the text tower
     and the image tower locked, BatchNorm statistics included (``model.lock_image``,
     ``lock_image_freeze_bn_stats``): the demo's CLIP-ResNet image tower has no transformer blocks for LoRA;
   - FLYP: every weight, the same steps, the captions all of ``TEMPLATES`` filled with the class
     (``prep labelled``), one drawn per sample and epoch (``data.caption_key: txt:lines``), ``loss.positives:
     caption`` (identical prompts in a batch are positives, not negatives);
   - full + WiSE-FT: ``clipforge wise-ft`` of the pretrained and the fully fine-tuned model over ``ALPHAS``, alpha
     chosen by its rule (the best target score within 1 point of the pretrained model's retention). Its α = 0 row
     is the zero-shot row, its α = 1 row the full fine-tuning row.
   LoRA and FLYP are scored by ``clipforge eval`` on the digits test split and the retention sets, with the same
   class names and templates (every template of the set, averaged as CLIP does).
4. Columns: digits test top-1, retention top-1, trainable parameters (``clipforge train --dry-run``'s count), wall
   time of the fine-tuning run (``clipforge train`` end to end, its start-up included; WiSE-FT adds its sweep).
   Median over the seeds. Then the WiSE-FT sweep per α, and the interpolated models at a few α evaluated with the
   pretrained model's BatchNorm running statistics instead of the interpolated ones (``batchnorm_check``: the demo's
   CLIP-ResNet has BatchNorm, which a transformer has not). Prints the tables and writes them to WORK/adapt.md, the
   per-seed numbers to WORK/adapt.json.

A step whose output exists is skipped (its recorded time kept), so an interrupted bench resumes.
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

ROOT = Path(__file__).resolve().parent.parent
MODEL = "tiny-rn-64"
IMAGE_SIZE = 64
CLASSNAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = (
    "a photo of the digit {c}.",
    "a handwritten {c}.",
    "the number {c}.",
    "a blurry photo of a {c}.",
    "a drawing of the digit {c}.",
    "a white {c} on black.",
    "an upscaled picture of a {c}.",
    "the handwritten digit {c}.",
)
ALPHAS = "0,0.2,0.4,0.6,0.8,0.9,0.95,1"
BN_ALPHAS = (0.5, 0.9, 1.0)


def clipforge(*arguments: str, log: Path) -> float:
    """Run ``python -m clipforge ARGUMENTS`` from the repository root, output to ``log``; returns its wall time."""
    command = [sys.executable, "-m", "clipforge", *arguments]
    print("$", " ".join(command[2:]), flush=True)
    started = time.perf_counter()
    with open(log, "w") as stream:
        result = subprocess.run(command, cwd=ROOT, stdout=stream, stderr=subprocess.STDOUT)
    if result.returncode:
        raise SystemExit(f"failed ({result.returncode}): {' '.join(command[2:])}; see {log}")
    return time.perf_counter() - started


def write_digits(folder: Path, size: int = IMAGE_SIZE) -> Path:
    """scikit-learn's digits as an image folder with train/test splits, class names and templates (see the module
    docstring); written once."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    done = folder / "done.json"
    if done.is_file():
        return folder
    digits = load_digits()
    indices = np.arange(len(digits.target))
    train, test = train_test_split(indices, test_size=0.25, random_state=0, stratify=digits.target)
    for split, chosen in (("train", train), ("test", test)):
        for index in sorted(chosen):
            label = int(digits.target[index])
            pixels = (digits.images[index] * (255 / 16)).round().astype(np.uint8)  # 0..16 ink → 0..255
            image = Image.fromarray(pixels, mode="L").resize((size, size), Image.Resampling.BILINEAR)
            path = folder / split / str(label) / f"{index:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            image.convert("RGB").save(path)
    (folder / "classnames.txt").write_text("\n".join(CLASSNAMES) + "\n")
    (folder / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    done.write_text(json.dumps({"train": len(train), "test": len(test), "size": size}) + "\n")
    return folder


def urls_of(directory: Path) -> str:
    shards = sorted(path.stem for path in directory.glob("*.tar"))
    return str(directory / f"{{{shards[0]}..{shards[-1]}}}.tar")


def write_yaml(path: Path, config: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def pretrained(work: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """(the pretrained checkpoint, the synthetic set whose eval/{shapes,colors} measure retention)."""
    demo, synth = ROOT / "runs" / "demo" / "checkpoints" / "latest", ROOT / "data" / "synth"
    if not args.quick and (demo / "manifest.json").is_file() and (synth / "eval" / "colors").is_dir():
        print(f"pretrained: the demo's {demo} (data {synth})", flush=True)
        args.pretrained_from = "the demo's checkpoint, configs/demo.yaml"
        return demo, synth
    synth = work / ("synth-quick" if args.quick else "synth")
    if not (synth / "train" / "sizes.json").is_file():
        sizes = ["--num-samples", "3000", "--num-eval-samples", "200"] if args.quick else []
        clipforge("prep", "synthetic", "--out", str(synth), *sizes, "--num-retrieval-samples", "50",
                  "--num-dense-samples", "0", "--quiet", "--overwrite", log=work / "synth.log")  # fmt: skip
    run = work / f"pretrain-{args.pretrain_steps}"
    checkpoint = run / "checkpoints" / "latest"
    if not (checkpoint / "manifest.json").is_file():
        config = {
            "data": {
                "train_urls": urls_of(synth / "train"),
                "batch_size": 128,
                "num_workers": 2,
                "shuffle_buffer": 2000,
            },
            "model": {"name": MODEL},
            "optim": {"lr": 2.0e-3, "weight_decay": 0.1, "warmup_steps": min(50, args.pretrain_steps // 5)},
            "train": {"output_dir": str(run), "steps": args.pretrain_steps, "precision": "fp32"},
            "checkpoint": {"every": args.pretrain_steps},
            "logging": {"log_every": 50, "progress_bar": False, "tensorboard": False},
        }
        seconds = clipforge("train", str(write_yaml(work / "pretrain.yaml", config)), log=work / "pretrain.log")
        (run / "bench_time.json").write_text(json.dumps({"seconds": seconds}) + "\n")
    seconds = json.loads((run / "bench_time.json").read_text())["seconds"]
    args.pretrained_from = f"{args.pretrain_steps} steps × batch 128, {seconds:.0f} s, run once and kept"
    print(f"pretrained: {checkpoint}", flush=True)
    return checkpoint, synth


def suites(work: Path, digits: Path, synth: Path) -> dict[str, Path]:
    entry = "  - {{name: {}, task: zeroshot_classification, path: {}}}\n"
    target = entry.format("digits", digits)
    retention = entry.format("shapes", synth / "eval" / "shapes") + entry.format("colors", synth / "eval" / "colors")
    made = {}
    for name, entries in (("target", target), ("retention", retention), ("all", target + retention)):
        made[name] = work / f"{name}.yaml"
        made[name].write_text(f"name: {name}\ndatasets:\n{entries}")
    return made


def method_configs(work: Path, initial: Path, shards: dict[str, Path], args: argparse.Namespace) -> dict[str, dict]:
    """The fine-tuning config of each method, without its seed and output folder."""

    def config(urls: Path, lr: float, caption_key: str = "txt", **model) -> dict:
        return {
            "data": {
                "train_urls": urls_of(urls),
                "caption_key": caption_key,
                "batch_size": 64,
                "num_workers": 2,
                "shuffle_buffer": 500,
            },
            "model": {"name": MODEL, "init_from": str(initial), **model},
            "loss": {"positives": "caption"},
            "optim": {"lr": lr, "weight_decay": 0.1, "warmup_steps": min(10, args.steps // 5)},
            "train": {"steps": args.steps, "precision": "fp32"},
            "checkpoint": {"every": args.steps},
            "logging": {"log_every": 10, "progress_bar": False, "tensorboard": False},
        }

    # the image tower locked with its BatchNorm statistics too (image_adapt: frozen would let them follow the digits)
    lora = {"lock_image": True, "lock_image_freeze_bn_stats": True, "text_adapt": "lora", "lora_rank": 8,
            "lora_alpha": 16, "lora_targets": ["q", "k", "v", "out", "mlp"]}  # fmt: skip
    return {
        "full": config(shards["one"], args.lr),
        "lora": config(shards["one"], args.lora_lr, **lora),
        "flyp": config(shards["all"], args.lr, "txt:lines"),
    }


def trainable_parameters(path: Path) -> int:
    """What ``clipforge train --dry-run`` counts as trainable for this config."""
    from clipforge.train.config import load_config
    from clipforge.train.preflight import dry_run

    return int(dry_run(load_config(str(path), []), check_inputs=False)["trainable_parameters"])


def fine_tune(work: Path, name: str, seed: int, config: dict) -> tuple[Path, float]:
    """(the fine-tuned checkpoint, the training's wall time)."""
    run = work / f"seed{seed}" / name
    timing = run / "bench_time.json"
    if not timing.is_file():
        run.mkdir(parents=True, exist_ok=True)
        config = {
            **config,
            "data": {**config["data"], "seed": seed},
            "train": {**config["train"], "seed": seed, "output_dir": str(run)},
        }
        path = write_yaml(work / f"seed{seed}" / f"{name}.yaml", config)
        timing.write_text(json.dumps({"seconds": clipforge("train", str(path), log=run.with_suffix(".log"))}) + "\n")
    return run / "checkpoints" / "latest", json.loads(timing.read_text())["seconds"]


def evaluate(checkpoint: Path, suite: Path, out: Path) -> dict:
    if not any(out.glob("*.json")):
        out.mkdir(parents=True, exist_ok=True)
        clipforge("eval", str(checkpoint), "--suite", str(suite), "--out", str(out), "--quiet", "--no-plots",
                  "--batch-size", "250", log=out.with_suffix(".log"))  # fmt: skip
    (results,) = out.glob("*.json")
    return json.loads(results.read_text())


def scores(results: dict) -> tuple[float, float]:
    """(target, retention) top-1 of one evaluation: digits, and the mean of shapes and colours."""
    return results["digits"]["acc1"], (results["shapes"]["acc1"] + results["colors"]["acc1"]) / 2


def batchnorm_check(work: Path, seed: int, initial: Path, finetuned: Path, suite: Path) -> dict:
    """Digits and retention top-1 of the interpolated models at ``BN_ALPHAS`` with the BatchNorm running statistics
    interpolated (what ``clipforge wise-ft`` does) and with the pretrained model's statistics kept: how much of the
    target gain and of the retention loss rides on the statistics rather than on the weights. In this process."""
    out = work / f"seed{seed}" / "batchnorm.json"
    if out.is_file():
        return json.loads(out.read_text())
    from clipforge.evaluation import load_eval_model, load_suite, run_suite
    from clipforge.evaluation.wise_ft import endpoints, interpolate

    theta0, theta1, _ = endpoints(str(initial), str(finetuned), "cpu")
    loaded = load_eval_model(str(initial), None, None, "cpu", False)
    rows = []
    for alpha in BN_ALPHAS:
        for statistics_from in ("interpolated", "pretrained"):
            weights = interpolate(theta0, theta1, alpha)
            if statistics_from == "pretrained":
                weights = {key: theta0[key] if "running_" in key or "num_batches" in key else value
                           for key, value in weights.items()}  # fmt: skip
            loaded.encoder.model.load_state_dict(weights, strict=True)
            results = run_suite(loaded.encoder, loaded.tokenizer, loaded.transform, load_suite(suite), 250, 2)
            rows.append({"alpha": alpha, "statistics": statistics_from, "scores": scores(results)})
    record = {"rows": rows}
    out.write_text(json.dumps(record, indent=1) + "\n")
    return record


def digits_spread(initial: Path, digits: Path) -> float:
    """The mean pairwise cosine of the pretrained model's image embeddings of the digits test split (1: every
    digit embedded alike, so no text can tell them apart)."""
    import torch

    from clipforge.evaluation import load_benchmark, load_eval_model

    loaded = load_eval_model(str(initial), None, None, "cpu", False)
    benchmark = load_benchmark(digits, split="test")
    images = torch.stack([loaded.transform(benchmark.image(index)) for index in range(len(benchmark))])
    embeddings = torch.nn.functional.normalize(loaded.encoder.encode_image(images).double(), dim=-1)
    return float((embeddings @ embeddings.T).mean())


def run_seed(work: Path, seed: int, initial: Path, configs: dict, made: dict, alphas: str) -> dict:
    rows = {}
    full, full_seconds = fine_tune(work, "full", seed, configs["full"])
    wise_out = work / f"seed{seed}" / "wise"
    timing = wise_out / "bench_time.json"
    if not timing.is_file():
        wise_out.mkdir(parents=True, exist_ok=True)
        seconds = clipforge("wise-ft", str(initial), str(full), "--target", str(made["target"]), "--retention",
                            str(made["retention"]), "--alphas", alphas, "--out", str(wise_out), "--batch-size",
                            "250", log=wise_out.with_suffix(".log"))  # fmt: skip
        timing.write_text(json.dumps({"seconds": seconds}) + "\n")
    sweep = json.loads((wise_out / "wise_ft.json").read_text())
    by_alpha = {row["alpha"]: row for row in sweep["alphas"]}
    chosen = by_alpha[sweep["chosen_alpha"]]

    def point(row: dict) -> tuple[float, float]:
        return row["target_score"], row["retention_score"]

    rows["zero-shot"] = (*point(by_alpha[0.0]), 0.0)
    rows["full"] = (*point(by_alpha[1.0]), full_seconds)
    for name in ("lora", "flyp"):
        checkpoint, seconds = fine_tune(work, name, seed, configs[name])
        rows[name] = (*scores(evaluate(checkpoint, made["all"], work / f"seed{seed}" / f"{name}-eval")), seconds)
    rows["wise"] = (*point(chosen), full_seconds + json.loads(timing.read_text())["seconds"])
    sweep_points = {row["alpha"]: point(row) for row in sweep["alphas"]}
    batchnorm = batchnorm_check(work, seed, initial, full, made["all"])
    return {"rows": rows, "alpha": sweep["chosen_alpha"], "sweep": sweep_points, "batchnorm": batchnorm["rows"]}


LABELS = {
    "zero-shot": "zero-shot (before adapting)",
    "full": "full fine-tuning (one prompt per class)",
    "lora": "LoRA (text tower; image tower locked)",
    "flyp": "FLYP (all templates, positives by caption)",
    "wise": "full + WiSE-FT at the chosen α",
}


def report(work: Path, args, per_seed: dict, params: dict, started: float) -> str:
    median = statistics.median
    machine = f"{platform.machine()} {os.cpu_count()}-core CPU"
    alphas = [per_seed[seed]["alpha"] for seed in args.seeds]
    lines = [
        f"bench/adapt.py{' --quick' if args.quick else ''}, {machine}, {time.strftime('%Y-%m-%d')}: {MODEL} "
        f"pretrained on the synthetic scenes ({args.pretrained_from}), fine-tuned {args.steps} steps × batch 64 "
        f"on 1,347 digits; seeds {', '.join(map(str, args.seeds))}, medians; chosen α per seed "
        f"{', '.join(f'{a:g}' for a in alphas)}; the bench took {time.time() - started:.0f} s",
        "",
        "| row | digits top-1 | retention top-1 (shapes, colours) | trainable parameters | time |",
        "|---|---:|---:|---:|---:|",
    ]
    summary = {}
    for name, label in LABELS.items():
        target, retention, seconds = (median(per_seed[s]["rows"][name][i] for s in args.seeds) for i in range(3))
        summary[name] = {"target": target, "retention": retention, "seconds": seconds}
        shown = f"{seconds:.0f} s" if seconds else "—"
        lines.append(f"| {label} | {target:.1%} | {retention:.1%} | {params.get(name, 0):,} | {shown} |")
    full, wise, zero = summary["full"], summary["wise"], summary["zero-shot"]
    near = wise["target"] >= full["target"] - 0.01
    kept = wise["retention"] >= zero["retention"] - 0.01
    lines += [
        "",
        f"Goal (WiSE-FT within 1 point of full fine-tuning on the target, at most 1 point of retention lost): "
        f"target {wise['target'] - full['target']:+.1%} against full fine-tuning ({'met' if near else 'not met'}), "
        f"retention {wise['retention'] - zero['retention']:+.1%} against the model before adapting "
        f"({'met' if kept else 'not met'}).",
    ]
    lines += [
        "",
        f"The pretrained model's image embeddings of the digits test images: mean pairwise cosine "
        f"{args.digits_spread:.5f}.",
        "",
        sweep_table(args, per_seed),
        "",
        batchnorm_table(args, per_seed),
    ]
    text = "\n".join(lines)
    (work / "adapt.md").write_text(text + "\n")
    record = {"machine": machine, "args": vars(args), "parameters": params, "median": summary, "seeds": per_seed}
    (work / "adapt.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    return text


def sweep_table(args, per_seed: dict) -> str:
    """The WiSE-FT sweep, medians over the seeds, per alpha."""
    alphas = list(per_seed[args.seeds[0]]["sweep"])
    lines = ["| WiSE-FT α | digits top-1 | retention top-1 |", "|---:|---:|---:|"]
    for alpha in alphas:
        target, retention = (statistics.median(per_seed[s]["sweep"][alpha][i] for s in args.seeds) for i in (0, 1))
        lines.append(f"| {alpha:g} | {target:.1%} | {retention:.1%} |")
    return "\n".join(lines)


def batchnorm_table(args, per_seed: dict) -> str:
    """``batchnorm_check``'s numbers, medians over the seeds."""
    lines = [
        "| WiSE-FT α | BatchNorm statistics | digits top-1 | retention top-1 |",
        "|---:|---|---:|---:|",
    ]
    for index, row in enumerate(per_seed[args.seeds[0]]["batchnorm"]):
        values = [per_seed[s]["batchnorm"][index]["scores"] for s in args.seeds]
        target, retention = (statistics.median(value[i] for value in values) for i in (0, 1))
        lines.append(f"| {row['alpha']:g} | {row['statistics']} | {target:.1%} | {retention:.1%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="runs/bench-adapt", help="working directory, kept for reuse and resume")
    parser.add_argument("--quick", action="store_true", help="1 seed, short pretraining and fine-tuning: a smoke run")
    parser.add_argument("--seeds", type=int, nargs="+", help="fine-tuning seeds (0 1 2; --quick: 0)")
    parser.add_argument("--pretrain-steps", type=int, help="steps of the pretraining, if it runs (1000; --quick 100)")
    parser.add_argument("--steps", type=int, help="fine-tuning steps of every method (150; --quick 15)")
    parser.add_argument("--lr", type=float, default=3e-4, help="learning rate of full fine-tuning and FLYP (3e-4)")
    parser.add_argument("--lora-lr", type=float, default=2e-3, help="learning rate of LoRA (2e-3)")
    args = parser.parse_args(argv)
    args.seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    args.pretrain_steps = args.pretrain_steps or (100 if args.quick else 1000)
    args.steps = args.steps or (15 if args.quick else 150)
    alphas = "0,0.5,1" if args.quick else ALPHAS
    work = (ROOT / args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    initial, synth = pretrained(work, args)
    digits = write_digits(work / "digits")
    shards = {}
    for name, templates in (("one", [TEMPLATES[0]]), ("all", TEMPLATES)):
        shards[name] = work / f"digits-shards-{name}"
        if not (shards[name] / "sizes.json").is_file():
            listed = work / f"templates-{name}.json"
            listed.write_text(json.dumps(list(templates)) + "\n")
            clipforge("prep", "labelled", str(digits), "--out", str(shards[name]), "--templates", str(listed),
                      "--quiet", "--overwrite", log=work / f"prep-{name}.log")  # fmt: skip
    made = suites(work, digits, synth)
    configs = method_configs(work, initial, shards, args)
    params = {name: trainable_parameters(write_yaml(work / f"{name}.yaml", config)) for name, config in configs.items()}
    params["wise"] = params["full"]
    per_seed = {seed: run_seed(work, seed, initial, configs, made, alphas) for seed in args.seeds}
    args.digits_spread = digits_spread(initial, digits)
    text = report(work, args, per_seed, params, started)
    print(text, flush=True)
    return text


if __name__ == "__main__":
    main()
