"""``clipforge wise-ft``: the initial and fine-tuned weights interpolated over a sweep of α, each α evaluated on a
target and a retention suite, α picked by a stated rule, and that model written as a checkpoint
(``clipforge.evaluation.wise_ft``)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

DEFAULT_ALPHAS = "0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1"


def _alphas(text: str) -> list[float]:
    try:
        return [float(value) for value in text.split(",") if value.strip()]
    except ValueError:
        raise ValueError(f"--alphas {text!r}: comma-separated numbers in [0, 1], e.g. {DEFAULT_ALPHAS}") from None


def _wise_ft(args: argparse.Namespace) -> int:
    import torch

    from clipforge.evaluation import load_suite
    from clipforge.evaluation.wise_ft import (
        DEFAULT_METRIC,
        RULE,
        check_alphas,
        choose_alpha,
        endpoints,
        interpolate,
        sweep,
        write_report,
    )
    from clipforge.model_loading import read_checkpoint_config

    # cheap checks first: the α values, both suites and their data, the fine-tuned checkpoint's config
    alphas = check_alphas(_alphas(args.alphas))
    target, retention = load_suite(args.target, args.data_root), load_suite(args.retention, args.data_root)
    _, run_config = read_checkpoint_config(args.finetuned)
    out = Path(args.out)
    destination = out / "checkpoint"
    if destination.exists() and not (destination / "manifest.json").is_file():
        raise FileExistsError(f"{destination} exists and is not a checkpoint; give another --out")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    initial, finetuned, built = endpoints(args.initial, args.finetuned, device)
    options = dict(device=device, batch_size=args.batch_size, workers=args.workers, amp=args.amp)
    metrics = dict(target_metric=args.target_metric, retention_metric=args.retention_metric)
    rows = sweep(built, initial, finetuned, alphas, target, retention, **metrics, **options)
    chosen = choose_alpha(rows, args.max_retention_drop)
    settings = {
        "initial": args.initial,
        "finetuned": args.finetuned,
        "target_suite": args.target,
        "retention_suite": args.retention,
        "target_metric": args.target_metric or DEFAULT_METRIC,
        "retention_metric": args.retention_metric or DEFAULT_METRIC,
        "max_retention_drop": args.max_retention_drop,
        "checkpoint": str(destination),
    }
    json_path, png_path = write_report(rows, chosen, out, settings)
    built.model.load_state_dict(interpolate(initial, finetuned, chosen), strict=True)
    run_config["wise_ft"] = {"initial": args.initial, "finetuned": args.finetuned, "alpha": chosen, "rule": RULE}
    step = json.loads((Path(args.finetuned) / "manifest.json").read_text()).get("step", 0)
    write_checkpoint(built.model.cpu(), run_config, int(step), destination)
    print("| alpha | target | retention |\n|---|---|---|")
    for row in rows:
        mark = " ← chosen" if row["alpha"] == chosen else ""
        print(f"| {row['alpha']:g} | {row['target_score']:.1%} | {row['retention_score']:.1%}{mark} |")
    print(f"\nchosen alpha {chosen:g}: {RULE} (max_retention_drop {args.max_retention_drop:g})")
    print(f"results: {json_path}, {png_path}\ncheckpoint: {destination} (clipforge export and clipforge eval take it)")
    return 0


def write_checkpoint(model, run_config: dict, step: int, destination: Path) -> Path:
    """``model`` as a checkpoint directory of the trainer's layout holding the model alone (DCP files, an empty
    state.pt, config.yaml, manifest.json), written by the trainer's ``Checkpointer`` into a staging folder and
    renamed into place. ``clipforge eval``, ``clipforge export`` and ``model.init_from`` read it; ``checkpoint.resume``
    refuses it (it holds no optimizer, schedule or data position)."""
    import yaml

    from clipforge.train.checkpoint import Checkpointer
    from clipforge.train.state import SHARDED, ModelState, Piece

    staging = destination.parent / f".{destination.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    config_yaml = yaml.safe_dump(run_config, sort_keys=False)
    written = Checkpointer(staging, keep_last=1).save(step, {"model": Piece(SHARDED, ModelState(model))}, config_yaml)
    if destination.exists():  # a checkpoint an earlier wise-ft wrote here (checked before the sweep)
        shutil.rmtree(destination)
    os.replace(written, destination)
    shutil.rmtree(staging)
    return destination


def add_parser(commands: argparse._SubParsersAction) -> None:
    # torch-free: the parser imports nothing of the evaluators
    wise_ft = commands.add_parser(
        "wise-ft",
        help="interpolate an initial and a fine-tuned model (WiSE-FT), pick alpha on a target and a retention suite",
        description="WiSE-FT: evaluate theta = (1 - alpha)*theta0 + alpha*theta1 (fp32, buffers too; integer buffers "
        "from the fine-tuned model; alpha 0 and 1 are the endpoints bit for bit) for each alpha on a target suite "
        "and a retention suite. Picks alpha by the rule: the best target score among the alphas whose retention "
        "score is at most --max-retention-drop points below alpha=0's (a tie goes to the smaller alpha). Writes "
        "OUT/wise_ft.json (per alpha: both suites' headline metrics and scores; the rule and the chosen alpha), "
        "OUT/wise_ft.png (both curves, the chosen alpha marked) and OUT/checkpoint, the chosen model as a "
        "checkpoint that clipforge export and clipforge eval take (it resumes no training run).",
    )
    wise_ft.add_argument(
        "initial",
        help="the model fine-tuning started from: a clipforge checkpoint, an open_clip folder or weights file, or a "
        "transformers CLIP folder (model.init_from's sources); same architecture as FINETUNED",
    )
    wise_ft.add_argument("finetuned", help="the fine-tuned clipforge checkpoint (a LoRA run's is merged)")
    wise_ft.add_argument("--target", required=True, metavar="SUITE", help="suite YAML of the task fine-tuned for")
    wise_ft.add_argument(
        "--retention", required=True, metavar="SUITE", help="suite YAML of what the initial model should keep"
    )
    wise_ft.add_argument(
        "--alphas", default=DEFAULT_ALPHAS, help=f"comma-separated alphas in [0, 1], 0 among them ({DEFAULT_ALPHAS})"
    )
    wise_ft.add_argument(
        "--max-retention-drop",
        type=float,
        default=1.0,
        metavar="POINTS",
        help="most retention score (percentage points) the chosen alpha may lose against alpha=0 (1.0)",
    )
    for suite in ("target", "retention"):
        wise_ft.add_argument(
            f"--{suite}-metric",
            metavar="KEY",
            help=f"the {suite} score: one headline key, dataset/metric (e.g. shapes/acc1); default: the mean over "
            "the suite's datasets of each one's first headline metric (top-1 accuracy, image-retrieval R@1, mIoU, "
            "referring accuracy)",
        )
    wise_ft.add_argument("--out", required=True, metavar="DIR", help="where wise_ft.json, .png and checkpoint/ go")
    wise_ft.add_argument(
        "--data-root", metavar="DIR", help="what {data_root} in suite paths means (as clipforge eval's)"
    )
    wise_ft.add_argument("--batch-size", type=int, default=256, help="images per batch (256)")
    wise_ft.add_argument("--workers", type=int, default=2, help="DataLoader workers decoding images (2)")
    wise_ft.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    wise_ft.add_argument("--amp", action="store_true", help="bf16 autocast for the towers (embeddings stay fp32)")
    wise_ft.set_defaults(func=_wise_ft)
