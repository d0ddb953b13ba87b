"""``clipforge prep|train|eval|export|submit``: thin wrappers, one entry function each.

clipforge prep synthetic --out data/synth --num-samples 20000
clipforge prep table captions.csv --out data/mine --image-column filepath --caption-column title
clipforge prep hf path/to/saved_dataset --out data/mine        (or a folder of images: --imagefolder)
clipforge prep inspect data/mine
clipforge prep score data/mine --model runs/demo/checkpoints/latest --out data/mine-scores  (then filter, reshard)
clipforge train configs/demo.yaml --set optim.lr=5e-4 --set data.batch_size=256
clipforge eval runs/demo/checkpoints/latest --suite eval/synthetic.yaml
clipforge eval runs/demo/checkpoints/latest --dataset data/synth/eval/shapes --predictions shapes.csv
clipforge export runs/demo/checkpoints/latest --format hf --out exported/demo [--push org/name]
clipforge export runs/vit/checkpoints/latest --towers text --out exported/vit-text-encoder
clipforge submit configs/vit-b-32.yaml --nodes 16 --gpus-per-node 8 --partition gpu --time 48:00:00
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path


def _prep(args: argparse.Namespace) -> int:
    from clipforge.data.shards import SyntheticSpec, write_synthetic

    spec = SyntheticSpec(
        out=args.out,
        num_samples=args.num_samples,
        samples_per_shard=args.samples_per_shard,
        image_size=args.image_size,
        seed=args.seed,
        num_eval_samples=args.num_eval_samples,
        num_retrieval_samples=args.num_retrieval_samples,
        num_workers=args.workers,
        noise=args.noise,
    )
    summary = write_synthetic(spec, progress=not args.quiet, overwrite=args.overwrite)
    print(json.dumps(summary, indent=1))
    return 0


def _prep_table(args: argparse.Namespace) -> int:
    from clipforge.data.prep import write_from_table

    summary = write_from_table(
        args.table,
        args.out,
        args.image_column,
        args.caption_column,
        samples_per_shard=args.samples_per_shard,
        resize_to=args.resize,
        num_workers=args.workers,
        progress=not args.quiet,
        image_root=args.image_root,
        encoding=args.encoding,
        overwrite=args.overwrite,
    )
    print(json.dumps(summary, indent=1))
    return 0


def _prep_hf(args: argparse.Namespace) -> int:
    from clipforge.data.prep import write_from_hf

    summary = write_from_hf(
        args.dataset,
        args.out,
        args.image_column,
        args.caption_column,
        samples_per_shard=args.samples_per_shard,
        resize_to=args.resize,
        num_workers=args.workers,
        progress=not args.quiet,
        split=args.split,
        imagefolder=args.imagefolder,
        overwrite=args.overwrite,
    )
    print(json.dumps(summary, indent=1))
    return 0


def _prep_inspect(args: argparse.Namespace) -> int:
    from clipforge.data.inspection import inspect_shards

    report = inspect_shards(
        args.shards,
        write_stats=not args.no_write,
        num_workers=args.workers,
        progress=not args.quiet,
        caption_key=args.caption_key,
        max_pixels=args.max_image_pixels,
    )
    print(json.dumps({key: value for key, value in report.items() if key != "per_shard"}, indent=1))
    readers = args.world_size * max(1, args.num_workers)
    if report["shards"] < readers:  # what `clipforge train` would refuse in epoch mode, said now
        print(
            f"clipforge prep: warning: {report['shards']} shards cannot feed world size {args.world_size} × "
            f"data.num_workers {args.num_workers} = {readers} readers disjointly: training refuses them in epoch "
            "mode (data.shard_shortage=resample resamples instead); write more, smaller shards "
            "(--samples-per-shard auto)",
            file=sys.stderr,
        )
    return 0 if report["ok"] else 1


def _auto_or_int(value: str) -> int | None:
    if value == "auto":
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or auto, got {value!r}") from None


def _add_writer_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output directory for 00000.tar ..., sizes.json, _stats.json")
    parser.add_argument(
        "--resize",
        type=int,
        metavar="N",
        help="resize so the shorter side is N pixels, up or down, aspect kept (img2dataset's "
        "keep_ratio), and re-encode as JPEG quality 95; default: store the original image bytes",
    )
    parser.add_argument(
        "--samples-per-shard",
        type=_auto_or_int,
        default=None,
        metavar="N|auto",
        help="input rows per shard; auto (the default): at least 64 shards and at most 10000 rows "
        "each, so the output feeds up to 64 readers (ranks × workers) as written",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace what an earlier run wrote in --out (default: resume it with the same settings, or refuse "
        "other settings; files prep did not write are refused either way)",
    )
    parser.add_argument("--workers", type=int, default=2, help="writer processes; 1 writes in this process (2)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_prep_sources(prep_kinds: argparse._SubParsersAction) -> None:
    resumable = (
        "Shards already complete (NNNNN.tar + NNNNN_stats.json) are kept, so an interrupted run can simply be "
        "repeated; an --out holding anything else than an earlier prep run's output is refused. Rows with a missing "
        "or undecodable image or an empty caption are skipped and counted; when no row gives a sample, nothing is "
        "left written and the command fails."
    )
    table = prep_kinds.add_parser(
        "table",
        help="a CSV/TSV/parquet/JSON-lines table of local image paths and captions → img2dataset-layout shards",
        description="Write the rows of TABLE (.csv, .tsv, .parquet, .jsonl) as img2dataset-layout shards: "
        "OUT/00000.tar (KEY.jpg|png|webp, KEY.txt, KEY.json) ... " + resumable + " Image URLs (http://, https://) "
        "are refused: img2dataset downloads them into shards that train as they are.",
    )
    table.add_argument(
        "table",
        help="CSV, .tsv (tab-separated), .parquet, or JSON lines (.jsonl; .json: JSON lines, or one array of records)",
    )
    table.add_argument("--image-column", required=True, help="column holding image paths (or, in parquet, image bytes)")
    table.add_argument("--caption-column", required=True, help="column holding the captions")
    table.add_argument("--image-root", help="directory that relative image paths start from (default: the table's)")
    table.add_argument(
        "--encoding", default="utf-8", help="text encoding of a CSV/TSV table, e.g. latin-1 or cp1252 (utf-8)"
    )
    _add_writer_options(table)
    table.set_defaults(func=_prep_table)

    _add_prep_hf(prep_kinds, resumable)

    inspect = prep_kinds.add_parser(
        "inspect",
        help="validate shards; write counts, problems and histograms to _stats.json",
        description="Read every sample of SHARDS (a directory of .tar/.tar.gz files, or brace-expanded paths such as "
        "data/{00000..00099}.tar) exactly as training reads them, decode images and captions, and report "
        "counts, problems by kind under training's names (corrupt_image, missing_caption, truncated_tar, "
        "duplicate_key, decompression_bomb, ..., and sizes.json mismatches) "
        "and caption-length / image-size histograms. The report goes into _stats.json (key 'inspect') "
        "beside the shards; sizes.json is written if absent. Exit status 1 when a problem is found.",
    )
    inspect.add_argument("shards", help="directory of .tar shards, or brace-expanded shard paths")
    inspect.add_argument("--workers", type=int, default=2, help="reader processes; 1 reads in this process (2)")
    inspect.add_argument("--no-write", action="store_true", help="only print the report; write no file")
    inspect.add_argument(
        "--world-size",
        type=int,
        default=1,
        help="ranks that will train on these shards: warn when the shards are too few for them (1)",
    )
    inspect.add_argument(
        "--num-workers", type=int, default=2, help="data.num_workers of the training run, for the same warning (2)"
    )
    inspect.add_argument(
        "--caption-key",
        default="txt",
        help="the caption training reads, as data.caption_key: txt, txt:lines or json:FIELD (txt)",
    )
    inspect.add_argument(
        "--max-image-pixels",
        type=int,
        default=89_478_485,
        help="images over this many pixels count as decompression bombs, as data.max_image_pixels (89478485)",
    )
    inspect.add_argument("--quiet", action="store_true", help="no progress bar")
    inspect.set_defaults(func=_prep_inspect)


def _add_prep_hf(prep_kinds: argparse._SubParsersAction, resumable: str) -> None:
    hf = prep_kinds.add_parser(
        "hf",
        help="a Hugging Face datasets dataset (save_to_disk folder or imagefolder) → img2dataset-layout shards",
        description="Write a Hugging Face dataset as img2dataset-layout shards. DATASET is a directory written by "
        "Dataset.save_to_disk, or with --imagefolder a folder of images with metadata.jsonl (file_name "
        "and a caption column) read by load_dataset('imagefolder', data_dir=DATASET). " + resumable,
    )
    hf.add_argument("dataset", help="save_to_disk directory, or image folder with --imagefolder")
    hf.add_argument("--image-column", default="image", help="image column: Image feature, paths or bytes (image)")
    hf.add_argument("--caption-column", default="text", help="caption column (text)")
    hf.add_argument(
        "--imagefolder",
        action="store_true",
        help="DATASET is a folder of images loaded with load_dataset('imagefolder', data_dir=...)",
    )
    hf.add_argument("--split", help="split of a DatasetDict (default: train, or the only one)")
    _add_writer_options(hf)
    hf.set_defaults(func=_prep_hf)


def _prep_score(args: argparse.Namespace) -> int:
    from clipforge.curation.score import ModelSpec, score_shards

    device = args.device or ("cuda" if _cuda_available() else "cpu")
    folder, architecture = (None, args.model) if args.weights else (args.model, None)
    model = ModelSpec(folder, architecture, args.weights, device)
    summary = score_shards(
        args.shards, args.out, model, args.batch_size, args.workers, args.caption_key, progress=not args.quiet
    )
    print(json.dumps(summary, indent=1))
    return 0


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _prep_filter(args: argparse.Namespace) -> int:
    from clipforge.curation.filter import FilterRules, filter_scores

    rules = FilterRules(
        min_words=args.min_words,
        min_chars=args.min_chars,
        max_nonalpha=args.max_nonalpha,
        min_side=args.min_side,
        max_aspect=args.max_aspect,
        min_score=args.min_score,
        top_fraction=args.top_fraction,
        dedup_threshold=args.dedup_threshold,
        dedup_backend=args.dedup_backend,
        metadata=args.metadata,
        balance_t=args.balance_t,
        seed=args.seed,
    )
    card = filter_scores(args.scores, args.out, rules)
    for rule in card["rules"]:
        print(f"{rule['name']:>14}: {rule['in']} -> {rule['out']}")
    print(f"kept {card['samples_out']} of {card['samples_in']}: {card['output']} (card: {Path(args.out) / 'card.md'})")
    return 0


def _prep_reshard(args: argparse.Namespace) -> int:
    from clipforge.curation.reshard import reshard

    card = reshard(args.shards, args.kept, args.out, args.samples_per_shard, args.embeddings, args.overwrite)
    print(json.dumps({key: card[key] for key in ("samples_in", "samples_out", "output", "extra")}, indent=1))
    return 0


def _add_prep_curation(prep_kinds: argparse._SubParsersAction) -> None:
    score = prep_kinds.add_parser(
        "score",
        help="embed every pair with a CLIP model: embeddings per shard and a CLIP-score table (docs/curation.md)",
        description="Embed the image and caption of every sample of SHARDS with a model (what `clipforge eval` "
        "loads: a checkpoint, an open_clip folder, a transformers CLIP folder, or an architecture with "
        "--weights). Writes OUT/NAME.{image,text}.npy (float16, rows aligned with OUT/NAME.keys.json), "
        "OUT/scores.parquet (key, shard, row, score = cosine, caption, caption length, image size) and "
        "OUT/teacher.json, so OUT also serves as data.teacher. Shards already scored are kept: repeat the "
        "command to resume.",
    )
    score.add_argument("shards", help="directory of .tar shards, or brace-expanded shard paths")
    score.add_argument(
        "--model",
        required=True,
        metavar="M",
        help="clipforge checkpoint, open_clip folder or transformers CLIP folder; with --weights, an open_clip "
        "architecture, configs/models stem or JSON config (as `clipforge eval` takes them)",
    )
    score.add_argument("--weights", metavar="FILE", help="local weights when --model names an architecture")
    score.add_argument("--out", required=True, help="output directory")
    score.add_argument("--batch-size", type=int, default=256, help="samples per forward pass (256)")
    score.add_argument("--workers", type=int, default=2, help="scoring processes, each with the model loaded (2)")
    score.add_argument("--caption-key", default="txt", help="the caption to score, as data.caption_key (txt)")
    score.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    score.add_argument("--quiet", action="store_true", help="no progress bar")
    score.set_defaults(func=_prep_score)

    chosen = prep_kinds.add_parser(
        "filter",
        help="select pairs from a score table: DataComp rules, near-duplicates, MetaCLIP balancing",
        description="Apply the given rules, in this order, to SCORES/scores.parquet: text (--min-words, "
        "--min-chars, --max-nonalpha), image (--min-side, --max-aspect), CLIP score (--min-score or "
        "--top-fraction of the pool), near-duplicates by image embedding (--dedup-threshold), MetaCLIP "
        "balancing (--metadata, --balance-t). Writes OUT/kept.tsv (shard, key) and the data card OUT/card.json "
        "and OUT/card.md (counts per rule, score histograms, entry counts before and after balancing).",
    )
    chosen.add_argument("scores", help="a `clipforge prep score` output directory")
    chosen.add_argument("--out", required=True, help="output directory for kept.tsv and the card")
    chosen.add_argument("--min-words", type=int, help="captions with at least this many words")
    chosen.add_argument("--min-chars", type=int, help="captions with at least this many characters")
    chosen.add_argument(
        "--max-nonalpha", type=float, help="at most this share of caption characters not letters or spaces"
    )
    chosen.add_argument("--min-side", type=int, help="images whose shorter side has at least this many pixels")
    chosen.add_argument("--max-aspect", type=float, help="images whose long / short side is at most this")
    chosen.add_argument("--min-score", type=float, help="CLIP score (cosine) at least this")
    chosen.add_argument("--top-fraction", type=float, help="the best-scored fraction of the pool, e.g. 0.3")
    chosen.add_argument(
        "--dedup-threshold", type=float, help="drop a sample whose image embedding has this cosine with a better one"
    )
    chosen.add_argument(
        "--dedup-backend",
        default="auto",
        choices=("auto", "faiss", "blocks"),
        help="nearest-neighbour search: faiss (pip install faiss-cpu) or numpy blocks; auto = faiss if present",
    )
    chosen.add_argument("--metadata", help="MetaCLIP balancing: a file of entries, one per line")
    chosen.add_argument("--balance-t", type=int, default=20_000, help="at most about t pairs per entry (20000)")
    chosen.add_argument("--seed", type=int, default=0, help="seed of the balancing draws (0)")
    chosen.set_defaults(func=_prep_filter)

    _add_prep_reshard(prep_kinds)


def _add_prep_reshard(prep_kinds: argparse._SubParsersAction) -> None:
    again = prep_kinds.add_parser(
        "reshard",
        help="write the pairs a filter kept as new shards, with sizes.json (and their embeddings)",
        description="Copy the samples of SHARDS named in KEPT (kept.tsv or its folder) to OUT/00000.tar ... with "
        "sizes.json, _stats.json and the data card OUT/reshard_card.{json,md}. With --embeddings SCORES the "
        "kept samples' embeddings are written beside the new shards (data.teacher: OUT).",
    )
    again.add_argument("shards", help="directory of the source .tar shards, or brace-expanded shard paths")
    again.add_argument("--kept", required=True, help="kept.tsv from `clipforge prep filter`, or its folder")
    again.add_argument("--out", required=True, help="output directory")
    again.add_argument("--samples-per-shard", type=int, default=1_000, help="samples per new shard (1000)")
    again.add_argument("--embeddings", metavar="SCORES", help="`prep score` output whose rows to carry along")
    again.add_argument(
        "--overwrite",
        action="store_true",
        help="replace what an earlier reshard with other settings wrote in --out (default: refuse other settings; "
        "the same settings write it again; files prep did not write are refused either way)",
    )
    again.set_defaults(func=_prep_reshard)


def _train(args: argparse.Namespace) -> int:
    from clipforge.train.config import load_config

    overrides = list(args.set)
    if args.resume:
        overrides.append(f"checkpoint.resume={args.resume}")
    cfg = load_config(args.config, overrides)  # before torch is imported: a wrong key is refused at once
    _log_rank()
    if args.dry_run:
        return _dry_run(cfg, args.print_config)
    from clipforge.train.loop import EXIT_PREEMPTED, train

    result = train(cfg, take_over_lock=args.take_over_lock)
    if result.get("eval_table"):
        print(f"\nzero-shot results at step {result['step']} ({cfg.eval.suite}):\n\n{result['eval_table']}")
    if result["is_main"]:
        print(
            json.dumps({"step": result["step"], "checkpoint": result["checkpoint"], "preempted": result["preempted"]})
        )
    return EXIT_PREEMPTED if result["preempted"] else 0


def _dry_run(cfg, print_config: bool) -> int:
    """The checks and the summary first (a problem is the one line the user sees), the resolved config on request."""
    from clipforge.config import to_yaml
    from clipforge.train.preflight import dry_run

    summary = dry_run(cfg)
    width = max(map(len, summary))
    for key, value in summary.items():
        shown = f"{value:,.3f}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int) else value
        print(f"{key:<{width}}  {shown}")
    if print_config:
        print(f"\n{to_yaml(cfg)}", end="")
    else:
        print(
            f"{'config':<{width}}  not shown (--print-config); the run writes it to {cfg.train.output_dir}/config.yaml"
        )
    return 0


def _log_rank() -> None:
    """Prefix log lines with the rank when there are several: they write to one SLURM log."""
    from clipforge.distributed import DistInfo

    info = DistInfo.from_env(os.environ, cuda_available=False)
    if info.is_distributed:
        for handler in logging.getLogger().handlers:
            handler.setFormatter(logging.Formatter(f"%(asctime)s rank {info.rank} %(levelname)s %(name)s: %(message)s"))


DATASET_OPTIONS = ("task", "classnames", "templates", "split", "format", "predictions", "top_k")  # --dataset only


def _eval_suite(args: argparse.Namespace):
    """The suite to run: --suite's file, or the one dataset of --dataset; contradictions are errors."""
    from clipforge.evaluation import load_suite
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
    return single_dataset_suite(
        args.dataset, args.task, args.classnames, args.templates, args.split or "test", args.format
    )


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
    )
    stem = f"{suite.name}_{loaded.name}"
    replaced = " (replaced the one there)" if (out / f"{stem}.json").exists() else ""
    written = write_report(results, out, stem, plots=not args.no_plots)
    health = health_table(results)
    print(markdown_table(results) + (f"\n\n{health}" if health else ""))
    print(f"\nresults: {written[0]}{replaced}" + (f" (+ {len(written) - 2} plots)" if len(written) > 2 else ""))
    if predictions is not None:
        (rows,) = predictions.values()
        replaced = " (replaced the file there)" if Path(args.predictions).exists() else ""
        print(f"predictions: {write_predictions(rows, args.predictions)} ({len(rows):,} rows){replaced}")
    return 0


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


