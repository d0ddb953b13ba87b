"""The training stream as one rank's workers make it: sources → shard plan per rank and worker → tar samples →
shuffle → decode → batches.

This module owns the dataset (``ShardedImageText``), the plan (``plan_data``, ``DataPlan``, ``assign_shards``) and
the making of batches. ``loader.py`` runs the dataset epoch after epoch on every rank (``TrainLoader``,
``build_train_loader``): epoch turnover, the ranks' agreement each step, the data position a checkpoint holds.

Two modes (``data.mode``):

* ``epoch``: each epoch the shards of all sources are permuted with a seed shared by every rank and
  split disjointly over ranks × workers, balanced by their sample counts where known. Each sample is
  seen at most once per epoch. Ranks whose shards hold fewer samples run dry first; the ``TrainLoader``
  ends the epoch on every rank together when one has none (see ``loader.py``), and the samples left on
  the other ranks are dropped for that epoch (as OpenCLIP drops the tail). The shards are balanced over
  the ranks first, then over each rank's workers (``assign_shards``), so a rank holds at most one shard's
  samples more than the first to run dry: equal shards that do not divide evenly over the ranks drop up
  to one shard on each rank that got one more (bench/data_plane.py, docs/scaling.md).
* ``resampled``: every worker draws shards with replacement (source ∝ weight / mean shard size, so
  that weights are per-sample proportions; shard uniform within the source), seeded by (seed,
  epoch, rank, worker). An epoch is ``epoch_samples`` samples (default: all sources' samples), the
  same number of batches on every rank.

Each worker reads its tars with ``samples.read_tar`` (local, ``pipe:`` or fsspec streams, see
``sources.py``), shuffles samples in a seeded buffer, decodes images (``images.py``), reads and
cleans the caption (``samples.py``), tokenizes whole batches and yields uint8 image batches, so the
main process only receives tensors. When an objective asks for the ``regions`` field, each sample's
``KEY.regions.json`` is read too and its boxes follow the image into its crop (``regions.py``).

Bad input is skipped and counted by kind (``samples.SKIP_KINDS``), never slow (no sleeping handler).
Each batch carries its worker's running counts and the first occurrence of each kind; the
``TrainLoader`` logs each kind once per run with its shard and key, and ``TrainLoader.skipped`` sums
the counts (they go to the training metrics). With ``data.strict`` any of them stops the run instead.

Nothing spins forever: a worker that reads ``data.max_skips_in_a_row`` samples (or opens as many shards) without
keeping one raises a one-line ``DataError`` naming the sources and the skip counts. Worker errors travel as records,
not as exceptions, so the main process raises them as one line rather than a wrapped worker traceback.

Exact resume: every batch carries how many shuffled samples its worker has consumed (and, in
resampled mode, how many batches it has produced). The ``TrainLoader`` keeps that position; on
resume each worker replays its shard plan and shuffle, drops the consumed samples before decoding
them, and the worker order is rotated so that the DataLoader's round robin continues where it
stopped. Augmentation and caption choice are seeded per sample from its place in the stream, so the
resumed run sees exactly the batches the uninterrupted one would have.

Resume on another layout (world size, ``num_workers``, ``batch_size``): every batch also names the samples it
read, as (shard, ordinal in the shard), which the ``TrainLoader`` records (``position.Consumed``). Given every rank's
record unioned (``TrainLoader.reshard``), ``ShardedImageText.plan`` splits the shards and samples not yet taken over
this run's ranks × workers; in resampled mode the streams are drawn afresh for the rest of the epoch
(``_restart_tag``). docs/training.md has the table.
"""

from __future__ import annotations

import copy
import hashlib
import heapq
import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from clipforge.data.config import DataConfig
from clipforge.data.images import ImageTransform
from clipforge.data.position import Consumed
from clipforge.data.regions import RegionsProblem, collate_regions, crop_regions, parse_regions, requested_regions
from clipforge.data.samples import DataError, SampleDecoder, SkipCounter, read_tar
from clipforge.data.sources import Source, open_shard
from clipforge.data.teacher import TeacherEmbeddings

log = logging.getLogger(__name__)

__all__ = ["DataConfig", "DataError", "DataPlan", "ShardedImageText", "StopRequested", "plan_data"]


