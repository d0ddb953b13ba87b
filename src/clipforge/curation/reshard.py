"""Writing the samples a filter kept as new shards: ``clipforge prep reshard SHARDS --kept DIR --out OUT``.

Reads the source shards with the training reader (``samples.read_tar``), keeps the samples named in ``kept.tsv``
(shard name, key), and writes them, every member as it was, to ``OUT/00000.tar`` … (``shards.write_tar``: atomic,
fixed mtime) with ``sizes.json`` and ``_stats.json``. Keys stay as they were (img2dataset keys start with their
shard's number, so they stay unique and still name the source); two kept samples with one key stop the run.

With ``--embeddings SCORES_DIR`` the kept samples' embeddings are written beside the new shards, in
``clipforge.data.teacher``'s format, with ``teacher.json``: ``data.teacher: OUT`` then trains on them.

The data card (``OUT/reshard_card.json`` and ``.md``) says how many samples were asked for, found and written.

Each new shard is marked by its ``NNNNN_stats.json``, as ``prep table`` marks its shards
(``clipforge.data.prep_output``): OUT may hold only an earlier reshard's output, which is written again whole with the
same settings and refused with other settings unless ``overwrite``; files prep did not write are refused either way.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from clipforge.curation.card import write_card
from clipforge.curation.filter import read_kept
from clipforge.data.inspection import shard_paths
from clipforge.data.prep_output import (
    announce_shard,
    check_output_folder,
    claim_output,
    finish_shard,
    remove_output,
    write_json,
)
from clipforge.data.samples import SkipCounter, read_tar
from clipforge.data.shards import write_tar
from clipforge.data.sources import open_shard
from clipforge.data.teacher import TeacherEmbeddings, shard_name, write_shard_embeddings


def _kept_samples(urls: list[str], wanted: dict[str, set[str]], counter: SkipCounter) -> Iterator[dict[str, Any]]:
    for url in urls:
        keys = wanted.get(shard_name(url))
        if not keys:
            continue
        with open_shard(url) as stream:
            for sample in read_tar(url, stream, counter):
                if sample["__key__"] in keys:
                    yield sample


def reshard(
    shards: str,
    kept: str,
    out: str,
    samples_per_shard: int = 1_000,
    embeddings: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the kept samples of ``shards`` to ``out``; returns the data card."""
    if samples_per_shard <= 0:
        raise ValueError(f"--samples-per-shard: must be positive, got {samples_per_shard}")
    started = time.monotonic()
    destination = check_output_folder(out)
    listing = read_kept(kept)
    wanted, urls = _wanted(listing, kept, shards)
    teacher = TeacherEmbeddings(embeddings) if embeddings is not None else None
    settings = {
        "source": os.path.abspath(shards),
        "kept": os.path.abspath(kept),
        "samples_per_shard": samples_per_shard,
        "embeddings": None if embeddings is None else os.path.abspath(embeddings),
    }
    created = not destination.exists()
    claim_output(destination, settings, overwrite, names=[])  # the same settings: written again, whole
    counter = SkipCounter()
    samples = _kept_samples(urls, wanted, counter)
    sizes: dict[str, int] = {}
    while True:
        batch = [sample for _, sample in zip(range(samples_per_shard), samples)]
        if not batch:
            break
        name = f"{len(sizes):05d}"
        announce_shard(destination, name, settings)
        sizes[f"{name}.tar"] = write_tar(destination / f"{name}.tar", (_member_dict(s) for s in batch))
        if teacher is not None:
            _write_embeddings(teacher, destination, name, batch, embeddings)
        finish_shard(destination, name, settings, {"count": len(batch), "successes": len(batch)})
    total = sum(sizes.values())
    if not total:
        remove_output(destination, remove_folder=created)
        raise ValueError(
            f"{kept}: none of its {len(listing)} samples is in {shards}"
            + (f" (read problems: {dict(counter.counts)})" if counter.counts else "")
            + ", so nothing was written; was the list made from these shards?"
        )
    write_json(destination / "sizes.json", sizes)
    write_json(destination / "_stats.json", {"count": total, "successes": total, "failed_to_download": 0})
    if teacher is not None:
        shutil.copyfile(Path(embeddings) / "teacher.json", destination / "teacher.json")
    card = {
        "step": "reshard",
        "input": shards,
        "output": str(destination),
        "samples_in": len(listing),
        "samples_out": total,
        "rules": [],
        "extra": {
            "kept_list": str(kept),
            "shards_written": len(sizes),
            "samples_per_shard": samples_per_shard,
            "not_found": len(listing) - total,
            "read_problems": dict(counter.counts),
            "embeddings": embeddings,
        },
        "seconds": round(time.monotonic() - started, 2),
    }
    write_card(destination, "reshard_card", card)
    return card


def _wanted(listing, kept: str, shards: str) -> tuple[dict[str, set[str]], list[str]]:
    """The kept keys by shard name, and the shard paths; an empty or ambiguous list, or a shard not among
    ``shards``, is an error naming it."""
    if listing.empty:
        raise ValueError(f"{kept}: lists no samples (the filter kept none), so there is nothing to write")
    duplicated = listing["key"].duplicated()
    if duplicated.any():
        row = listing[duplicated].iloc[0]
        raise ValueError(
            f"{kept}: key {row['key']} is kept from two shards (again in {row['shard']}); keys must be unique"
        )
    wanted: dict[str, set[str]] = {}
    for shard, key in zip(listing["shard"], listing["key"]):
        wanted.setdefault(shard, set()).add(key)
    urls = [str(path) for path in shard_paths(shards)]
    missing = sorted(set(wanted) - {shard_name(url) for url in urls})
    if missing:
        raise FileNotFoundError(f"{kept}: names shard {missing[0]}, which is not among {shards}")
    return wanted, urls


def _member_dict(sample: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in sample.items() if key == "__key__" or not key.startswith("__")}


def _write_embeddings(teacher: TeacherEmbeddings, out: Path, name: str, batch: list[dict], source: str) -> None:
    rows = [teacher.lookup(sample["__url__"], sample["__key__"]) for sample in batch]
    absent = [sample for sample, row in zip(batch, rows) if row is None]
    if absent:
        raise ValueError(
            f"--embeddings {source}: no row for {absent[0]['__url__']}:{absent[0]['__key__']} "
            f"({len(absent)} samples of new shard {name} lack one)"
        )
    image = np.stack([row[0] for row in rows])
    text = np.stack([row[1] for row in rows])
    write_shard_embeddings(out, name, [sample["__key__"] for sample in batch], image, text)
