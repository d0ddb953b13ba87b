"""The data plane of a 1,024-GPU run, simulated on one machine without images: plan, pre-empt, checkpoint, resume
on another world size.

    .venv/bin/python bench/data_plane.py            # 200,000 shards × 10,000 samples, 1,024 ranks × 8 workers → 768
    .venv/bin/python bench/data_plane.py --small    # 2,000 × 100, 64 × 4 → 48 (tests/test_data_plane.py)

The shard list is real to the planner and nothing else: a ``sizes.json`` in a temporary folder names every shard
and its sample count, and the shards are ``file://`` URLs to tars that do not exist (``Source.resolve`` checks local
paths only, so the planner never looks for them; a sample is never read). What runs is the library's own code:

1. **Planning.** For a few ranks of the first layout, what each rank does before its first batch:
   ``plan_data`` (brace expansion, ``sizes.json``, the checks), ``build_train_loader``, and the epoch's plan its
   workers read their shards from (``TrainLoader.worker_plans``, epoch mode). Timed without, and measured with,
   tracemalloc.
2. **Training to the middle of the epoch, without decoding.** Every rank trains ``--stop`` of the epoch's steps.
   A worker's stream is its planned shards in order; after it has yielded ``c`` samples its shuffle buffer holds
   about ``--shuffle-buffer`` of the last ones read (each sample read stays with probability (1 - 1/B) per draw,
   as in webdataset's buffer), so the samples trained on are the first ``c`` + buffered of the stream less the
   buffered ones. That is handed to the loader's own bookkeeping (``TrainLoader.consumed``/``produced``,
   ``Consumed.found_sizes`` and ``Consumed.take_mask``, the bulk form of what ``TrainLoader._account`` does per
   batch; for one rank the per-batch path is run too and must give the same state), and each rank's
   ``TrainLoader.state_dict()`` is written as the checkpointer writes it (``data_rank{R}.json``).
3. **Resume on ``--resume-ranks`` ranks.** For a few new ranks: every rank's file read back, ``load_state_dicts``
   (the union of every rank's record) and each worker's plan of the rest of the epoch. Then every new rank trains
   ``--after`` of what is left and writes its checkpoint again (the second pre-emption of the same epoch); one
   rank reloads it on its own layout.
4. **Checks, by set arithmetic per shard** (a whole shard as one flag, a partly read one as a bitmap of its
   samples): the first plan gives every shard to exactly one worker; the union the checkpoint gives equals what
   the simulation trained on; the rest of the epoch reads every other sample exactly once (duplicates: samples
   read by two workers, or trained on before and read again; lost: samples neither trained on nor planned). The
   epoch then ends as ``TrainLoader`` ends it (every rank stops at the step where the first one has no full
   batch), and the samples never trained on must be exactly the leftovers docs/training.md documents: the
   workers' unfilled last batches and what the other ranks hold when the first rank runs dry.

Shard sizes are all equal (``--samples-per-shard``); the numbers are for one process on this machine, which
simulates all ranks in turn. docs/scaling.md has the table and what each row means.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import tracemalloc
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

SMALL = dict(shards=2_000, samples_per_shard=100, ranks=64, workers=4, resume_ranks=48, batch_size=8, shuffle_buffer=20)
PREPROCESS = {"size": (16, 16), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "interpolation": "bicubic"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=200_000)
    parser.add_argument("--samples-per-shard", type=int, default=10_000)
    parser.add_argument("--ranks", type=int, default=1_024, help="world size before the pre-emption")
    parser.add_argument("--workers", type=int, default=8, help="data.num_workers (both layouts)")
    parser.add_argument("--resume-ranks", type=int, default=768, help="world size of the resumed run")
    parser.add_argument("--batch-size", type=int, default=256, help="data.batch_size (per rank)")
    parser.add_argument("--shuffle-buffer", type=int, default=2_000, help="data.shuffle_buffer")
    parser.add_argument("--stop", type=float, default=0.5, help="fraction of the epoch's steps before the pre-emption")
    parser.add_argument("--after", type=float, default=0.25, help="fraction of the rest trained before the 2nd one")
    parser.add_argument("--sample-ranks", type=int, default=3, help="ranks timed for planning and for the reshard")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true", help="the small scale tests/test_data_plane.py runs")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--workdir", type=Path, help="a new folder to keep sizes.json and both checkpoints' files in")
    args = parser.parse_args(argv)
    if args.small:
        for key, value in SMALL.items():
            setattr(args, key, value)
    return args


# ------------------------------------------------------------------------------------------------------- the layout


def write_shard_list(root: Path, shards: int, per_shard: int) -> str:
    """A ``sizes.json`` naming ``shards`` shards of ``per_shard`` samples; the brace pattern of their URLs."""
    width = len(str(shards - 1))
    (root / "sizes.json").write_text(json.dumps({f"{i:0{width}d}.tar": per_shard for i in range(shards)}))
    return f"file://{root}/{{{0:0{width}d}..{shards - 1:0{width}d}}}.tar"


def data_config(urls: str, args: argparse.Namespace):
    from clipforge.data import DataConfig

    return DataConfig(
        train_urls=urls,
        batch_size=args.batch_size,
        num_workers=args.workers,
        shuffle_buffer=args.shuffle_buffer,
        shuffle_initial=min(500, args.shuffle_buffer),
        seed=args.seed,
    )


def tokenizer(texts: list[str]) -> list[str]:  # the loaders here never make a batch
    return texts


def plan_rank(cfg, rank: int, world_size: int) -> tuple[Any, list[list[int]], dict[str, float]]:
    """What rank ``rank`` does before its first batch: its loader, its workers' shard lists, the time of each part."""
    from clipforge.data.loader import build_train_loader
    from clipforge.data.pipeline import plan_data

    start = time.perf_counter()
    plan = plan_data(cfg, world_size)
    planned = time.perf_counter()
    loader = build_train_loader(cfg, PREPROCESS, tokenizer, rank, world_size, plan=plan)
    built = time.perf_counter()
    workers = loader.worker_plans()
    done = time.perf_counter()
    return loader, workers, {"plan_data": planned - start, "loader": built - planned, "worker_plans": done - built}


