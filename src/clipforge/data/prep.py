"""Turning image–caption data into training shards (checking shards: ``clipforge.data.inspection``).

Sources: a CSV/TSV/parquet/JSON-lines table of local image paths (or image bytes) and captions
(``write_from_table``, read by ``clipforge.data.tables``: a column of http(s) URLs is refused with a pointer to
img2dataset, which downloads them into shards), and a Hugging Face ``datasets`` dataset: saved with
``save_to_disk``, an ``imagefolder`` directory with a caption column in ``metadata.jsonl``/``.csv``, or a
``Dataset`` object (``write_from_hf``). Output is img2dataset's webdataset layout: ``00000.tar`` … with
``KEY.jpg|png|webp``, ``KEY.txt`` and ``KEY.json``, a ``00000_stats.json`` per shard, ``sizes.json`` (what
OpenCLIP's ``get_dataset_size`` reads) and ``_stats.json``.

As in img2dataset, shard k holds input rows ``k * samples_per_shard`` … and a key is the shard number
(5 digits) then the row's index in the shard (4 digits), so a key names its input row and a shard's
keys have gaps where rows were skipped. Rows with a missing image file, an undecodable image or an
empty caption are skipped, counted by kind and the first of each kind is logged with its row. When no row gives a
sample, the empty shards are removed and the run fails, saying where relative paths were looked for.

What one row becomes (the caption, the image's bytes as stored or resized and re-encoded) and the rows a writer
process receives: ``clipforge.data.prep_rows``; its public names are importable from here too.

Resume: a shard's ``NNNNN_stats.json`` is written first (with the settings, marking it as this run's), then the
tar under a temporary name, renamed, then the stats again with the counts; a shard counts as complete only when
both exist and the stats say so, so re-running the same command after an interruption writes only the missing
shards. Shards written with other settings or from another source, and files prep did not write, stop the run
with an error rather than being mixed (``clipforge.data.prep_output``).

Entry points: ``clipforge prep table FILE --out DIR --image-column filepath --caption-column title``,
``clipforge prep hf PATH --out DIR [--imagefolder]``; a labelled classification set with class prompts as captions
(FLYP): ``clipforge prep labelled FOLDER --out DIR`` (``clipforge.evaluation.labelled_shards``).
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from clipforge.data.prep_output import (
    announce_shard,
    check_output_folder,
    claim_output,
    finish_shard,
    remove_output,
    write_json,
)
from clipforge.data.prep_rows import (
    DatasetRows,
    Row,
    RowList,
    SkipRow,
    WriteOptions,
    caption_text,
    encode_image,
    image_reference,
    make_sample,
    shorter_side_size,
)
from clipforge.data.shards import write_tar
from clipforge.data.tables import read_table, refuse_urls

__all__ = [
    "MAX_SAMPLES_PER_SHARD",
    "MIN_SHARDS",
    "DatasetRows",
    "Row",
    "RowList",
    "ShardJob",
    "WriteOptions",
    "auto_samples_per_shard",
    "caption_text",
    "encode_image",
    "image_reference",
    "make_sample",
    "open_hf_dataset",
    "read_table",
    "run_jobs",
    "shorter_side_size",
    "write_from_hf",
    "write_from_table",
    "write_shard",
    "write_shards",
]

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------- one shard


@dataclass
class ShardJob:
    """Write one shard: its rows, where, and how."""

    out: str
    name: str
    """File stem, e.g. ``00012``."""
    shard: int
    num_rows: int
    first_row: int
    rows: Iterable[Row]
    options: WriteOptions
    settings: dict[str, Any]
    source: str
    key_digits: int = 4


def write_shard(job: ShardJob) -> dict[str, Any]:
    """Write ``NAME.tar`` then ``NAME_stats.json`` (both atomically); returns the stats."""
    started = time.time()
    skipped: Counter[str] = Counter()
    first_skipped: dict[str, str] = {}

    def samples() -> Iterator[dict[str, Any]]:
        for row in job.rows:
            key = f"{job.shard:0{len(job.name)}d}{row.index - job.first_row:0{job.key_digits}d}"
            try:
                yield make_sample(row, key, job.options)
            except SkipRow as skip:
                skipped[skip.kind] += 1
                where = f"{job.source} row {row.index}" + (f" ({row.url})" if row.url else "")
                first_skipped.setdefault(skip.kind, f"{where}: {skip.detail}")

    announce_shard(Path(job.out), job.name, job.settings)
    successes = write_tar(Path(job.out) / f"{job.name}.tar", samples())
    stats = {
        "count": job.num_rows,
        "successes": successes,
        "failed": sum(skipped.values()),
        "skipped": dict(skipped),
        "first_skipped": first_skipped,
        "duration": round(time.time() - started, 3),
    }
    return finish_shard(Path(job.out), job.name, job.settings, stats)


MIN_SHARDS = 64  # enough for 8 ranks × 8 workers to read disjoint shards in epoch mode
MAX_SAMPLES_PER_SHARD = 10_000  # img2dataset's default: ~1 GB of typical web images per shard


def auto_samples_per_shard(num_rows: int) -> int:
    """At least ``MIN_SHARDS`` shards, and at most ``MAX_SAMPLES_PER_SHARD`` rows each (whichever gives more
    shards): 2,000 pairs become 64 shards of 32, 10M pairs 1,000 shards of 10,000."""
    return max(1, min(MAX_SAMPLES_PER_SHARD, math.ceil(num_rows / MIN_SHARDS)))


def run_jobs(jobs: Iterable[Any], work: Callable[[Any], Any], num_workers: int) -> Iterator[Any]:
    """``work(job)`` for each job, in ``num_workers`` processes (in this one if ≤ 1), results as they finish.

    At most two jobs per worker are in flight, so rows are never all materialised at once.
    """
    if num_workers <= 1:
        yield from map(work, jobs)
        return
    pool = ProcessPoolExecutor(max_workers=num_workers)
    try:
        pending: set[Future] = set()
        for job in jobs:
            pending.add(pool.submit(work, job))
            if len(pending) >= 2 * num_workers:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                yield from (future.result() for future in done)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            yield from (future.result() for future in done)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _settings(options: WriteOptions, source: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What must match for an existing shard to count as written by this run (``extra``: a source's own, e.g. the
    class prompts of ``prep labelled``)."""
    return {
        "source": source,
        "samples_per_shard": options.samples_per_shard,
        "resize_to": options.resize_to,
        "jpeg_quality": options.jpeg_quality if options.resize_to else None,
        **(extra or {}),
    }


