"""``clipforge prep``: write training shards (synthetic, table, HF dataset, image folder, a labelled classification
set with its class prompts), inspect them, score, filter and reshard them (``clipforge.data``,
``clipforge.curation``)."""

from __future__ import annotations

import argparse
import json
import sys
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
        scenes=args.scenes,
        num_dense_samples=args.num_dense_samples,
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


def _prep_labelled(args: argparse.Namespace) -> int:
    from clipforge.evaluation.labelled_shards import write_from_labelled

    summary = write_from_labelled(
        args.folder,
        args.out,
        split=args.split,
        format=args.format,
        classnames=args.classnames,
        templates=args.templates,
        samples_per_shard=args.samples_per_shard,
        resize_to=args.resize,
        num_workers=args.workers,
        progress=not args.quiet,
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
    _add_prep_labelled(prep_kinds, resumable)

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


def _add_prep_labelled(prep_kinds: argparse._SubParsersAction, resumable: str) -> None:
    labelled = prep_kinds.add_parser(
        "labelled",
        help="a classification set (image folder, CLIP_benchmark, saved HF dataset) → shards whose captions are its "
        "class prompts, for FLYP fine-tuning (data.caption_key: txt:lines)",
        description="Write one split of a classification set, opened as clipforge eval --dataset opens it, as "
        "img2dataset-layout shards: KEY.jpg|png|webp, KEY.txt holding every template filled with the sample's "
        "class name, one per line, KEY.cls (the class index) and KEY.json. Class names and templates are the ones "
        "clipforge eval uses: the set's own (classnames.txt, class folders or ClassLabel names; "
        "zeroshot_classification_templates.txt) unless --classnames / --templates name others. Train on OUT with "
        "data.caption_key: txt:lines, which picks one prompt per sample and epoch (docs/adapting.md, FLYP). "
        + resumable,
    )
    labelled.add_argument("folder", help="image folder (FOLDER/SPLIT/CLASS/*.jpg), CLIP_benchmark or HF dataset")
    labelled.add_argument("--split", default="train", help="the split to write (train)")
    labelled.add_argument(
        "--format", choices=("wds", "imagefolder", "hf"), help="the set's format (default: detected, as eval does)"
    )
    labelled.add_argument(
        "--classnames",
        metavar="NAME|FILE",
        help="class names in label order: a file (one per line, or a .json list) or openai_imagenet (default: the "
        "set's classnames.txt, class folder names or ClassLabel names)",
    )
    labelled.add_argument(
        "--templates",
        metavar="NAME|FILE",
        help="prompt templates with {c} (or {}) where the class name goes: a file (one per line, or a .json list or "
        "{class: [prompts]} dict) or openai_imagenet (default: the set's zeroshot_classification_templates.txt)",
    )
    _add_writer_options(labelled)
    labelled.set_defaults(func=_prep_labelled)


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


def add_parser(commands: argparse._SubParsersAction) -> None:
    prep = commands.add_parser("prep", help="write training shards and benchmark sets")
    prep_kinds = prep.add_subparsers(dest="kind", required=True)
    synth = prep_kinds.add_parser(
        "synthetic",
        help="seeded compositional scenes with captions (the embedded default data)",
        description="Write seeded synthetic scenes as img2dataset-layout shards (OUT/train/00000.tar ...) and "
        "CLIP_benchmark-layout held-out sets (OUT/eval/{shapes,colors,retrieval}), and held-out dense sets of "
        "scenes with 2-4 objects: semantic segmentation (OUT/eval/segmentation, ADE20K-style folders) and "
        "referring expressions (OUT/eval/referring, RefCOCO-style JSON). Shards already complete are kept, so an "
        "interrupted run can simply be repeated.",
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
    synth.add_argument(
        "--num-dense-samples",
        type=int,
        default=300,
        help="images in each dense set (segmentation train and test splits, referring); 0 = none (300)",
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
        "--scenes",
        type=float,
        nargs="?",
        const=1.0,
        default=0.0,
        metavar="SHARE",
        help="grounded training data: SHARE of the training samples (all with --scenes alone) are scenes of 2-4 "
        "objects, and every sample carries KEY.regions.json (boxes, names, region captions) and KEY.mask.png "
        "(class per pixel); the other samples keep the images and captions of a run without it (0)",
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