def _add_export(commands: argparse._SubParsersAction) -> None:
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


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose description can end in text made only when its help is shown (``more_help``):
    ``train --help`` lists every config key, which imports every config module; other commands need none of it."""

    def __init__(self, *args, more_help: Callable[[], str] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.more_help = more_help

    def format_help(self) -> str:
        if self.more_help is not None:
            self.description, self.more_help = (self.description or "") + self.more_help(), None
        return super().format_help()


def _config_keys() -> str:
    from clipforge.config import describe_fields
    from clipforge.train.config import RunConfig

    return describe_fields(RunConfig)


def _add_prep(commands: argparse._SubParsersAction) -> None:
    prep = commands.add_parser("prep", help="write training shards and benchmark sets")
    prep_kinds = prep.add_subparsers(dest="kind", required=True)
    synth = prep_kinds.add_parser(
        "synthetic",
        help="seeded compositional scenes with captions (the embedded default data)",
        description="Write seeded synthetic scenes as img2dataset-layout shards (OUT/train/00000.tar ...) and "
        "CLIP_benchmark-layout held-out sets (OUT/eval/{shapes,colors,retrieval}). Shards already "
        "complete are kept, so an interrupted run can simply be repeated.",
    )
    synth.add_argument("--out", required=True, help="output directory")
    synth.add_argument("--num-samples", type=int, default=20_000, help="training samples (default 20000)")
    synth.add_argument("--samples-per-shard", type=int, default=1_000, help="samples per training shard (1000)")
    synth.add_argument("--image-size", type=int, default=64, help="image side in pixels (64)")
    synth.add_argument("--seed", type=int, default=0, help="generator seed; eval sets use their own streams (0)")
    synth.add_argument(
        "--num-eval-samples",
        type=int,
        default=1_000,
        help="images in each classification set; half show unseen shape–colour pairs (1000)",
    )
    synth.add_argument(
        "--num-retrieval-samples", type=int, default=500, help="images in the retrieval set, 5 captions each (500)"
    )
    synth.add_argument("--workers", type=int, default=2, help="writer processes (2)")
    synth.add_argument(
        "--noise",
        type=float,
        default=0.0,
        help="share of training captions replaced by another sample's, e.g. 0.3; the replaced keys are listed in "
        "OUT/train/noisy_keys.tsv (for curation benchmarks; 0)",
    )
    synth.add_argument(
        "--overwrite",
        action="store_true",
        help="replace what an earlier run wrote in --out (default: resume it with the same settings, or refuse "
        "other settings; files prep did not write are refused either way)",
    )
    synth.add_argument("--quiet", action="store_true", help="no progress bar")
    synth.set_defaults(func=_prep)
    _add_prep_sources(prep_kinds)
    _add_prep_curation(prep_kinds)


def _add_train(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser(
        "train",
        help="train a dual encoder from a YAML config",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train from CONFIG (YAML), with --set overrides. Every config key:\n\n",
        more_help=_config_keys,
    )
    train.add_argument("config", help="run config YAML, e.g. configs/demo.yaml")
    train.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set optim.lr=5e-4 (repeatable)",
    )
    train.add_argument(
        "--resume",
        metavar="auto|DIR",
        help="continue from the newest intact checkpoint of this run (auto; 'latest' is an alias) or a "
        "checkpoint directory. Exit code 75: stopped by Ctrl-C (SIGINT), SIGUSR1 or SIGTERM after a checkpoint; "
        "130: a second Ctrl-C aborted at once, without one",
    )
    train.add_argument(
        "--take-over-lock",
        action="store_true",
        help="take the run directory's lock (RUN/train.lock) from a trainer that holds it on another host and is "
        "known to be dead; on this host, or for an earlier attempt of the same SLURM job, a dead holder's lock is "
        "taken over by itself",
    )
    train.add_argument(
        "--dry-run",
        action="store_true",
        help="make the checks the run makes before its first step (the eval suite, the resume target, the "
        "sources: shards found, sample counts, enough shards for world size × data.num_workers), then print "
        "parameter counts and FLOPs per sample and exit; writes nothing",
    )
    train.add_argument(
        "--print-config", action="store_true", help="with --dry-run: also print the resolved config (YAML)"
    )
    train.set_defaults(func=_train)


def _add_eval(commands: argparse._SubParsersAction) -> None:
    from clipforge.evaluation.config import FORMATS, TASKS  # torch-free: the parser imports no evaluator

    evaluate = commands.add_parser(
        "eval",
        help="zero-shot classification, retrieval and linear probes of a model on a benchmark suite or one dataset",
        description="Evaluate a clipforge checkpoint, an open_clip folder, a transformers CLIP folder, or an open_clip "
        "architecture with a local weights file (--model, --weights) on the datasets of a suite "
        "(--suite eval/*.yaml) or on one dataset (--dataset PATH: a CLIP_benchmark WebDataset directory, an image "
        "folder or a saved HF dataset). Writes SUITE_MODEL.json (every metric), SUITE_MODEL.md (the table) and PNG "
        "plots (SUITE is the dataset's folder name with --dataset); --predictions adds per-image predictions.",
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
        "(PATH/test/CLASS/*.jpg or PATH/CLASS/*.jpg) or a saved HF dataset, detected from its files",
    )
    evaluate.add_argument(
        "--task",
        choices=TASKS,
        help="with --dataset (default: zeroshot_classification when --classnames is given or the dataset holds "
        "class labels, else zeroshot_retrieval); linear_probe trains on the train split",
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
    _add_eval_model_and_output_options(evaluate)
    evaluate.set_defaults(func=_eval)


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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="clipforge", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    _add_prep(commands)
    _add_train(commands)
    _add_eval(commands)
    _add_export(commands)
    from clipforge.launch import add_parser as add_submit

    add_submit(commands)
    _add_debug_flag(parser)
    parser.set_defaults(debug=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    if (sys.argv[1:] if argv is None else argv)[:1] in (["eval"], ["train"]):
        # Training and evaluation decode in DataLoader workers beside torch's CPU threads. OpenMP threads that
        # spin while they wait take the cores those workers need: with the cores shared, the image tower ran
        # ~5x slower (2 cores); passive waiting costs nothing measurable on an idle machine or on a GPU run.
        # OpenMP reads it when torch loads, so it is set first (an explicit OMP_WAIT_POLICY wins).
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser().parse_args(argv)  # first: --help and usage errors exit here, before torch is imported
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("clipforge").setLevel(logging.INFO)  # ours at INFO; libraries' chatter stays at WARNING
    try:
        return args.func(args)
    except Exception as exc:
        if not _is_user_error(exc) or args.debug or os.environ.get("CLIPFORGE_DEBUG", "") not in ("", "0"):
            raise
        message = _one_line(exc)
        kind = (
            ""
            if type(exc).__module__ == "builtins" or type(exc).__name__ == "ConfigError"
            else f"{type(exc).__name__}: "
        )  # what stopped a run: DataError, CorruptCheckpoint, NonFiniteError, ...
        print(
            f"clipforge {args.command}: error: {kind}{message} (--debug or CLIPFORGE_DEBUG=1 shows the traceback)",
            file=sys.stderr,
        )
        return 2


_USER_ERRORS = (
    ("clipforge.config", "ConfigError"),
    ("clipforge.data.samples", "DataError"),
    ("clipforge.checkpoints", "CorruptCheckpoint"),
    ("clipforge.train.health", "CollapseError"),
    ("clipforge.train.loop", "NonFiniteError"),
)


def _user_errors() -> tuple[type[Exception], ...]:
    """What a user's input causes (a config, a path, bad data, a damaged checkpoint, a run that diverged): reported
    as one line. Anything else is a bug in clipforge or a library and keeps its traceback.

    Only the modules already imported are asked: an error class whose module was never imported cannot have been
    raised, and importing them (torch, the whole trainer) would make a one-line message take seconds."""
    loaded = [getattr(sys.modules[module], name) for module, name in _USER_ERRORS if module in sys.modules]
    return *loaded, FileNotFoundError, ValueError


def _is_user_error(exc: BaseException) -> bool:
    """A user's input or environment: the listed kinds, and an OS error on a path (a full disk, a read-only or
    unwritable folder, a file where a folder belongs) from anywhere."""
    if isinstance(exc, _user_errors()):
        return True
    return isinstance(exc, OSError) and (exc.filename is not None or exc.errno in _FILESYSTEM_ERRNOS)


_FILESYSTEM_ERRNOS = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EROFS,
    errno.EACCES,
    errno.EPERM,
    errno.EISDIR,
    errno.ENOTDIR,
    errno.EEXIST,
    errno.ENOENT,
    errno.ENAMETOOLONG,
    errno.ELOOP,
    errno.ENOTEMPTY,
}


def _one_line(exc: BaseException) -> str:
    """The error as one line. An error raised in a DataLoader worker arrives with the worker's whole traceback as its
    text (torch's ``ExceptionWrapper``): its original last line is the message. An OS error on a path says which."""
    text = str(exc)
    marker = "Original Traceback (most recent call last):\n"
    if marker in text:
        frames = text.split(marker, 1)[1].splitlines()
        first = next((i for i, line in enumerate(frames) if line and not line.startswith(" ")), None)
        if first is not None:
            original = "\n".join(frames[first:])
            name, sep, rest = original.partition(": ")
            text = rest if sep and name.split(".")[-1] == type(exc).__name__ else original
    elif isinstance(exc, OSError) and exc.filename is not None:
        target = f" -> {exc.filename2}" if exc.filename2 is not None else ""
        text = f"{exc.filename}{target}: {exc.strerror or text}"
    return " ".join(text.split())


def _add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """``--debug`` on every (sub)command, so it can go anywhere on the command line."""
    parser.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the whole traceback of an error (as CLIPFORGE_DEBUG=1 does)",
    )
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                _add_debug_flag(sub)