class StopRequested(Exception):
    """A stop (pre-emption signal) was requested while this rank waited for data; every rank raises it together."""


PLAN_VERSION = 2  # 1: shards balanced over ranks × workers at once, the extra shards on the first ranks


def assign_shards(
    shards: list[str], sizes: dict[str, int | None], seed: int, epoch: int, slots: int, ranks: int = 1
) -> list[list[str]]:
    """Split ``shards`` into ``slots`` (``ranks`` × workers, rank-major) disjoint lists with balanced sample counts,
    the same on every rank.

    The shards are permuted (seeded by seed and epoch), then placed largest first on the least loaded rank, and a
    rank's largest first on its least loaded worker; each slot keeps the permuted order. Unknown sizes count as the
    mean known size. Balancing the ranks first bounds what the epoch's end drops: it ends for every rank when one
    runs dry, and the ranks' samples differ by at most one shard's (balanced over all slots at once, equal shards
    that do not divide evenly put all the extra ones on the first ranks: 8 shards a rank at 1,024 × 8 workers).
    """
    order = list(shards)
    random.Random(f"{seed}-shards-{epoch}").shuffle(order)
    known = [v for v in sizes.values() if v is not None]
    default = sum(known) / len(known) if known else 1.0
    position = {shard: i for i, shard in enumerate(order)}
    weight = {shard: sizes.get(shard) if sizes.get(shard) is not None else default for shard in order}
    by_weight = sorted(order, key=lambda s: -weight[s])  # stable: equal sizes keep the permuted order
    workers = slots // ranks
    out = [slot for rank in _least_loaded(by_weight, weight, ranks) for slot in _least_loaded(rank, weight, workers)]
    for slot_shards in out:
        slot_shards.sort(key=position.__getitem__)
    return out


def _least_loaded(items: list, weight: dict, bins: int) -> list[list]:
    """Each of ``items`` in turn to the bin with the least weight so far (the first of equal ones)."""
    heap = [(0.0, index) for index in range(bins)]
    out: list[list] = [[] for _ in range(bins)]
    for item in items:
        load, index = heap[0]
        out[index].append(item)
        heapq.heapreplace(heap, (load + weight[item], index))
    return out


def _unchanged(text: str) -> str:
    return text


def tokenizer_for_cleaned_captions(tokenizer: Callable) -> Callable:
    """``tokenizer`` for captions ``samples.clean_caption`` has already cleaned.

    open_clip's ``SimpleTokenizer`` cleans every text it encodes (ftfy, HTML unescaping twice, whitespace), the
    rule ``clean_caption`` applies to every caption as it is read; a second pass of it would be a fifth of a worker's
    time per sample. For its 'lower' and 'whitespace' rules a copy that only lower-cases (or keeps the text)
    gives the tokens open_clip's tokenizer gives the raw caption (tests/test_samples.py). Any other tokenizer or
    rule is used as it is."""
    from open_clip import tokenizer as open_clip_tokenizer

    # open_clip's private rule functions, looked up with getattr: a release that renames them costs a second
    # cleaning of each caption (the tokenizer is returned as it is), not an import error
    lower = getattr(open_clip_tokenizer, "_clean_lower", None)
    whitespace = getattr(open_clip_tokenizer, "_clean_whitespace", None)
    rule = getattr(tokenizer, "clean_fn", None)
    simple = isinstance(tokenizer, open_clip_tokenizer.SimpleTokenizer)
    if not simple or rule is None or rule not in (lower, whitespace):
        return tokenizer
    cleaned = copy.copy(tokenizer)  # the model's own tokenizer (zero-shot prompts) keeps its cleaning
    cleaned.clean_fn = str.lower if rule is lower else _unchanged
    return cleaned


