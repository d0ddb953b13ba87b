"""``clipforge export``: a checkpoint as a transformers, open_clip or single-tower folder with a model card, and the
Hub upload (``clipforge.export``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _export(args: argparse.Namespace) -> int:
    from huggingface_hub.errors import HfHubHTTPError

    from clipforge.export import CannotConvert, CardInfo, check_request, export_model, find_eval_results, push_to_hub
    from clipforge.export.card import eval_origin
    from clipforge.export.hub import HubUnavailable, check_repo_id
    from clipforge.model_loading import load_checkpoint_model, read_checkpoint_config

    formats = ["hf", "open_clip"] if args.format == "both" else [args.format]
    towers = {None: (), "both": ("text", "image")}.get(args.towers, (args.towers,))
    check_request(formats, towers)  # before the model is built
    if args.push:
        check_repo_id(args.push)
    checkpoint = Path(args.checkpoint)
    # before any work: a run directory is refused with the path of its latest checkpoint, a bad model section named
    _, run_config = read_checkpoint_config(checkpoint)
    if args.eval_results:  # read before the model is built, so that a wrong path fails at once
        found = (Path(args.eval_results), json.loads(Path(args.eval_results).read_text()))
    else:
        found = find_eval_results(checkpoint.resolve().parent.parent, checkpoint.resolve().name)
    built = load_checkpoint_model(checkpoint)
    resolved = checkpoint.resolve()  # RUN/checkpoints/step_N: the card is titled after the run, or the Hub repo
    run_name = resolved.parent.parent.name if resolved.parent.name == "checkpoints" else resolved.name
    eval_suite, eval_step = eval_origin(found[0], run_config) if found else (None, None)
    card = CardInfo(
        name=args.push or run_name,
        source=str(checkpoint),
        step=resolved.name,
        folder=None if args.push else args.out,
        run_config=run_config,  # as saved: yaml.safe_load resolves no ${...} interpolation
        eval_results=found[1] if found else None,
        eval_source=str(found[0]) if found else None,
        eval_suite=eval_suite,
        eval_step=eval_step,
        license=args.license,
        datasets=args.dataset,
    )
    try:
        summary = export_model(built, args.out, formats, card, towers)
    except FileExistsError as exc:
        raise ValueError(str(exc)) from exc
    except CannotConvert as exc:
        raise CannotConvert(f"{exc} (--format open_clip exports every architecture)") from exc
    alone = f"; encoders alone: {', '.join(towers)}" if towers else ""
    print(f"exported {checkpoint} ({', '.join(formats)}{alone}) to {args.out}")
    if args.push:
        try:
            summary["pushed"] = push_to_hub(
                args.out,
                args.push,
                private=args.private,
                revision=args.revision,
                commit_message=args.commit_message,
                force=args.force,
            )
        except (HubUnavailable, HfHubHTTPError, OSError) as exc:  # the export itself is written: only the push failed
            message = " ".join(str(exc).split())
            print(f"clipforge export: push to {args.push} failed: {message}", file=sys.stderr)
            return 1
        print(f"pushed: {summary['pushed']}")
    for note in summary["notes"]:
        print(f"note: {note}")
    return 0


def add_parser(commands: argparse._SubParsersAction) -> None:
    export = commands.add_parser(
        "export",
        help="write a checkpoint as a transformers and/or open_clip folder; optionally push it to the Hub",
        description="Write CHECKPOINT as a folder that transformers (CLIPModel/SiglipModel + processor, --format hf) "
        "or open_clip (open_clip_config.json + open_clip_model.safetensors, --format open_clip) loads "
        "as it is, with a model card (README.md) holding the run's latest `clipforge eval` results. "
        "An architecture transformers has no class for (e.g. the CLIP-ResNet image tower) is an error "
        "naming why; the open_clip format takes every architecture.",
    )
    export.add_argument("checkpoint", help="clipforge checkpoint directory, e.g. runs/demo/checkpoints/latest")
    export.add_argument(
        "--format",
        choices=("hf", "open_clip", "both"),
        default="hf",
        help="hf: transformers folder; open_clip: open_clip folder; both: one folder with both (hf)",
    )
    export.add_argument(
        "--towers",
        choices=("text", "image", "both"),
        help="write the transformers encoders alone, in place of the combined model: text -> text_encoder/ + "
        "tokenizer/ (CLIPTextModelWithProjection or SiglipTextModel), image -> image_encoder/ + feature_extractor/ "
        "(CLIPVisionModelWithProjection or SiglipVisionModel), both -> all four (default: the combined model)",
    )
    export.add_argument("--out", required=True, help="output folder (replaced if it holds an earlier export)")
    export.add_argument(
        "--push",
        metavar="ORG/NAME",
        help="upload the folder to this Hub model repo (token: HF_TOKEN or `hf auth login`)",
    )
    export.add_argument("--private", action="store_true", help="create the Hub repo private (a new repo only)")
    export.add_argument("--revision", help="branch to push to, created from main if missing (default: main)")
    export.add_argument("--commit-message", help="Hub commit message (default: 'clipforge export (OUT)')")
    export.add_argument(
        "--force", action="store_true", help="push even into a Hub repo that holds files not written by clipforge"
    )
    export.add_argument("--license", default="mit", help="license id in the model card metadata (mit)")
    export.add_argument(
        "--dataset",
        action="append",
        default=[],
        metavar="HUB_ID",
        help="Hub dataset id for the card metadata (repeatable; hf://datasets/... sources are added)",
    )
    export.add_argument(
        "--eval-results",
        metavar="JSON",
        help="`clipforge eval` results for the card (default: the training-time evaluation of this checkpoint, "
        "RUN_DIR/eval/step_N.json, if there is one)",
    )
    export.set_defaults(func=_export)