# ------------------------------------------------------------------------------------- training without decoding


def buffered_ages(consumed: int, buffer: int, rng: np.random.Generator) -> np.ndarray:
    """Ages (samples read since) of what a worker's shuffle buffer holds after it has yielded ``consumed`` samples:
    webdataset's buffer yields a uniform pick among ``buffer``, so a sample read ``a`` draws ago is still there with
    probability (1 - 1/buffer)^(a + 1). Sorted, youngest first."""
    ages = np.arange(min(consumed, 14 * buffer))
    return ages[rng.random(len(ages)) < (1 - 1 / buffer) ** (ages + 1)]


def bits_to_mask(bits: np.ndarray) -> int:
    """A boolean array (index = ordinal) as the bitmap int ``Consumed`` keeps."""
    return int.from_bytes(np.packbits(bits, bitorder="little").tobytes(), "little")


def mask_to_bits(mask: int, size: int) -> np.ndarray:
    raw = np.frombuffer(mask.to_bytes((size + 7) // 8, "little"), dtype=np.uint8)
    return np.unpackbits(raw, bitorder="little")[:size].astype(bool)


class Stream:
    """A worker's stream in epoch mode: its planned shards in order, each less the samples taken before the plan
    (``before_masks``: shard → bitmap), as ``ShardedImageText._read`` yields them."""

    def __init__(self, shards: list[int], per_shard: int, before_masks: dict[int, int]) -> None:
        self.shards, self.per_shard = shards, per_shard
        self.left = [  # the ordinals each planned shard still yields, or None for all of them
            None if shard not in before_masks else np.flatnonzero(~mask_to_bits(before_masks[shard], per_shard))
            for shard in shards
        ]
        lengths = [per_shard if left is None else len(left) for left in self.left]
        self.ends = np.cumsum(lengths)
        self.total = int(self.ends[-1]) if len(self.ends) else 0

    def taken(self, read: int, buffered: np.ndarray) -> tuple[dict[int, int], dict[int, int]]:
        """After ``read`` samples read, of which those at stream positions ``buffered`` sit in the shuffle buffer:
        the taken ordinals by shard (bitmaps), and the shards whose end the reader has passed (their sizes)."""
        masks, ends = {}, {}
        start = 0
        for index, shard in enumerate(self.shards):
            end = int(self.ends[index])
            if start >= read:
                break
            left = self.left[index]
            upto = min(read, end)
            held = buffered[(buffered >= start) & (buffered < upto)] - start
            if upto == end and not len(held) and left is None:
                masks[shard] = (1 << self.per_shard) - 1
            else:
                ordinals = np.arange(upto - start) if left is None else left[: upto - start]
                bits = np.zeros(self.per_shard, dtype=bool)
                bits[ordinals] = True
                bits[ordinals[held]] = False
                masks[shard] = bits_to_mask(bits)
            if end < read:
                ends[shard] = self.per_shard
            start = end
        return masks, ends


def round_robin(steps: int, workers: int) -> list[int]:
    """Batches each worker produced after ``steps`` steps of a rank (the DataLoader takes its workers in turn)."""
    return [len(range(worker, steps, workers)) for worker in range(workers)]


def train_rank(
    loader, rank: int, streams: list[Stream], steps: int, rng: np.random.Generator, truth: dict[int, int]
) -> tuple[dict, int]:
    """Rank ``rank`` trains ``steps`` steps: its loader's position set through its own bookkeeping; the samples
    trained on are added to ``truth`` (shard → bitmap). Returns the loader's ``state_dict()`` and the number of
    samples ``truth`` held already (trained on twice)."""
    from clipforge.data.position import Consumed

    batch, workers = loader.dataset.cfg.batch_size, loader.num_workers
    buffer = loader.dataset.cfg.shuffle_buffer
    loader.dataset.rank = rank
    loader.consumed, loader.produced, loader.taken = {}, {}, Consumed()
    loader.next_worker, twice = steps % workers, 0
    for worker, produced in enumerate(round_robin(steps, workers)):
        consumed = produced * batch
        ages = buffered_ages(consumed, buffer, rng)
        read = consumed + len(ages)
        masks, ends = streams[worker].taken(read, read - 1 - ages)
        loader.consumed[worker], loader.produced[worker] = consumed, produced
        loader.taken.found_sizes(ends, loader.before)
        for shard, mask in masks.items():
            loader.taken.take_mask(shard, mask, loader.before)
            twice += (truth.get(shard, 0) & mask).bit_count()
            truth[shard] = truth.get(shard, 0) | mask
    return loader.state_dict(), twice


def train_rank_per_batch(loader, rank: int, streams: list[Stream], steps: int, seed: int) -> dict:
    """The same as ``train_rank`` through ``TrainLoader._account``, one batch record at a time, as the trainer feeds
    it: every sample named by (shard, ordinal). The state must be the same."""
    from clipforge.data.position import Consumed

    batch, workers = loader.dataset.cfg.batch_size, loader.num_workers
    buffer = loader.dataset.cfg.shuffle_buffer
    rng = np.random.default_rng(seed)
    loader.dataset.rank = rank
    loader.consumed, loader.produced, loader.taken = {}, {}, Consumed()
    records = []
    for worker, produced in enumerate(round_robin(steps, workers)):
        consumed = produced * batch
        ages = buffered_ages(consumed, buffer, rng)
        read = consumed + len(ages)
        masks, ends = streams[worker].taken(read, read - 1 - ages)
        places = [
            (shard, int(ordinal))
            for shard, mask in masks.items()
            for ordinal in np.flatnonzero(mask_to_bits(mask, streams[worker].per_shard))
        ]
        for index in range(produced):
            records.append(
                {
                    "images": True,
                    "worker": worker,
                    "consumed": (index + 1) * batch,
                    "produced": index + 1,
                    "skipped": {},
                    "first_skips": {},
                    "shard_ends": ends if index == produced - 1 else {},
                    "taken": places[index * batch : (index + 1) * batch],
                }
            )
    records.sort(key=lambda record: (record["produced"], record["worker"]))  # the order the rank trains on them
    for record in records:
        loader._account(record)
    return loader.state_dict()


def epoch_steps(slot_samples: np.ndarray, workers: int, batch: int) -> tuple[int, int, int]:
    """How the epoch ends in ``TrainLoader``: (steps every rank trains, samples left in the workers' unfilled last
    batches, samples of full batches the other ranks still hold when the first rank has none)."""
    per_worker = slot_samples.reshape(-1, workers)
    batches = (per_worker // batch).sum(axis=1)
    steps = int(batches.min())
    unfilled = int((per_worker % batch).sum())
    return steps, unfilled, int((batches - steps).sum()) * batch


# ---------------------------------------------------------------------------------------------------- the checks


def samples_of(masks: dict[int, int], done: set[int] | np.ndarray, per_shard: int) -> dict[int, int]:
    full = (1 << per_shard) - 1
    return {**{shard: mask for shard, mask in masks.items() if mask}, **{int(shard): full for shard in done}}


def compare(record, truth: dict[int, int], per_shard: int) -> int:
    """Samples on which a ``Consumed`` record and the simulation's truth (shard → bitmap) differ."""
    mine = samples_of(record.partial, record.done, per_shard)
    return sum((mine.get(shard, 0) ^ truth.get(shard, 0)).bit_count() for shard in set(mine) | set(truth))


def check_rest_of_epoch(
    slots: list[list[int]], before, truth: dict[int, int], shards: int, per_shard: int
) -> dict[str, int]:
    """The rest of the epoch as planned (``slots``: every new worker's shards, read less ``before``'s taken samples)
    against what was trained on (``truth``): duplicates and lost samples, by set arithmetic per shard."""
    full = (1 << per_shard) - 1
    counts = np.bincount(np.fromiter((s for slot in slots for s in slot), dtype=np.int64), minlength=shards)
    trained_whole = np.zeros(shards, dtype=bool)
    trained_whole[[shard for shard, mask in truth.items() if mask == full]] = True
    special = {shard for shard, mask in truth.items() if mask != full} | set(before.partial)
    plain = np.ones(shards, dtype=bool)
    plain[list(special)] = False
    # a plain shard is trained on whole or not at all, and read whole by each worker that plans it
    duplicates = per_shard * int((counts[plain] - (~trained_whole[plain]).astype(np.int64)).clip(min=0).sum())
    lost = per_shard * int(((counts[plain] == 0) & ~trained_whole[plain]).sum())
    planned_in_done = sum(1 for shard in np.flatnonzero(counts) if int(shard) in before.done)
    for shard in special:
        trained = truth.get(shard, 0)
        read = full & ~before.taken(shard).mask  # what ShardedImageText._read yields of it: the untaken ordinals
        duplicates += (
            int(counts[shard]) * (trained & read).bit_count() + max(0, int(counts[shard]) - 1) * read.bit_count()
        )
        lost += (full & ~(trained | (read if counts[shard] else 0))).bit_count()
    return {"duplicates": duplicates, "lost": lost, "done_shards_planned": planned_in_done}


def slot_samples(slots: list[list[int]], before, per_shard: int) -> np.ndarray:
    return np.array([sum(per_shard - len(before.taken(shard)) for shard in slot) for slot in slots], dtype=np.int64)


# ---------------------------------------------------------------------------------------------------------- run


def sampled(world_size: int, count: int) -> list[int]:
    return sorted({0, world_size - 1, *np.linspace(0, world_size - 1, count).astype(int).tolist()})[:count] or [0]


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def traced(function, *arguments) -> float:
    """Peak Python heap of a call, in MB (tracemalloc: what the data plane allocates, not the interpreter)."""
    tracemalloc.start()
    try:
        function(*arguments)
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def write_states(directory: Path, states: list[dict]) -> dict[str, int]:
    """Every rank's data position as the checkpointer writes it (``data_rank{R}.json``): their bytes, the largest
    file's, and the shards the records name (whole, and partly taken: a bitmap each)."""
    from clipforge.train.checkpoint import _write_per_rank

    directory.mkdir(parents=True)
    for rank, state in enumerate(states):
        _write_per_rank(directory, "data", rank, state)
    sizes = [(directory / f"data_rank{rank}.json").stat().st_size for rank in range(len(states))]
    records = [state[part] for state in states for part in ("before", "taken")]
    return {
        "state_bytes": sum(sizes),
        "state_bytes_max_rank": max(sizes),
        "entries_done": sum(len(record["done"]) for record in records),
        "entries_partial": sum(len(record["partial"]) for record in records),
    }


def read_states(directory: Path) -> list[dict]:
    """Every rank's data position as the checkpointer reads it on each rank of the resumed run."""
    from clipforge.train.checkpoint_read import read_ranks
    from clipforge.train.state import PER_RANK, Piece

    return read_ranks(directory, {"data": Piece(PER_RANK, None)})["data"]


def resume_rank(cfg, directory: Path, rank: int, world_size: int) -> tuple[Any, list[list[int]], dict[str, float]]:
    """A rank of the resumed run: its loader planned (not timed here), every rank's file read, the position
    resharded, its workers' plans of the rest of the epoch."""
    from clipforge.data.loader import build_train_loader
    from clipforge.data.pipeline import plan_data

    loader = build_train_loader(cfg, PREPROCESS, tokenizer, rank, world_size, plan=plan_data(cfg, world_size))
    start = time.perf_counter()
    states = read_states(directory)
    read = time.perf_counter()
    loader.load_state_dicts(states)
    loaded = time.perf_counter()
    del states
    workers = loader.worker_plans()
    done = time.perf_counter()
    return loader, workers, {"read": read - start, "load_state_dicts": loaded - read, "worker_plans": done - loaded}


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    import open_clip.tokenizer  # noqa: F401  (build_train_loader imports it: not part of any timing)

    from clipforge.data.position import Consumed

    shards, per_shard, workers, batch = args.shards, args.samples_per_shard, args.workers, args.batch_size
    results: dict[str, Any] = {"setup": {k: v for k, v in vars(args).items() if k not in ("json", "workdir")}}
    cfg = data_config(write_shard_list(workdir, shards, per_shard), args)
    results["rss_after_imports_mb"] = rss_mb()

    # 1. planning, per rank of the first layout
    timings, plans = [], {}
    for rank in sampled(args.ranks, args.sample_ranks):
        loader, plans[rank], times = plan_rank(cfg, rank, args.ranks)
        timings.append(times)
    slots = loader.dataset.plan(workers)  # the whole epoch's plan, the same on every rank
    results["planning"] = {
        "ranks_timed": sorted(plans),
        "seconds_median": statistics.median(t["plan_data"] + t["loader"] + t["worker_plans"] for t in timings),
        "parts_median": {key: statistics.median(t[key] for t in timings) for key in timings[0]},
        "memory_mb": traced(plan_rank, cfg, args.ranks // 2, args.ranks),
        "ranks_agree": all(plans[r] == slots[r * workers : (r + 1) * workers] for r in plans),
        "every_shard_once": bool((np.bincount([s for slot in slots for s in slot], minlength=shards) == 1).all()),
    }

    # 2. every rank trains to the middle of the epoch; its position written as the checkpoint writes it
    steps_first, unfilled_first, dry_first = epoch_steps(slot_samples(slots, Consumed(), per_shard), workers, batch)
    stop = int(steps_first * args.stop)
    truth: dict[int, int] = {}
    rng = np.random.default_rng(args.seed)
    states, twice = [], 0
    started = time.perf_counter()
    for rank in range(args.ranks):
        streams = [Stream(slots[rank * workers + w], per_shard, {}) for w in range(workers)]
        state, overlap = train_rank(loader, rank, streams, stop, rng, truth)
        states.append(state)
        twice += overlap
    simulated = time.perf_counter() - started
    checked = args.ranks // 3  # the per-batch path on one rank gives the same state as the bulk one
    streams = [Stream(slots[checked * workers + w], per_shard, {}) for w in range(workers)]
    bulk, _ = train_rank(loader, checked, streams, stop, np.random.default_rng(1), {})
    same_state = train_rank_per_batch(loader, checked, streams, stop, 1) == bulk
    first_dir = workdir / "step_A"
    written = write_states(first_dir, states)
    union = Consumed.union(Consumed.from_json(state[part]) for state in states for part in ("before", "taken"))
    del states
    trained_before = sum(mask.bit_count() for mask in truth.values())
    results["first_run"] = {
        "steps_per_epoch": steps_first,
        "stopped_at_step": stop,
        "samples_trained": trained_before,
        "simulated_seconds": simulated,
        "per_batch_path_same_state": same_state,
        "samples_trained_twice": twice,
        "record_differs_from_truth": compare(union, truth, per_shard),
        "done_shards": len(union.done),
        "partial_shards": len(union.partial),
        **written,
        "whole_epoch_unfilled": unfilled_first,
        "whole_epoch_dry_rank_tail": dry_first,
    }

    # 3. resume on another world size: every rank's files read, the union, the rest of the epoch planned
    timings, new_plans = [], {}
    for rank in sampled(args.resume_ranks, args.sample_ranks):
        resumed, new_plans[rank], times = resume_rank(cfg, first_dir, rank, args.resume_ranks)
        timings.append(times)
    new_slots, before = resumed.dataset.plan(workers), resumed.before
    results["reshard"] = {
        "ranks_timed": sorted(new_plans),
        "seconds_median": statistics.median(sum(t.values()) for t in timings),
        "parts_median": {key: statistics.median(t[key] for t in timings) for key in timings[0]},
        "memory_mb": traced(resume_rank, cfg, first_dir, args.resume_ranks // 2, args.resume_ranks),
        "ranks_agree": all(new_plans[r] == new_slots[r * workers : (r + 1) * workers] for r in new_plans),
        "union_differs_from_truth": compare(before, truth, per_shard),
    }
    check = check_rest_of_epoch(new_slots, before, truth, shards, per_shard)
    left = slot_samples(new_slots, before, per_shard)
    steps, unfilled, dry = epoch_steps(left, workers, batch)
    trained_after = steps * batch * args.resume_ranks
    missing = shards * per_shard - trained_before - trained_after
    results["rest_of_epoch"] = {
        **check,
        "samples_planned": int(left.sum()),
        "steps": steps,
        "samples_trained": trained_after,
        "missing": missing,
        "unfilled_batches": unfilled,
        "dry_rank_tail": dry,
        "missing_is_documented": missing == unfilled + dry and check["lost"] == 0,
        "one_batch_per_worker": args.resume_ranks * workers * batch,
    }

    # 4. the resumed run trains on and is pre-empted again in the same epoch; one rank reloads on its own layout
    again = int(steps * args.after)
    before_masks = dict(before.partial)
    both = dict(truth)
    states, twice = [], 0
    for rank in range(args.resume_ranks):
        streams = [Stream(new_slots[rank * workers + w], per_shard, before_masks) for w in range(workers)]
        state, overlap = train_rank(resumed, rank, streams, again, rng, both)
        states.append(state)
        twice += overlap
    second_dir = workdir / "step_B"
    written = write_states(second_dir, states)
    whole = Consumed.union(Consumed.from_json(state[part]) for state in states for part in ("before", "taken"))
    del states
    reloaded, _, reload_times = resume_rank(cfg, second_dir, args.resume_ranks // 2, args.resume_ranks)
    results["second_checkpoint"] = {
        "steps_after_resume": again,
        **written,
        "before_bytes": len(json.dumps(before.to_json(), sort_keys=True)),  # the epoch's record, whole
        "samples_trained_twice": twice,
        "record_differs_from_truth": compare(whole, both, per_shard),
        "same_layout_keeps_before": reloaded.before == before,
        "same_layout_load_seconds": reload_times["read"] + reload_times["load_state_dicts"],
    }
    results["peak_rss_mb"] = rss_mb()
    return results


# ---------------------------------------------------------------------------------------------------------- table


def megabytes(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def table(results: dict[str, Any]) -> str:
    """The results as docs/scaling.md shows them: what was measured, the figure, how it breaks down."""
    setup, planning, first = results["setup"], results["planning"], results["first_run"]
    reshard, rest, second = results["reshard"], results["rest_of_epoch"], results["second_checkpoint"]
    ranks, new, workers = setup["ranks"], setup["resume_ranks"], setup["workers"]
    plan, shard = planning["parts_median"], reshard["parts_median"]
    differ = first["record_differs_from_truth"] + reshard["union_differs_from_truth"]
    differ += second["record_differs_from_truth"]
    twice = first["samples_trained_twice"] + second["samples_trained_twice"]
    rows = [
        (
            f"planning per rank ({ranks:,} × {workers}; "
            f"median of ranks {', '.join(map(str, planning['ranks_timed']))})",
            f"{planning['seconds_median']:.2f} s",
            f"plan_data {plan['plan_data']:.2f} s + loader {plan['loader']:.2f} s + its workers' plan "
            f"{plan['worker_plans']:.2f} s; the same plan on every rank: {planning['ranks_agree']}, every shard once: "
            f"{planning['every_shard_once']}",
        ),
        (
            f"data state, checkpoint at step {first['stopped_at_step']:,} of {first['steps_per_epoch']:,}",
            megabytes(first["state_bytes"]),
            f"{ranks:,} files, the largest {first['state_bytes_max_rank']:,} B; {first['samples_trained']:,} samples "
            f"trained on: {first['done_shards']:,} shards done, {first['partial_shards']:,} partly",
        ),
        (
            f"reshard {ranks:,} → {new:,} ranks (median of ranks {', '.join(map(str, reshard['ranks_timed']))})",
            f"{reshard['seconds_median']:.2f} s",
            f"{ranks:,} files read {shard['read']:.2f} s + load_state_dicts {shard['load_state_dicts']:.2f} s + its "
            f"workers' plan of the rest {shard['worker_plans']:.2f} s; the same plan on every rank: "
            f"{reshard['ranks_agree']}",
        ),
        (
            f"data state, checkpoint {second['steps_after_resume']:,} steps after the resume",
            megabytes(second["state_bytes"]),
            f"{new:,} files, the largest {second['state_bytes_max_rank']:,} B, holding between them the record the "
            f"resumed plan was made from ({megabytes(second['before_bytes'])}) once; reloaded on {new:,} ranks: "
            f"{second['same_layout_load_seconds']:.2f} s, the same record: {second['same_layout_keeps_before']}",
        ),
        (
            "memory per rank: planning / reshard",
            f"{planning['memory_mb']:.0f} MB / {reshard['memory_mb']:.0f} MB",
            f"peak Python heap (tracemalloc); the bench process peaked at {results['peak_rss_mb']:,.0f} MB RSS "
            f"({results['rss_after_imports_mb']:,.0f} MB after importing torch and open_clip)",
        ),
        (
            "samples trained twice (must be 0)",
            f"{rest['duplicates'] + twice:,}",
            f"the rest of the epoch against what was trained on; done shards planned again: "
            f"{rest['done_shards_planned']}; the checkpoints' records against the simulation: {differ:,} samples apart",
        ),
        ("samples lost by the reshard (must be 0)", f"{rest['lost']:,}", "neither trained on nor planned"),
        (
            "samples never trained on in the epoch",
            f"{rest['missing']:,}",
            f"unfilled last batches {rest['unfilled_batches']:,} + what the other ranks hold when the first runs dry "
            f"{rest['dry_rank_tail']:,}; the documented leftovers exactly: {rest['missing_is_documented']}",
        ),
        (
            f"the same for a whole epoch at {ranks:,} ranks",
            f"{first['whole_epoch_unfilled'] + first['whole_epoch_dry_rank_tail']:,}",
            f"unfilled {first['whole_epoch_unfilled']:,} + dry-rank tail {first['whole_epoch_dry_rank_tail']:,}",
        ),
    ]
    return "\n".join(["| | | |", "|---|---|---|"] + [f"| {what} | {figure} | {how} |" for what, figure, how in rows])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=False)
        results = run(args, args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="data_plane_") as workdir:
            results = run(args, Path(workdir))
    load = os.getloadavg()
    print(
        f"{platform.node()} · {os.cpu_count()} CPUs · Python {platform.python_version()} · {date.today()} · "
        f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}"
    )
    setup = results["setup"]
    print(
        f"{setup['shards']:,} shards × {setup['samples_per_shard']:,} samples, {setup['ranks']:,} ranks × "
        f"{setup['workers']} workers → {setup['resume_ranks']:,}, batch {setup['batch_size']}, shuffle buffer "
        f"{setup['shuffle_buffer']}\n"
    )
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    return results


def exact(results: dict[str, Any]) -> bool:
    """Every check of the simulation holds: no sample twice, none lost, the records are what was trained on, and
    the epoch's leftovers are the documented ones."""
    first, rest, second = results["first_run"], results["rest_of_epoch"], results["second_checkpoint"]
    return (
        first["samples_trained_twice"] == second["samples_trained_twice"] == rest["duplicates"] == 0
        and first["record_differs_from_truth"] == second["record_differs_from_truth"] == 0
        and results["reshard"]["union_differs_from_truth"] == 0
        and rest["missing_is_documented"]
        and first["per_batch_path_same_state"]
        and second["same_layout_keeps_before"]
    )


if __name__ == "__main__":
    sys.exit(0 if exact(main()) else 1)