class ShardedImageText(IterableDataset):
    """Yields whole batches: {"images" (uint8), "texts", "keys", "worker", "consumed", "produced", "skipped"}."""

    def __init__(
        self,
        sources: list[Source],
        cfg: DataConfig,
        transform: ImageTransform,
        tokenizer: Callable,
        rank: int = 0,
        world_size: int = 1,
        mode: str = "epoch",
        normalize_in_workers: bool = False,
        fields: tuple = (),
        trim_text: bool = False,
    ) -> None:
        self.sources, self.cfg, self.transform = sources, cfg, transform
        self.tokenizer = tokenizer_for_cleaned_captions(tokenizer)
        self.normalize_in_workers = normalize_in_workers
        # batches carry caption_ids / image_ids (content hashes) when an objective asks for either (loss.positives)
        self.sample_ids = any(field in ("caption_ids", "image_ids") for field in fields)
        # the grounded regions (clipforge.data.regions) when an objective asks for them: at most this many a sample
        self.max_regions = requested_regions(fields)
        self.sample_fields = [  # made per sample, by name
            field for field in fields if not isinstance(field, str) and getattr(field, "name", None) != "regions"
        ]
        self.trim_text = trim_text  # token batches end at their longest caption (models.enable_text_trimming)
        self.rank, self.world_size, self.mode = rank, world_size, mode
        self.shards = [shard for source in sources for shard in source.shards]
        self.sizes = {shard: size for source in sources for shard, size in source.sizes.items()}
        self.epoch = 0
        self.before = Consumed()  # epoch mode: what this epoch had taken when its plan was made (see position.py)
        self.planned: tuple | None = None  # epoch mode: the last plan made, and what it was made from (see plan)
        self.samples_before = 0  # resampled mode: samples of this epoch trained on before these streams started
        self.resume_consumed: dict[int, int] = {}
        self.resume_produced: dict[int, int] = {}
        self.worker_batches: dict[int, int] = {}  # resampled mode: batches each logical worker yields per epoch
        self.rotation = 0
        self.stop_requested: Callable[[], bool] | None = None  # polled per sample when loading in-process

    def shards_for(self, logical_worker: int, num_workers: int) -> Iterator[int]:
        """Indices into ``self.shards``: this worker's part of the epoch's plan, or its endless resampled draws."""
        if self.mode == "epoch":
            yield from self.plan(num_workers)[self.rank * num_workers + logical_worker]
            return
        rng = random.Random(f"{self.cfg.seed}-resample-{self.epoch}-{self.rank}-{logical_worker}{self._restart_tag()}")
        weights = [source.weight / source.mean_shard_size() for source in self.sources]  # per-sample proportions
        index = {shard: i for i, shard in enumerate(self.shards)}
        while True:
            source = rng.choices(self.sources, weights)[0]
            yield index[rng.choice(source.shards)]

    def plan(self, num_workers: int) -> list[list[int]]:
        """Epoch mode: the shards still to read (those not done in ``self.before``), split over world size × workers,
        balanced by the samples each still holds. The permutation depends on the seed and epoch only.

        The plan is kept until the epoch or ``before`` changes: the ``TrainLoader`` makes it before its workers start,
        and they inherit it instead of each making it again (a second or two at 200,000 shards)."""
        made_from = (self.epoch, self.world_size, num_workers)
        if self.planned is not None and self.planned[0] == made_from and self.planned[1] is self.before:
            return self.planned[2]
        remaining = [i for i in range(len(self.shards)) if i not in self.before.done]
        sizes = {}
        for i in remaining:
            size = self.before.sizes.get(i, self.sizes.get(self.shards[i]))
            sizes[i] = None if size is None else size - len(self.before.taken(i))
        slots = self.world_size * num_workers
        plan = assign_shards(remaining, sizes, self.cfg.seed, self.epoch, slots, self.world_size)
        self.planned = (made_from, self.before, plan)
        return plan

    def _restart_tag(self) -> str:
        """Resampled streams restarted mid-epoch (another layout) draw afresh, not the start of the old ones."""
        return f"-after{self.samples_before}" if self.samples_before else ""

    def _read(
        self, shards: Iterator[int], counter: SkipCounter, unkept: list[int], worker: int, ends: dict[int, int]
    ) -> Iterator[dict[str, Any]]:
        """The samples of ``shards``, each with its ``__place__`` (shard, ordinal), less those taken before this
        plan; ``ends`` gets each shard's sample count when its end is reached."""
        for shard in shards:
            url = self.shards[shard]
            self._count_unkept(unkept, counter, worker)  # a plan of shards that yield nothing must not spin forever
            try:
                stream = open_shard(url)
            except Exception as exn:
                counter.skip("unreadable_shard", url, f"{type(exn).__name__}: {exn}")
                ends[shard] = 0
                continue
            taken, ordinal = self.before.taken(shard), 0
            try:
                for ordinal, sample in enumerate(read_tar(url, stream, counter), start=1):
                    if ordinal - 1 not in taken:
                        sample["__place__"] = (shard, ordinal - 1)
                        yield sample
                ends[shard] = ordinal
            finally:
                try:
                    stream.close()
                except Exception as exn:  # e.g. a pipe: command that exited non-zero
                    counter.skip("unreadable_shard", url, f"{type(exn).__name__}: {exn}")

    def _count_unkept(self, unkept: list[int], counter: SkipCounter, worker: int) -> None:
        """One more sample read (or shard opened) since a sample was last kept; too many in a row is an error."""
        unkept[0] += 1
        if unkept[0] <= self.cfg.max_skips_in_a_row:
            return
        counts = ", ".join(f"{kind} {n}" for kind, n in counter.counts.most_common()) or "no samples at all"
        first = counter.first[counter.counts.most_common(1)[0][0]] if counter.counts else "-"
        sources = " + ".join(source.urls for source in self.cfg.source_configs())
        raise DataError(
            f"rank {self.rank} worker {worker}: {unkept[0] - 1} samples or shards in a row gave no usable "
            f"sample (data.max_skips_in_a_row={self.cfg.max_skips_in_a_row}) from {sources}; skipped so "
            f"far: {counts}; first: {first}"
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        num_workers = info.num_workers if info else 1
        worker = ((info.id if info else 0) + self.rotation) % num_workers  # logical id, see module doc
        counter = SkipCounter(self.cfg.strict)
        position = {"worker": worker, "consumed": 0, "produced": self.resume_produced.get(worker, 0)}
        ends: dict[int, int] = {}  # shard → sample count, found since the last record
        tail: list[str] = []  # the keys of the last, unfilled batch
        try:
            yield from self._batches(worker, num_workers, counter, position, ends, tail)
        except DataError as exn:  # sent as a record: re-raised in the main process as one line, not a traceback
            yield {"images": None, **position, **self._counts(counter, ends), "error": str(exn)}
            return
        # A last record without images carries the final counts (skips after the last full batch) and the number of
        # samples left over in the unfilled batch (epoch mode drops them, as every epoch's end does).
        yield {"images": None, **position, **self._counts(counter, ends), "unbatched": len(tail)}

    @staticmethod
    def _counts(counter: SkipCounter, ends: dict[int, int]) -> dict[str, Any]:
        counts = {"skipped": dict(counter.counts), "first_skips": dict(counter.first), "shard_ends": dict(ends)}
        ends.clear()
        return counts

    def _batches(
        self,
        worker: int,
        num_workers: int,
        counter: SkipCounter,
        position: dict[str, int],
        ends: dict[int, int],
        keys: list[str],
    ) -> Iterator[dict[str, Any]]:
        unkept = [0]
        samples = self._read(self.shards_for(worker, num_workers), counter, unkept, worker, ends)
        restart = self._restart_tag()
        rng = random.Random(f"{self.cfg.seed}-buffer-{self.epoch}-{self.rank}-{worker}{restart}")
        shuffled = wds.filters._shuffle(samples, self.cfg.shuffle_buffer, self.cfg.shuffle_initial, rng=rng)
        skip = self.resume_consumed.get(worker, 0)
        quota = self.worker_batches.get(worker) if self.mode == "resampled" else None
        # with regions, the transform also gives the crop's box, so that the boxes follow the image into it
        decode = SampleDecoder(
            self.transform if self.max_regions is None else self.transform.with_crop_box, self.cfg.caption_key
        )
        teacher = TeacherEmbeddings(self.cfg.teacher) if self.cfg.teacher else None
        images, texts, ids, taken, rows, made, regions = [], [], [], [], [], {}, []
        place = f"{self.cfg.seed}-{self.epoch}-{self.rank}-{worker}{restart}"
        for sample in shuffled:
            if quota is not None and position["produced"] >= quota:
                break
            if self.stop_requested is not None and self.stop_requested():  # in-process loading (no workers)
                raise StopRequested
            position["consumed"] += 1
            if position["consumed"] <= skip:
                continue
            taken.append(sample["__place__"])
            row = teacher.lookup(sample["__url__"], sample["__key__"]) if teacher is not None else None
            if teacher is not None and row is None:  # looked up by (shard, key): nothing can misalign it
                counter.skip(
                    "missing_teacher", f"{sample['__url__']}:{sample['__key__']}", f"not in {self.cfg.teacher}"
                )
                self._count_unkept(unkept, counter, worker)
                continue
            decoded = decode(sample, counter, random.Random(f"{place}-{position['consumed']}"))
            if decoded is not None and self.max_regions is not None:
                (image, crop), caption, extension = decoded
                decoded = image, caption, extension
                try:
                    found = parse_regions(sample["regions.json"]) if "regions.json" in sample else []
                    regions.append(crop_regions(found, crop, self.max_regions))
                except RegionsProblem as problem:
                    counter.skip("bad_regions", f"{sample['__url__']}:{sample['__key__']}", str(problem))
                    decoded = None
            if decoded is None:
                self._count_unkept(unkept, counter, worker)
                continue
            unkept[0] = 0
            images.append(decoded[0])
            texts.append(decoded[1])
            keys.append(sample["__key__"])
            if row is not None:
                rows.append(row)
            if self.sample_ids:
                ids.append((stable_id(decoded[1].encode()), stable_id(sample[decoded[2]])))
            for field in self.sample_fields:
                made.setdefault(field.name, []).append(field.function(decoded[0], decoded[1]))
            if len(images) == self.cfg.batch_size:
                position["produced"] += 1
                yield self._collate(images, texts, keys, ids, position, counter, ends, taken, rows, made, regions)
                images, texts, ids, taken, rows, made, regions = [], [], [], [], [], {}, []
                keys.clear()

    def _collate(
        self,
        images: list[torch.Tensor],
        texts: list[str],
        keys: list[str],
        ids: list[tuple[int, int]],
        position: dict[str, int],
        counter: SkipCounter,
        ends: dict[int, int],
        taken: list[tuple[int, int]],
        teacher_rows: list[tuple[Any, Any]] = (),
        made: dict[str, list[torch.Tensor]] | None = None,
        regions: list[tuple[list, list[str]]] = (),
    ) -> dict[str, Any]:
        stacked = torch.stack(images)
        if self.normalize_in_workers:
            stacked = self.transform.normalize(stacked)
        tokens = self.tokenizer(texts)
        if self.trim_text:  # drop the columns after the batch's last end-of-text token (the highest id)
            tokens = tokens[:, : int(tokens.argmax(dim=1).max()) + 1].contiguous()
        batch = {
            "images": stacked,
            "texts": tokens,
            "keys": list(keys),
            **position,
            **self._counts(counter, ends),
            "taken": taken if self.mode == "epoch" else [],  # (shard, ordinal) of every sample read since the last
        }
        if self.sample_ids:
            batch["caption_ids"], batch["image_ids"] = torch.tensor(ids, dtype=torch.int64).unbind(1)
        for name, values in (made or {}).items():  # the objectives' own per-sample fields, (B, *shape)
            batch[name] = torch.stack(values).float()
        if self.max_regions is not None:  # region_boxes (B, R, 4), region_captions (B, R, L), region_count (B,)
            batch.update(collate_regions(list(regions), self.max_regions, self.tokenizer))
        if teacher_rows:  # (B, D_teacher) each
            batch["teacher_image"] = torch.from_numpy(np.stack([image for image, _ in teacher_rows]))
            batch["teacher_text"] = torch.from_numpy(np.stack([text for _, text in teacher_rows]))
        return batch


def stable_id(data: bytes) -> int:
    """A 63-bit content hash (BLAKE2b): equal captions / image files get equal ids on every rank and worker."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


@dataclass(frozen=True)
class DataPlan:
    """The training data as a run reads it, decided before any sample is: the resolved sources (their shards and
    sample counts) and the mode (``data.shard_shortage=resample`` turns a short epoch mode into resampled)."""

    sources: list[Source]
    mode: str

    @property
    def num_shards(self) -> int:
        return sum(len(source.shards) for source in self.sources)

    @property
    def num_samples(self) -> int | None:
        """Samples in all sources (from ``num_samples`` or the counts beside the shards); None if one is unknown."""
        counts = [source.num_samples for source in self.sources]
        return None if any(count is None for count in counts) else sum(counts)

    def steps_per_epoch(self, batch_size: int, world_size: int, epoch_samples: int | None = None) -> int | None:
        """Batches per rank per epoch: exact in resampled mode, an upper bound in epoch mode (None if unknown)."""
        global_batch = batch_size * world_size
        if self.mode == "resampled":
            total = epoch_samples or sum(source.num_samples or 0 for source in self.sources)
            return max(1, total // global_batch)
        sizes = {shard: size for source in self.sources for shard, size in source.sizes.items()}
        if any(size is None for size in sizes.values()):
            return None
        return sum(sizes.values()) // global_batch


def plan_data(cfg: DataConfig, world_size: int) -> DataPlan:
    """The sources resolved and the mode chosen for ``world_size`` ranks × ``cfg.num_workers`` readers, with every
    check that needs no sample: shards exist, enough of them to split disjointly (epoch mode), the counts resampled
    mode needs, and no source (or epoch) without a sample or a full batch where the counts are known. Raises
    ``ValueError`` (``FileNotFoundError`` when no shard exists) naming the key and the shards."""
    configs = cfg.source_configs()
    sources = [Source.resolve(source, i) for i, source in enumerate(configs)]
    if cfg.teacher is not None:
        TeacherEmbeddings(cfg.teacher)  # a wrong folder fails here, not in a worker
    for i, source in enumerate(sources):
        if source.num_samples == 0:
            counted = (
                f"data.sources[{i}].num_samples is 0"
                if configs[i].num_samples is not None
                else f"its {len(source.shards)} shards ({configs[i].urls}) hold 0 samples by the sizes.json or "
                "*_stats.json beside them"
            )
            raise ValueError(
                f"data.sources[{i}]: {counted}: nothing to train on (clipforge prep inspect shows what the shards hold)"
            )
    mode = cfg.mode
    num_shards = sum(len(source.shards) for source in sources)
    slots = world_size * max(1, cfg.num_workers)
    if mode == "epoch":
        for i, source in enumerate(sources):
            if source.weight != 1.0 and len(sources) > 1:
                raise ValueError(
                    f"data.sources[{i}].weight={source.weight}: weights only apply in resampled mode "
                    "(epoch mode reads every sample once); set data.mode=resampled"
                )
        if num_shards < slots:
            message = (
                f"data.sources: {num_shards} shards cannot feed world_size × num_workers = {slots} readers disjointly"
            )
            if cfg.shard_shortage == "error":
                raise ValueError(
                    message + "; write more, smaller shards, lower data.num_workers, or set "
                    "data.shard_shortage=resample"
                )
            log.warning("%s: switching to resampled mode (data.shard_shortage=resample)", message)
            mode = "resampled"
    unknown = [i for i, source in enumerate(sources) if source.num_samples is None]
    if mode == "resampled" and unknown and cfg.epoch_samples is None:
        raise ValueError(
            f"data.sources[{unknown[0]}]: resampled mode needs the sample count: set its num_samples, or "
            "data.epoch_samples, or write sizes.json beside the shards"
        )
    if mode == "resampled" and unknown and len(sources) > 1:  # weights are shares of samples, not of shards
        raise ValueError(
            f"data.sources[{unknown[0]}]: resampled mode needs its sample count to weight sources by "
            "samples: set its num_samples, or write sizes.json beside the shards"
        )
    plan = DataPlan(sources, mode)
    if plan.steps_per_epoch(cfg.batch_size, world_size) == 0:  # epoch mode, every count known
        raise ValueError(
            f"data.sources: {plan.num_samples} samples in all ({' + '.join(c.urls for c in configs)}) make no full "
            f"global batch of {cfg.batch_size * world_size} (data.batch_size {cfg.batch_size} × world size "
            f"{world_size}), so an epoch has no step: lower data.batch_size, or add data"
        )
    return plan
