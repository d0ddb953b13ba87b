"""``clipforge eval``: a checkpoint, an open_clip or transformers folder, or an architecture with weights, on a suite
or one dataset (``clipforge.evaluation``)."""

from __future__ import annotations

import argparse
from pathlib import Path

DENSE_OPTIONS = ("variant", "ignore_index", "reduce_zero_label")  # a dense set's, with --dataset
DATASET_OPTIONS = ("task", "classnames", "templates", "split", "format", "predictions", "top_k", *DENSE_OPTIONS)


def _eval_suite(args: argparse.Namespace):
    """The suite to run: --suite's file, or the one dataset of --dataset; contradictions are errors."""
    from clipforge.evaluation import load_suite
    from clipforge.evaluation.config import DENSE_TASKS
    from clipforge.evaluation.predictions import check_path
    from clipforge.evaluation.suite import single_dataset_suite

    if (args.suite is None) == (args.dataset is None):
        raise ValueError(
            "give exactly one of --suite FILE (a suite of datasets) and --dataset PATH (one dataset), "
            f"got {'both' if args.suite else 'neither'}"
        )
    if args.suite is not None:
        given = [f"--{name.replace('_', '-')}" for name in DATASET_OPTIONS if getattr(args, name) is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: only with --dataset (a suite sets these per dataset: {args.suite})")
        return load_suite(args.suite, args.data_root)
    if args.data_root is not None:
        raise ValueError("--data-root means {data_root} in suite paths; with --dataset give the dataset's own path")
    if args.predictions is not None:
        check_path(args.predictions)
    if args.top_k is not None and (args.predictions is None or args.top_k < 1):
        raise ValueError(f"--top-k {args.top_k}: goes with --predictions and must be at least 1")
    dense = {key: getattr(args, key) for key in DENSE_OPTIONS}
    suite = single_dataset_suite(
        args.dataset, args.task, args.classnames, args.templates, args.split or "test", args.format, **dense
    )
    if args.predictions is not None and suite.datasets[0].task in DENSE_TASKS:
        raise ValueError(
            f"--predictions: per-image predictions are written for classification and retrieval sets; "
            f"{args.dataset} is scored by {', '.join(entry.task for entry in suite.datasets)}"
        )
    return suite


def _eval(args: argparse.Namespace) -> int:
    import torch

    from clipforge.evaluation import load_eval_model, run_suite, write_report
    from clipforge.evaluation.loading import model_kind
    from clipforge.evaluation.predictions import check_destination, write_predictions
    from clipforge.evaluation.report import adhoc_results_dir, health_table, markdown_table

    # Cheap checks first: a wrong model path, a bad suite, templates, class names, missing data or an unwritable
    # destination fail before the model is built.
    kind = model_kind(args.checkpoint, args.model, args.weights)
    suite = _eval_suite(args)
    if args.embedding_plots and args.no_plots:
        raise ValueError("--embedding-plots and --no-plots contradict each other")
    if args.out:
        out = Path(args.out)
    else:  # never the run's own eval/ folder, whose step_N.json files are training's results and the card's source
        out = adhoc_results_dir(args.checkpoint) if kind == "clipforge" else Path("eval_results")
    check_destination(out, "--out", folder=True)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    loaded = load_eval_model(args.checkpoint, args.model, args.weights, device, args.amp)
    predictions = {} if args.predictions else None
    examples = None if args.no_plots else {}
    results = run_suite(
        loaded.encoder,
        loaded.tokenizer,
        loaded.transform,
        suite,
        args.batch_size,
        args.workers,
        progress=not args.quiet,
        diagnostics=args.embedding_plots,
        predictions=predictions,
        top_k=args.top_k or 5,
        examples=examples,
    )
    stem = f"{suite.name}_{loaded.name}"
    replaced = " (replaced the one there)" if (out / f"{stem}.json").exists() else ""
    written = write_report(results, out, stem, plots=not args.no_plots, examples=examples)
    health = health_table(results)
    print(markdown_table(results) + (f"\n\n{health}" if health else ""))
    print(f"\nresults: {written[0]}{replaced}" + (f" (+ {len(written) - 2} plots)" if len(written) > 2 else ""))
    if predictions is not None:
        (rows,) = predictions.values()
        replaced = " (replaced the file there)" if Path(args.predictions).exists() else ""
        print(f"predictions: {write_predictions(rows, args.predictions)} ({len(rows):,} rows){replaced}")
    return 0


def add_parser(commands: argparse._SubParsersAction) -> None:
    # torch-free: the parser imports no evaluator
    from clipforge.evaluation.config import FORMATS, TASKS

    evaluate = commands.add_parser(
        "eval",
        help="zero-shot classification, retrieval, linear probes, segmentation and referring expressions of a model "
        "on a benchmark suite or one dataset",
        description="Evaluate a clipforge checkpoint, an open_clip folder, a transformers CLIP folder, or an open_clip "
        "architecture with a local weights file (--model, --weights) on the datasets of a suite "
        "(--suite eval/*.yaml) or on one dataset (--dataset PATH: a CLIP_benchmark WebDataset directory, an image "
        "folder, a saved HF dataset, a segmentation set or a referring-expression set). Writes SUITE_MODEL.json "
        "(every metric), SUITE_MODEL.md (the table) and PNG plots (SUITE is the dataset's folder name with "
        "--dataset); --predictions adds per-image predictions.",
    )
    evaluate.add_argument(
        "checkpoint",
        nargs="?",
        help="clipforge checkpoint directory (e.g. runs/demo/checkpoints/latest), open_clip folder "
        "(open_clip_config.json + weights) or transformers CLIP folder",
    )
    evaluate.add_argument(
        "--suite", help="suite YAML listing the datasets, e.g. eval/synthetic.yaml (or --dataset; one is required)"
    )
    evaluate.add_argument(
        "--dataset",
        metavar="PATH",
        help="evaluate this one dataset without a suite: a CLIP_benchmark WebDataset directory, an image folder "
        "(PATH/test/CLASS/*.jpg or PATH/CLASS/*.jpg), a saved HF dataset, a segmentation set (PATH/images/test/, "
        "PATH/annotations/test/, PATH/classnames.txt) or a referring-expression set (PATH/refs_test.json), "
        "detected from its files",
    )
    evaluate.add_argument(
        "--task",
        choices=TASKS,
        help="with --dataset (default: zeroshot_classification when --classnames is given or the dataset holds "
        "class labels, else zeroshot_retrieval; a segmentation set: zeroshot_segmentation, and "
        "segmentation_probe when it has a train split; a referring set: referring_expressions); linear_probe "
        "and segmentation_probe train on the train split",
    )
    evaluate.add_argument(
        "--classnames",
        metavar="FILE",
        help="with --dataset: class names, one per line in label order (or a .json list), or openai_imagenet "
        "(default: the dataset's classnames.txt, label names or class folders)",
    )
    evaluate.add_argument(
        "--templates",
        metavar="FILE",
        help="with --dataset: prompt templates, one per line (or a .json list), each with {c} or {} where the class "
        "name goes, or openai_imagenet (default: the dataset's zeroshot_classification_templates.txt)",
    )
    evaluate.add_argument("--split", help="with --dataset: the split to score (test)")
    evaluate.add_argument("--format", choices=FORMATS, help="with --dataset: its layout (detected from its files)")
    evaluate.add_argument(
        "--predictions",
        metavar="FILE",
        help="with --dataset: write per-image predictions to FILE, .csv or .jsonl: top-k labels and scores per "
        "image, or top-k ids per retrieval query (see docs/evaluation.md)",
    )
    evaluate.add_argument("--top-k", type=int, help="labels or ids per row of the --predictions file (5)")
    _add_dense_options(evaluate)
    _add_eval_model_and_output_options(evaluate)
    evaluate.set_defaults(func=_eval)


def _add_dense_options(evaluate: argparse.ArgumentParser) -> None:
    """The options of a dense --dataset (a segmentation or referring-expression set)."""
    from clipforge.evaluation.config import DENSE_OPTIONS as DEFAULTS
    from clipforge.evaluation.config import DENSE_VARIANTS

    evaluate.add_argument(
        "--variant",
        choices=DENSE_VARIANTS,
        help="with a dense --dataset: how patches reach the text space for zero-shot segmentation and referring "
        f"expressions ({DEFAULTS['variant'][1]}: MaskCLIP's value embeddings; plain: the tower's own head on "
        "every patch)",
    )
    evaluate.add_argument(
        "--ignore-index",
        type=int,
        metavar="N",
        help=f"with a segmentation --dataset: the mask value no metric counts ({DEFAULTS['ignore_index'][1]})",
    )
    evaluate.add_argument(
        "--reduce-zero-label",
        action="store_const",
        const=True,
        help="with a segmentation --dataset: ADE20K's convention, mask value 0 is ignored and value v is class v-1",
    )


def _add_eval_model_and_output_options(evaluate: argparse.ArgumentParser) -> None:
    """How the model is given and run, and where the results go."""
    evaluate.add_argument(
        "--model",
        metavar="ARCH",
        help="open_clip architecture (e.g. ViT-B-32), configs/models stem or JSON config; needs --weights",
    )
    evaluate.add_argument(
        "--weights",
        metavar="FILE",
        help="local weights for --model: an open_clip file (.safetensors/.pt/.bin) or anything model.init_from takes",
    )
    evaluate.add_argument(
        "--data-root",
        metavar="DIR",
        help="what {data_root} in suite paths means (default: $CLIPFORGE_DATA_ROOT, else the suite's data_root)",
    )
    evaluate.add_argument(
        "--out",
        help="where to write the results (default: RUN_DIR/eval/adhoc for a checkpoint, apart from training's "
        "RUN_DIR/eval/step_N.json; else eval_results/)",
    )
    evaluate.add_argument("--batch-size", type=int, default=256, help="images per batch (256)")
    evaluate.add_argument("--workers", type=int, default=2, help="DataLoader workers decoding images (2)")
    evaluate.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    evaluate.add_argument("--amp", action="store_true", help="bf16 autocast for the towers (embeddings stay fp32)")
    evaluate.add_argument("--no-plots", action="store_true", help="write only the JSON and markdown")
    evaluate.add_argument(
        "--embedding-plots",
        action="store_true",
        help="also draw a t-SNE of image and class-text embeddings per classification set, and an "
        "image–caption similarity heatmap and positive/negative similarity histogram per "
        "retrieval set (t-SNE takes a few seconds per 1000 images)",
    )
    evaluate.add_argument("--quiet", action="store_true", help="no progress bars")