def _plan(
    out: Path, num_rows: int, options: WriteOptions, source: str, extra: dict[str, Any] | None = None
) -> tuple[list[str], list[ShardJob], dict[int, dict[str, Any]]]:
    """Shard names, the shards still to write (rows not yet attached), and the stats of those already complete.

    Runs before any writing, so a folder holding anything else than an equivalent earlier run's output is refused
    with nothing changed (``prep_output.claim_output``).
    """
    per_shard = options.samples_per_shard
    num_shards = -(-num_rows // per_shard)
    names = [f"{shard:0{max(5, len(str(num_shards - 1)))}d}" for shard in range(num_shards)]
    key_digits = max(4, len(str(per_shard - 1)))
    settings = _settings(options, source, extra)
    earlier = claim_output(out, settings, options.overwrite, names)
    todo, complete = [], {}
    for shard, name in enumerate(names):
        count = min(per_shard, num_rows - shard * per_shard)
        stats = earlier.get(name)
        if stats is None or stats.get("count") != count:
            todo.append(
                ShardJob(str(out), name, shard, count, shard * per_shard, (), options, settings, source, key_digits)
            )
        else:
            complete[shard] = stats
    return names, todo, complete


def write_shards(
    out: str | Path,
    num_rows: int,
    rows_for: Callable[[int, int], Iterable[Row]],
    options: WriteOptions,
    source: str,
    progress: bool = True,
    paths_hint: str = "",
    extra_settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``num_rows`` rows (``rows_for(start, stop)``) as shards under ``out``; skip complete shards.

    When no row gives a sample, what was written is removed and the run stops (``ValueError``); when most rows name
    an image file that does not exist, a warning says so. ``paths_hint`` (how the source's paths were resolved and
    how to change it) goes into both. ``extra_settings`` must match too for an earlier run's shards to be kept, and
    go into the summary."""
    options.check()
    if num_rows <= 0:
        raise ValueError(f"{source}: no rows to write")
    if options.samples_per_shard is None:
        options = replace(options, samples_per_shard=auto_samples_per_shard(num_rows))
    out = Path(out)
    created = not out.exists()
    names, todo, stats_by_shard = _plan(out, num_rows, options, source, extra_settings)
    num_shards, resumed = len(names), len(stats_by_shard)
    if resumed:
        log.info("%s: %d of %d shards already complete, writing the other %d", out, resumed, num_shards, len(todo))

    skipped = _write_todo(out, todo, rows_for, options, stats_by_shard, num_rows, progress)
    sizes = {f"{name}.tar": stats_by_shard[shard]["successes"] for shard, name in enumerate(names)}
    samples = sum(sizes.values())
    first_skipped: dict[str, str] = {}
    for shard in sorted(stats_by_shard):
        for kind, where in stats_by_shard[shard]["first_skipped"].items():
            first_skipped.setdefault(kind, where.removeprefix(f"{source} "))
    if not samples:
        remove_output(out, remove_folder=created)  # empty shards would look like a finished dataset
        raise ValueError(_nothing_usable(source, num_rows, skipped, first_skipped, paths_hint))
    if skipped["missing_file"] * 2 >= num_rows:
        log.warning(
            "%s: %d of %d rows name an image file that does not exist, e.g. %s%s",
            source,
            skipped["missing_file"],
            num_rows,
            first_skipped["missing_file"],
            f"; {paths_hint}" if paths_hint else "",
        )
    write_json(out / "sizes.json", sizes)
    summary = {
        "out": str(out),
        "source": source,
        "rows": num_rows,
        "samples": samples,
        "shards": num_shards,
        "resumed_shards": resumed,
        "skipped": dict(sorted(skipped.items())),
        "urls": str(out / f"{{{names[0]}..{names[-1]}}}.tar"),
        **{k: v for k, v in _settings(options, source, extra_settings).items() if k != "source"},
    }
    write_json(out / "_stats.json", {"count": num_rows, "successes": samples, "failed": num_rows - samples, **summary})
    if skipped:
        log.warning(
            "%s: %d samples written, %d rows skipped: %s",
            out,
            samples,
            num_rows - samples,
            ", ".join(f"{n} {kind}" for kind, n in sorted(skipped.items())),
        )
    return summary


def _write_todo(
    out: Path,
    todo: list[ShardJob],
    rows_for: Callable[[int, int], Iterable[Row]],
    options: WriteOptions,
    stats_by_shard: dict[int, dict[str, Any]],
    num_rows: int,
    progress: bool,
) -> Counter[str]:
    """Write the shards still to do, with a progress bar over all rows; ``stats_by_shard`` gains each one's stats.
    Returns the skip counts of every shard, the complete earlier ones included; the first of each kind is logged."""

    def jobs() -> Iterator[ShardJob]:
        for job in todo:
            job.rows = rows_for(job.first_row, job.first_row + job.num_rows)
            yield job

    skipped: Counter[str] = Counter()
    for stats in stats_by_shard.values():
        skipped.update(stats["skipped"])
    bar = tqdm(
        total=num_rows,
        initial=sum(s["count"] for s in stats_by_shard.values()),
        unit="row",
        desc=f"writing {out}",
        disable=not progress,
    )
    with bar:
        for stats in run_jobs(jobs(), write_shard, options.num_workers):
            for kind, where in stats["first_skipped"].items():
                if not skipped[kind]:
                    log.warning("skipping %s: %s (further ones are counted, not logged)", kind.replace("_", " "), where)
            skipped.update(stats["skipped"])
            stats_by_shard[int(stats["shard"].split(".")[0])] = stats
            bar.update(stats["count"])
            if skipped:
                bar.set_postfix(skipped=sum(skipped.values()))
    return skipped


def _nothing_usable(
    source: str, num_rows: int, skipped: Counter[str], first_skipped: dict[str, str], paths_hint: str
) -> str:
    counts = ", ".join(f"{n} {kind}" for kind, n in skipped.most_common())
    common = skipped.most_common(1)[0][0]
    hint = f"; {paths_hint}" if paths_hint and common == "missing_file" else ""
    return (
        f"{source}: none of its {num_rows} rows gave a sample ({counts}), so nothing was written; "
        f"e.g. {first_skipped[common]}{hint}"
    )


# ---------------------------------------------------------------------------------------------------- sources


_URL_ROWS_CHECKED = 1_000  # of a Hugging Face dataset's path column (a table's is checked whole: it is in memory)


def write_from_table(
    path: str | Path,
    out: str | Path,
    image_column: str,
    caption_column: str,
    samples_per_shard: int | None = None,
    resize_to: int | None = None,
    num_workers: int = 2,
    progress: bool = True,
    image_root: str | Path | None = None,
    encoding: str = "utf-8",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Shards from a table of image paths (relative ones resolve against ``image_root``, default the
    table's directory) or image bytes, and captions. Returns the summary also written to ``_stats.json``."""
    options = WriteOptions(
        samples_per_shard=samples_per_shard, resize_to=resize_to, num_workers=num_workers, overwrite=overwrite
    )
    options.check()
    check_output_folder(out)
    images, captions = read_table(path, image_column, caption_column, encoding)
    root = Path(image_root) if image_root is not None else Path(path).resolve().parent
    relative = any(
        isinstance(value, str) and value.strip() and not Path(value.strip()).expanduser().is_absolute()
        for value in images
    )
    paths_hint = (
        f"relative image paths were resolved against {root} "
        f"({'--image-root' if image_root is not None else 'the folder of the table'}); give the folder they start "
        "from with --image-root"
        if relative
        else ""
    )

    def rows_for(start: int, stop: int) -> RowList:
        rows = []
        for index in range(start, stop):
            image, url = image_reference(images[index], root)
            rows.append(Row(index, image, captions[index], url))
        return RowList(rows)

    return write_shards(out, len(images), rows_for, options, str(Path(path).resolve()), progress, paths_hint)


def open_hf_dataset(
    source: Any, split: str | None = None, imagefolder: bool = False, cache_dir: str | None = None
) -> tuple[Any, str]:
    """(``datasets.Dataset``, a name for messages) from a Dataset/DatasetDict, a ``save_to_disk`` directory,
    or (``imagefolder=True``) a folder of images for ``load_dataset("imagefolder", data_dir=...)``."""
    import datasets

    name = "dataset"
    if isinstance(source, (str, Path)):
        name = str(Path(source).resolve())
        if not Path(source).exists():
            raise FileNotFoundError(f"{source}: no such dataset directory")
        if imagefolder:
            source = datasets.load_dataset("imagefolder", data_dir=str(source), cache_dir=cache_dir)
        else:
            try:
                source = datasets.load_from_disk(str(source))
            except FileNotFoundError as exc:
                raise FileNotFoundError(
                    f"{source}: not a dataset saved with save_to_disk ({exc}); for a folder "
                    f"of images with metadata.jsonl use imagefolder"
                ) from None
    if isinstance(source, datasets.DatasetDict):
        splits = list(source)
        chosen = split or ("train" if "train" in splits else splits[0] if len(splits) == 1 else None)
        if chosen not in splits:
            raise ValueError(f"{name}: choose a split with split= / --split (splits: {', '.join(splits)})")
        source, name = source[chosen], f"{name}[{chosen}]"
    if not isinstance(source, datasets.Dataset):
        raise ValueError(f"{name}: expected a datasets.Dataset, got {type(source).__name__}")
    return source, name


def write_from_hf(
    source: Any,
    out: str | Path,
    image_column: str = "image",
    caption_column: str = "text",
    samples_per_shard: int | None = None,
    resize_to: int | None = None,
    num_workers: int = 2,
    progress: bool = True,
    split: str | None = None,
    imagefolder: bool = False,
    cache_dir: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Shards from a Hugging Face dataset (see ``open_hf_dataset``). Image columns of the ``Image`` feature are
    read undecoded, so original bytes are stored; string columns are paths, binary columns image bytes."""
    import datasets

    options = WriteOptions(
        samples_per_shard=samples_per_shard, resize_to=resize_to, num_workers=num_workers, overwrite=overwrite
    )
    options.check()
    check_output_folder(out)
    dataset, name = open_hf_dataset(source, split, imagefolder, cache_dir)
    for role, column in (("image", image_column), ("caption", caption_column)):
        if column not in dataset.column_names:
            raise ValueError(f"{name}: no {role} column {column!r} (columns: {', '.join(dataset.column_names)})")
    dataset = dataset.select_columns(list(dict.fromkeys([image_column, caption_column]))).with_format(None)
    paths_hint = ""
    if isinstance(dataset.features[image_column], datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    elif getattr(dataset.features[image_column], "dtype", None) in ("string", "large_string"):
        first = dataset[:_URL_ROWS_CHECKED][image_column]
        url_list, note = "--url_list FILE.parquet --input_format parquet", "Dataset.to_parquet('FILE.parquet'), then "
        refuse_urls(first, name, image_column, caption_column, url_list, note)
        paths_hint = f"relative image paths were resolved against the current folder, {Path.cwd()}"
    on_disk = bool(dataset.cache_files)  # memory-mapped: workers get the dataset by path, not by value

    def rows_for(start: int, stop: int) -> Iterable[Row]:
        rows = DatasetRows(dataset, image_column, caption_column, start, stop)
        return rows if on_disk or options.num_workers <= 1 else RowList(list(rows))

    return write_shards(out, len(dataset), rows_for, options, name, progress, paths_hint)
