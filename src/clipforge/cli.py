"""``clipforge prep|train|eval``: thin wrappers, one entry function each.

    clipforge prep synthetic --out data/synth --num-samples 20000
    clipforge prep table captions.csv --out data/mine --image-column filepath --caption-column title
    clipforge prep hf path/to/saved_dataset --out data/mine        (or a folder of images: --imagefolder)
    clipforge prep inspect data/mine
    clipforge train configs/demo.yaml --set optim.lr=5e-4 --set data.batch_size=256
    clipforge eval runs/demo/checkpoints/latest --suite eval/synthetic.yaml
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def _prep(args: argparse.Namespace) -> int:
    from clipforge.data.shards import SyntheticSpec, write_synthetic

    spec = SyntheticSpec(out=args.out, num_samples=args.num_samples, samples_per_shard=args.samples_per_shard,
                         image_size=args.image_size, seed=args.seed, num_eval_samples=args.num_eval_samples,
                         num_retrieval_samples=args.num_retrieval_samples, num_workers=args.workers)
    summary = write_synthetic(spec, progress=not args.quiet)
    print(json.dumps(summary, indent=1))
    return 0


def _prep_table(args: argparse.Namespace) -> int:
    from clipforge.data.prep import write_from_table

    summary = write_from_table(args.table, args.out, args.image_column, args.caption_column,
                               samples_per_shard=args.samples_per_shard, resize_to=args.resize,
                               num_workers=args.workers, progress=not args.quiet, image_root=args.image_root)
    print(json.dumps(summary, indent=1))
    return 0


def _prep_hf(args: argparse.Namespace) -> int:
    from clipforge.data.prep import write_from_hf

    summary = write_from_hf(args.dataset, args.out, args.image_column, args.caption_column,
                            samples_per_shard=args.samples_per_shard, resize_to=args.resize, num_workers=args.workers,
                            progress=not args.quiet, split=args.split, imagefolder=args.imagefolder)
    print(json.dumps(summary, indent=1))
    return 0


def _prep_inspect(args: argparse.Namespace) -> int:
    from clipforge.data.prep import inspect_shards

    report = inspect_shards(args.shards, write_stats=not args.no_write, num_workers=args.workers,
                            progress=not args.quiet)
    print(json.dumps({key: value for key, value in report.items() if key != "per_shard"}, indent=1))
    return 0 if report["ok"] else 1


def _add_writer_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output directory for 00000.tar ..., sizes.json, _stats.json")
    parser.add_argument("--resize", type=int, metavar="N",
                        help="resize so the shorter side is N pixels, up or down, aspect kept (img2dataset's "
                             "keep_ratio), and re-encode as JPEG quality 95; default: store the original image bytes")
    parser.add_argument("--samples-per-shard", type=int, default=10_000, help="input rows per shard (10000)")
    parser.add_argument("--workers", type=int, default=2, help="writer processes; 1 writes in this process (2)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_prep_sources(prep_kinds: argparse._SubParsersAction) -> None:
    resumable = ("Shards already complete (NNNNN.tar + NNNNN_stats.json) are kept, so an interrupted run can simply be "
                 "repeated. Rows with a missing or undecodable image or an empty caption are skipped and counted.")
    table = prep_kinds.add_parser(
        "table", help="a CSV/TSV/parquet table of local image paths and captions → img2dataset-layout shards",
        description="Write the rows of TABLE (.csv, .tsv, .parquet) as img2dataset-layout shards: OUT/00000.tar "
                    "(KEY.jpg|png|webp, KEY.txt, KEY.json) ... " + resumable)
    table.add_argument("table", help="CSV (.tsv: tab-separated) or parquet file")
    table.add_argument("--image-column", required=True,
                       help="column holding image paths (or, in parquet, image bytes)")
    table.add_argument("--caption-column", required=True, help="column holding the captions")
    table.add_argument("--image-root", help="directory that relative image paths start from (default: the table's)")
    _add_writer_options(table)
    table.set_defaults(func=_prep_table)

    hf = prep_kinds.add_parser(
        "hf", help="a Hugging Face datasets dataset (save_to_disk folder or imagefolder) → img2dataset-layout shards",
        description="Write a Hugging Face dataset as img2dataset-layout shards. DATASET is a directory written by "
                    "Dataset.save_to_disk, or with --imagefolder a folder of images with metadata.jsonl (file_name "
                    "and a caption column) read by load_dataset('imagefolder', data_dir=DATASET). " + resumable)
    hf.add_argument("dataset", help="save_to_disk directory, or image folder with --imagefolder")
    hf.add_argument("--image-column", default="image", help="image column: Image feature, paths or bytes (image)")
    hf.add_argument("--caption-column", default="text", help="caption column (text)")
    hf.add_argument("--imagefolder", action="store_true",
                    help="DATASET is a folder of images loaded with load_dataset('imagefolder', data_dir=...)")
    hf.add_argument("--split", help="split of a DatasetDict (default: train, or the only one)")
    _add_writer_options(hf)
    hf.set_defaults(func=_prep_hf)

    inspect = prep_kinds.add_parser(
        "inspect", help="validate shards; write counts, problems and histograms to _stats.json",
        description="Read every sample of SHARDS (a directory of .tar files, or brace-expanded paths such as "
                    "data/{00000..00099}.tar), decode images and captions, and report counts, problems by kind "
                    "(corrupt or missing images, missing or empty captions, truncated tars, sizes.json mismatches) "
                    "and caption-length / image-size histograms. The report goes into _stats.json (key 'inspect') "
                    "beside the shards; sizes.json is written if absent. Exit status 1 when a problem is found.")
    inspect.add_argument("shards", help="directory of .tar shards, or brace-expanded shard paths")
    inspect.add_argument("--workers", type=int, default=2, help="reader processes; 1 reads in this process (2)")
    inspect.add_argument("--no-write", action="store_true", help="only print the report; write no file")
    inspect.add_argument("--quiet", action="store_true", help="no progress bar")
    inspect.set_defaults(func=_prep_inspect)


def _train(args: argparse.Namespace) -> int:
    from clipforge.config import load_config
    from clipforge.train.loop import EXIT_PREEMPTED, train

    overrides = list(args.set)
    if args.resume:
        overrides.append(f"train.resume={args.resume}")
    cfg = load_config(args.config, overrides)
    result = train(cfg)
    if result.get("eval_table"):
        print(f"\nzero-shot results at step {result['step']} ({cfg.eval.suite}):\n\n{result['eval_table']}")
    print(json.dumps({"step": result["step"], "checkpoint": result["checkpoint"], "preempted": result["preempted"]}))
    return EXIT_PREEMPTED if result["preempted"] else 0


def _eval(args: argparse.Namespace) -> int:
    from clipforge.config import load_config
    from clipforge.evaluation import OpenClipEncoder, load_suite, markdown_table, run_suite
    from clipforge.models import build_model, load_weights

    checkpoint = Path(args.checkpoint)
    if not (checkpoint / "config.yaml").is_file():
        raise FileNotFoundError(f"{checkpoint}: not a clipforge checkpoint directory (no config.yaml)")
    cfg = load_config(checkpoint / "config.yaml")
    suite = load_suite(args.suite)
    built = build_model(cfg.model)
    load_weights(built.model, str(checkpoint))
    encoder = OpenClipEncoder(built.model, "cpu")
    results = run_suite(encoder, built.tokenizer, built.eval_transform, suite, args.batch_size, args.workers,
                        progress=not args.quiet)
    table = markdown_table(results)
    out = Path(args.out) if args.out else checkpoint.resolve().parent.parent / "eval"
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{suite.name}_{checkpoint.resolve().name}"
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1))
    (out / f"{stem}.md").write_text(table + "\n")
    print(table)
    print(f"\nresults: {out / (stem + '.json')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from clipforge.config import describe_fields

    parser = argparse.ArgumentParser(prog="clipforge", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    prep = commands.add_parser("prep", help="write training shards and benchmark sets")
    prep_kinds = prep.add_subparsers(dest="kind", required=True)
    synth = prep_kinds.add_parser(
        "synthetic", help="seeded compositional scenes with captions (the embedded default data)",
        description="Write seeded synthetic scenes as img2dataset-layout shards (OUT/train/00000.tar ...) and "
                    "CLIP_benchmark-layout held-out sets (OUT/eval/{shapes,colors,retrieval}). Shards already "
                    "complete are kept, so an interrupted run can simply be repeated.")
    synth.add_argument("--out", required=True, help="output directory")
    synth.add_argument("--num-samples", type=int, default=20_000, help="training samples (default 20000)")
    synth.add_argument("--samples-per-shard", type=int, default=1_000, help="samples per training shard (1000)")
    synth.add_argument("--image-size", type=int, default=64, help="image side in pixels (64)")
    synth.add_argument("--seed", type=int, default=0, help="generator seed; eval sets use their own streams (0)")
    synth.add_argument("--num-eval-samples", type=int, default=1_000,
                       help="images in each classification set; half show unseen shape–colour pairs (1000)")
    synth.add_argument("--num-retrieval-samples", type=int, default=500,
                       help="images in the retrieval set, 5 captions each (500)")
    synth.add_argument("--workers", type=int, default=2, help="writer processes (2)")
    synth.add_argument("--quiet", action="store_true", help="no progress bar")
    synth.set_defaults(func=_prep)
    _add_prep_sources(prep_kinds)

    train = commands.add_parser(
        "train", help="train a dual encoder from a YAML config", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train from CONFIG (YAML), with --set overrides. Every config key:\n\n" + describe_fields())
    train.add_argument("config", help="run config YAML, e.g. configs/demo.yaml")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set optim.lr=5e-4 (repeatable)")
    train.add_argument("--resume", metavar="auto|DIR",
                       help="continue from the newest intact checkpoint of this run (auto; 'latest' is an alias) or a "
                            "checkpoint directory. Exit code 75: stopped by SIGUSR1/SIGTERM after a checkpoint")
    train.set_defaults(func=_train)

    evaluate = commands.add_parser("eval", help="zero-shot evaluation of a checkpoint on a benchmark suite")
    evaluate.add_argument("checkpoint", help="clipforge checkpoint directory, e.g. runs/demo/checkpoints/latest")
    evaluate.add_argument("--suite", required=True, help="suite YAML listing the datasets, e.g. eval/synthetic.yaml")
    evaluate.add_argument("--out", help="where to write SUITE_CHECKPOINT.json/.md (default: RUN_DIR/eval)")
    evaluate.add_argument("--batch-size", type=int, default=256, help="images per batch (256)")
    evaluate.add_argument("--workers", type=int, default=2, help="DataLoader workers decoding images (2)")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bars")
    evaluate.set_defaults(func=_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("clipforge").setLevel(logging.INFO)  # ours at INFO; libraries' chatter stays at WARNING
    args = build_parser().parse_args(argv)
    from clipforge.config import ConfigError

    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"clipforge {args.command}: error: {exc}", file=sys.stderr)
        return 2
