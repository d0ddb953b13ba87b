"""The training stream: sources → shard plan per rank and worker → tar samples → shuffle → decode → batches.

Two modes (``data.mode``):

* ``epoch``: each epoch the shards of all sources are permuted with a seed shared by every rank and
  split disjointly over ranks × workers, balanced by their sample counts where known. Each sample is
  seen at most once per epoch. Ranks whose shards hold fewer samples run dry first; so that no rank
  ever waits in a collective for a peer that has stopped, every step the ranks agree (one tiny
  all-reduce on a CPU process group) on whether all still have a batch, and the epoch ends for all
  of them together when one has none. The samples left on the other ranks are dropped for that
  epoch (as OpenCLIP drops the tail); balancing keeps that to less than a batch per worker.
* ``resampled``: every worker draws shards with replacement (source ∝ weight / mean shard size, so
  that weights are per-sample proportions; shard uniform within the source), seeded by (seed,
  epoch, rank, worker). An epoch is ``epoch_samples`` samples (default: all sources' samples), the
  same number of batches on every rank.

With several ranks the ``TrainLoader`` asks the ranks every step, in both modes, in one tiny all-reduce:
does everyone have a batch, has no rank's data failed, has no rank been asked to stop while it waited?

Each worker reads its tars with ``samples.read_tar`` (local, ``pipe:`` or fsspec streams, see
``sources.py``), shuffles samples in a seeded buffer, decodes images (``images.py``), reads and
cleans the caption (``samples.py``), tokenizes whole batches and yields uint8 image batches, so the
main process only receives tensors.

Bad input is skipped and counted by kind (``samples.SKIP_KINDS``), never slow (no sleeping handler).
Each batch carries its worker's running counts and the first occurrence of each kind; the
``TrainLoader`` logs each kind once per run with its shard and key, and ``TrainLoader.skipped`` sums
the counts (they go to the training metrics). With ``data.strict`` any of them stops the run instead.

Nothing spins or waits forever: a worker that reads ``data.max_skips_in_a_row`` samples (or opens as many
shards) without keeping one, or a rank that waits ``data.max_wait_seconds`` for a batch, stops every rank with
a one-line ``DataError`` naming the sources and the skip counts. Worker errors travel as records, not as
exceptions, so the main process raises them as one line rather than a wrapped worker traceback.

Exact resume: every batch carries how many shuffled samples its worker has consumed (and, in
resampled mode, how many batches it has produced). The ``TrainLoader`` state (epoch, consumed and
produced per worker, which worker is next) goes into the checkpoint; on resume each worker replays
its shard plan and shuffle, drops the consumed samples before decoding them, and the worker order
is rotated so that the DataLoader's round robin continues where it stopped. Augmentation and
caption choice are seeded per sample from its place in the stream, so the resumed run sees exactly
the batches the uninterrupted one would have.

Resume on another layout (world size, ``num_workers``, ``batch_size``): every batch also names the samples it
read, as (shard, ordinal in the shard), and each rank records those it trained on (``position.Consumed``). A run
of another layout unions every rank's record (``TrainLoader.reshard``) and plans the rest of the epoch over its
own ranks × workers from the shards and samples not yet taken (``ShardedImageText.plan``); in resampled mode it
counts the samples trained on and draws fresh streams for the rest of the epoch. docs/training.md has the table.
"""

from __future__ import annotations

import atexit
import copy
import hashlib
import heapq
import logging
import random
import signal
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clipforge.data.config import DataConfig
from clipforge.data.images import ImageTransform
from clipforge.data.position import Consumed
from clipforge.data.samples import DataError, SampleDecoder, SkipCounter, read_tar
from clipforge.data.sources import Source, open_shard
from clipforge.data.teacher import TeacherEmbeddings

log = logging.getLogger(__name__)

POLL_SECONDS = 1.0  # how often a rank waiting for its workers checks for a stop request and for a stall

__all__ = ["DataConfig", "DataError", "DataPlan", "StopRequested", "TrainLoader", "build_train_loader", "plan_data"]


class StopRequested(Exception):
    """A stop (pre-emption signal) was requested while this rank waited for data; every rank raises it together."""


def assign_shards(
    shards: list[str], sizes: dict[str, int | None], seed: int, epoch: int, slots: int
) -> list[list[str]]:
    """Split ``shards`` into ``slots`` disjoint lists with balanced sample counts, the same on every rank.

    The shards are permuted (seeded by seed and epoch), then placed largest first on the least loaded
    slot; each slot keeps the permuted order. Unknown sizes count as the mean known size.
    """
    order = list(shards)
    random.Random(f"{seed}-shards-{epoch}").shuffle(order)
    known = [v for v in sizes.values() if v is not None]
    default = sum(known) / len(known) if known else 1.0
    position = {shard: i for i, shard in enumerate(order)}
    weight = {shard: sizes.get(shard) if sizes.get(shard) is not None else default for shard in order}
    heap = [(0.0, slot) for slot in range(slots)]
    out: list[list[str]] = [[] for _ in range(slots)]
    for shard in sorted(order, key=lambda s: -weight[s]):  # stable: equal sizes keep the permuted order
        load, slot = heapq.heappop(heap)
        out[slot].append(shard)
        heapq.heappush(heap, (load + weight[shard], slot))
    for slot_shards in out:
        slot_shards.sort(key=position.__getitem__)
    return out


def _unchanged(text: str) -> str:
    return text


def tokenizer_for_cleaned_captions(tokenizer: Callable) -> Callable:
    """``tokenizer`` for captions ``samples.clean_caption`` has already cleaned.

    open_clip's ``SimpleTokenizer`` cleans every text it encodes (ftfy, HTML unescaping twice, whitespace), the
    rule ``clean_caption`` applies to every caption as it is read; a second pass of it was a fifth of a worker's
    time per sample. For its 'lower' and 'whitespace' rules a copy that only lower-cases (or keeps the text)
    gives the tokens open_clip's tokenizer gives the raw caption (tests/test_samples.py). Any other tokenizer or
    rule is used as it is."""
    from open_clip import tokenizer as open_clip_tokenizer

    # open_clip's private rule functions: if a release renames them, captions are simply cleaned twice again
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
        self.sample_fields = [field for field in fields if not isinstance(field, str)]  # made per sample, by name
        self.trim_text = trim_text  # token batches end at their longest caption (models.enable_text_trimming)
        self.rank, self.world_size, self.mode = rank, world_size, mode
        self.shards = [shard for source in sources for shard in source.shards]
        self.sizes = {shard: size for source in sources for shard, size in source.sizes.items()}
        self.epoch = 0
        self.before = Consumed()  # epoch mode: what this epoch had taken when its plan was made (see position.py)
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
        balanced by the samples each still holds. The permutation depends on the seed and epoch only."""
        remaining = [i for i in range(len(self.shards)) if i not in self.before.done]
        sizes = {}
        for i in remaining:
            size = self.before.sizes.get(i, self.sizes.get(self.shards[i]))
            sizes[i] = None if size is None else size - len(self.before.taken(i))
        return assign_shards(remaining, sizes, self.cfg.seed, self.epoch, self.world_size * num_workers)

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
        decode = SampleDecoder(self.transform, self.cfg.caption_key)
        teacher = TeacherEmbeddings(self.cfg.teacher) if self.cfg.teacher else None
        images, texts, ids, taken, rows, made = [], [], [], [], [], {}
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
                yield self._collate(images, texts, keys, ids, position, counter, ends, taken, rows, made)
                images, texts, ids, taken, rows, made = [], [], [], [], [], {}
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
        if teacher_rows:  # (B, D_teacher) each
            batch["teacher_image"] = torch.from_numpy(np.stack([image for image, _ in teacher_rows]))
            batch["teacher_text"] = torch.from_numpy(np.stack([text for _, text in teacher_rows]))
        return batch


def stable_id(data: bytes) -> int:
    """A 63-bit content hash (BLAKE2b): equal captions / image files get equal ids on every rank and worker."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


def _ignore_stop_signals(worker_id: int) -> None:
    """Pre-emption signals (SLURM sends them to every process of the step) are the trainer's business: a worker
    that died of one would take the epoch down with it; workers exit with their parent instead."""
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def _all_ranks_agree(*flags: bool) -> bool | tuple[bool, ...]:
    return flags[0] if len(flags) == 1 else flags


def _never() -> bool:
    return False


def _close_at_exit(loader: weakref.ref) -> None:
    if (alive := loader()) is not None:
        alive.close()


class TrainLoader:
    """Endless iterator over training batches, epoch after epoch, whose position can be saved.

    ``agree(*flags) -> tuple`` must return each flag True only if it is True on every rank (a MIN all-reduce).
    With several ranks it is asked every step, in both modes: does every rank have a batch (in epoch mode the
    epoch ends for all when one has none), has no rank's data failed (a ``DataError`` on one rank stops every
    rank, which would otherwise wait in the step's collectives), and has no rank been asked to stop while it
    waited for data (``StopRequested`` on every rank). The batch a rank holds when the ranks agree to stop is
    not counted as consumed: the resumed run reads it again.

    ``stop_requested()`` is polled while this rank waits for its workers (every ``POLL_SECONDS``) or, without
    workers, per sample, so a pending pre-emption stops even a loader that produces nothing.
    """

    def __init__(
        self,
        dataset: ShardedImageText,
        num_workers: int,
        prefetch_factor: int = 4,
        pin_memory: bool = False,
        agree: Callable[..., Any] = _all_ranks_agree,
        stop_requested: Callable[[], bool] = _never,
    ) -> None:
        self.dataset, self.num_workers, self.transform = dataset, num_workers, dataset.transform
        self.prefetch_factor, self.pin_memory, self.agree = prefetch_factor, pin_memory, agree
        self.stop_requested = stop_requested
        self.epoch = 0
        self.consumed: dict[int, int] = {}
        self.produced: dict[int, int] = {}
        self.before = Consumed()  # epoch mode: what the epoch had taken when its plan was made (another layout's)
        self.taken: Consumed | None = Consumed()  # epoch mode: what this rank trained on since (None: not recorded)
        self.samples_before = 0  # resampled mode: samples of the epoch trained on before its streams (re)started
        self.unbatched: dict[int, int] = {}  # epoch → samples left in workers' unfilled last batches
        self.next_worker = 0
        self.epoch_skipped: dict[int, dict[str, int]] = {}
        self.skipped_before: Counter[str] = Counter()
        self._iterator: Iterator | None = None
        self._epoch_yielded = False
        self._logged: set[str] = set()
        # A script that iterates without calling close() would hang at exit (see close); registered after
        # multiprocessing's own exit handler (imported with torch), so it runs before that joins the workers.
        atexit.register(_close_at_exit, weakref.ref(self))

    @property
    def steps_per_epoch(self) -> int | None:
        """Batches per rank per epoch: exact in resampled mode, an upper bound in epoch mode (None if unknown)."""
        plan = DataPlan(self.dataset.sources, self.dataset.mode)
        return plan.steps_per_epoch(
            self.dataset.cfg.batch_size, self.dataset.world_size, self.dataset.cfg.epoch_samples
        )

    @property
    def skipped(self) -> dict[str, int]:
        total = Counter(self.skipped_before)
        for counts in self.epoch_skipped.values():
            total.update(counts)
        return dict(total)

    def _start_epoch(self) -> Iterator:
        if self.dataset.mode == "resampled":  # this epoch's batches, split over the workers
            global_batch = self.dataset.cfg.batch_size * self.dataset.world_size
            steps = self.steps_per_epoch if not self.samples_before else self._samples_left() // global_batch
            workers = max(1, self.num_workers)
            self.dataset.worker_batches = {w: steps // workers + (w < steps % workers) for w in range(workers)}
        self.dataset.before, self.dataset.samples_before = self.before, self.samples_before
        self.dataset.epoch = self.epoch
        self.dataset.resume_consumed = dict(self.consumed)
        self.dataset.resume_produced = dict(self.produced)
        self.dataset.rotation = self.next_worker
        self.dataset.stop_requested = None if self.num_workers else self.stop_requested
        loader = DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor if self.num_workers else None,
            worker_init_fn=_ignore_stop_signals if self.num_workers else None,
            timeout=POLL_SECONDS if self.num_workers else 0,
        )
        return iter(loader)

    def __iter__(self) -> TrainLoader:
        return self

    def close(self) -> None:
        """Stop the current epoch's workers now. They ignore SIGTERM (pre-emption is the trainer's business), so
        the interpreter's exit, which terminates daemonic children and then joins them, would wait for them
        forever if the iterator had not been collected by then; the trainer calls this when it is done, and an
        exit handler calls it for a loader still open when the interpreter exits."""
        iterator, self._iterator = self._iterator, None
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is None:  # no workers, or none started
            return
        shutdown()  # done event + a None to each worker; joins them with a timeout
        for worker in getattr(iterator, "_workers", []):
            if worker.is_alive():
                worker.kill()
                worker.join(timeout=10)

    def _receive(self) -> dict[str, Any] | None:
        """The next record from this epoch's workers, or None at its end; a stop request or a stall raises."""
        waiting_since = time.monotonic()
        while True:
            try:
                return next(self._iterator)
            except StopIteration:
                return None
            except RuntimeError as exn:  # the DataLoader's timeout: nothing has arrived for POLL_SECONDS
                if "timed out" not in str(exn):
                    raise
            if self.stop_requested():
                raise StopRequested
            waited = time.monotonic() - waiting_since
            limit = self.dataset.cfg.max_wait_seconds
            if limit and waited > limit:
                sources = " + ".join(source.urls for source in self.dataset.cfg.source_configs())
                raise DataError(
                    f"rank {self.dataset.rank}: no batch from {sources} for {waited:.0f} s "
                    f"(data.max_wait_seconds={limit:g}); skipped so far: {self.skipped or 'nothing'}"
                )

    def _samples_left(self) -> int:
        total = self.dataset.cfg.epoch_samples or sum(s.num_samples or 0 for s in self.dataset.sources)
        return max(0, total - self.samples_before)

    def _account(self, record: dict[str, Any]) -> None:
        """Take a record's position and skip counts into this loader's state (a batch once every rank has one)."""
        worker = record.pop("worker")
        self.consumed[worker] = record.pop("consumed")
        self.produced[worker] = record.pop("produced")
        self.epoch_skipped[worker] = record.pop("skipped")
        if self.taken is not None:
            self.taken.found_sizes(record.pop("shard_ends"), self.before)
            self.taken.take(record.pop("taken", ()), self.before)
        if "unbatched" in record:
            self.unbatched[self.epoch] = self.unbatched.get(self.epoch, 0) + record.pop("unbatched")
        for kind, message in record.pop("first_skips").items():
            if kind not in self._logged:
                self._logged.add(kind)
                log.warning("skipping %s (further ones are counted, not logged)", message)
        if record["images"] is not None:
            self.next_worker = (worker + 1) % max(1, self.num_workers)

    def _next_in_epoch(self) -> dict[str, Any] | None:
        """The next batch of the current epoch on this rank (not yet accounted), or None when its epoch is over."""
        if self._iterator is None:
            self._iterator = self._start_epoch()
            self._epoch_yielded = False
        while True:
            record = self._receive()
            if record is None or record["images"] is not None:
                return record
            error = record.pop("error", None)
            self._account(record)  # a worker's last record: its final counts
            if error is not None:
                raise DataError(error)

    def __next__(self) -> dict[str, Any]:
        empty_epochs = 0
        distributed = self.dataset.world_size > 1
        while True:
            batch, error, stopping = None, None, False
            try:
                batch = self._next_in_epoch()
            except DataError as exn:
                error = exn
            except StopRequested:
                stopping = True
            have, healthy, go_on = batch is not None, error is None, not stopping
            if distributed:  # every rank ends the epoch, fails or stops at the same step
                have, healthy, go_on = self.agree(have, healthy, go_on)
            if not healthy:
                raise error or DataError(
                    f"rank {self.dataset.rank}: another rank's training data failed (its log "
                    "says why); every rank stops"
                )
            if not go_on:
                raise StopRequested
            if have:
                self._account(batch)
                self._epoch_yielded = True
                return batch
            self._iterator = None
            for counts in self.epoch_skipped.values():
                self.skipped_before.update(counts)
            log.info(
                "epoch %d ends: %d samples left in unfilled batches", self.epoch, self.unbatched.get(self.epoch, 0)
            )
            self.epoch, self.next_worker = self.epoch + 1, 0
            self.consumed, self.produced, self.epoch_skipped = {}, {}, {}
            self.before, self.taken, self.samples_before = Consumed(), Consumed(), 0
            empty_epochs = 0 if self._epoch_yielded else empty_epochs + 1
            self._epoch_yielded = False
            if empty_epochs == 2:  # a resumed epoch may legitimately be empty; two in a row cannot
                sources = " + ".join(source.urls for source in self.dataset.cfg.source_configs())
                raise DataError(
                    f"{len(self.dataset.shards)} shards ({sources}) yielded no full batch of "
                    f"{self.dataset.cfg.batch_size} in two epochs on some rank (this is rank "
                    f"{self.dataset.rank}); check data.sources and data.batch_size; skipped: "
                    f"{self.skipped or 'nothing'}"
                )

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "consumed": {str(k): v for k, v in self.consumed.items()},
            "produced": {str(k): v for k, v in self.produced.items()},
            "next_worker": self.next_worker,
            "num_workers": self.num_workers,
            "mode": self.dataset.mode,
            "batch_size": self.dataset.cfg.batch_size,
            "world_size": self.dataset.world_size,
            "skipped": self.skipped,
            "num_shards": len(self.dataset.shards),
            "before": self.before.to_json(),
            "taken": None if self.taken is None else self.taken.to_json(),
            "samples_before": self.samples_before,
        }

    def load_state_dicts(self, states: list[dict[str, Any]]) -> None:
        """Every rank's saved position, by rank (the checkpointer's call). With the same world size, workers, batch
        size and mode, this rank takes its own and resumes bit-identically (``load_state_dict``); otherwise the
        epoch's remaining samples are redistributed over this run's ranks and workers (``reshard``)."""
        rank, layout = self.dataset.rank, self._layout()
        if len(states) == self.dataset.world_size and all(states[rank].get(k, v) == v for k, v in layout.items()):
            self.load_state_dict(states[rank])
        else:
            self.reshard(states)

    def _layout(self) -> dict[str, Any]:
        return {
            "num_workers": self.num_workers,
            "batch_size": self.dataset.cfg.batch_size,
            "world_size": self.dataset.world_size,
            "mode": self.dataset.mode,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """This rank's own saved position, written with this run's layout: the same batches as the run that saved it."""
        for key, have in self._layout().items():
            if state.get(key, have) != have:
                raise ValueError(
                    f"cannot resume the data position exactly: the checkpoint was written with "
                    f"{key}={state[key]}, this run has {have}"
                )
        self.epoch = int(state["epoch"])
        self.consumed = {int(k): int(v) for k, v in state["consumed"].items()}
        self.produced = {int(k): int(v) for k, v in state.get("produced", {}).items()}
        self.next_worker = int(state["next_worker"])
        self.skipped_before = Counter(state.get("skipped", {}))
        self.before = Consumed.from_json(state["before"]) if "before" in state else Consumed()
        self.taken = Consumed.from_json(state["taken"]) if state.get("taken") is not None else None
        self.samples_before = int(state.get("samples_before", 0))
        self.epoch_skipped = {}
        self._iterator = None

    def reshard(self, states: list[dict[str, Any]]) -> None:
        """Resume from every rank's position saved by a run of another layout (world size, workers, batch size).

        Epoch mode: the samples every rank trained on in the epoch are unioned; the shards and samples left are
        split over this run's ranks and workers (``ShardedImageText.plan``), so the rest of the epoch reads each of
        them once. Resampled mode: the samples trained on are counted; the epoch goes on with fresh streams for what
        is left of ``epoch_samples``. Either way the next epoch is an ordinary one of this layout."""
        mode = self.dataset.mode
        first = states[0]
        if first.get("mode", mode) != mode:
            raise ValueError(
                f"cannot resume the data position: the checkpoint was written in data.mode={first['mode']}, this "
                f"run has {mode}; resume with data.mode={first['mode']}"
            )
        if first.get("num_shards", len(self.dataset.shards)) != len(self.dataset.shards):
            raise ValueError(
                f"cannot resume the data position: the checkpoint's sources had {first['num_shards']} shards, "
                f"this run's have {len(self.dataset.shards)}"
            )
        if len({int(state["epoch"]) for state in states}) > 1:
            raise ValueError("cannot resume the data position: the checkpoint's ranks are in different epochs")
        if mode == "epoch" and any(state.get("taken") is None for state in states):
            raise ValueError(
                "cannot resume the data position on another world size, data.num_workers or data.batch_size: this "
                "checkpoint does not record which samples were trained on (written before 2026-12-01, or resumed "
                "from one in this epoch); resume it with its own "
                + ", ".join(f"{k}={first.get(k)}" for k in ("world_size", "num_workers", "batch_size"))
            )
        self.epoch = int(first["epoch"])
        if mode == "epoch":
            records = [Consumed.from_json(state[part]) for state in states for part in ("before", "taken")]
            self.before = Consumed.union(records)
        else:
            produced = sum(int(n) * int(s["batch_size"]) for s in states for n in s.get("produced", {}).values())
            self.samples_before = int(first.get("samples_before", 0)) + produced
        self.taken = Consumed()
        self.consumed, self.produced, self.next_worker, self.epoch_skipped = {}, {}, 0, {}
        rank = self.dataset.rank
        self.skipped_before = Counter(states[rank].get("skipped", {}) if rank < len(states) else {})
        self._iterator = None
        log.info(
            "data position of %d ranks × %s workers, batch %s, redistributed over %d × %d, batch %d: epoch %d, %s",
            len(states),
            first.get("num_workers"),
            first.get("batch_size"),
            self.dataset.world_size,
            self.num_workers,
            self.dataset.cfg.batch_size,
            self.epoch,
            f"{self.samples_before} samples trained on"
            if mode == "resampled"
            else f"{len(self.before.done)} shards done, {len(self.before.partial)} partly read",
        )


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


def build_train_loader(
    cfg: DataConfig,
    preprocess_cfg: dict[str, Any],
    tokenizer: Callable,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
    agree: Callable[..., Any] = _all_ranks_agree,
    normalize_in_workers: bool = False,
    fields: tuple = (),
    trim_text: bool = False,
    stop_requested: Callable[[], bool] = _never,
    plan: DataPlan | None = None,
) -> TrainLoader:
    """The training loader for this rank. ``preprocess_cfg`` is open_clip's (``model.visual.preprocess_cfg``):
    output size, mean, std, interpolation. Batches hold uint8 images and ``loader.transform.normalize`` makes
    the model's float input from them on the training device; with ``normalize_in_workers`` (training on a
    CPU) the workers do that and batches arrive normalised (``normalize`` then passes them through). ``fields``
    are the batch fields the objectives declared (``clipforge.losses.objective``): with ``caption_ids`` or
    ``image_ids`` batches hold both (int64 (B,), 63-bit BLAKE2b hashes of the cleaned caption and of the image
    file's bytes); a ``SampleField`` (a name and a function of the uint8 image (3, H, W) and the caption) is made
    for every kept sample in the workers and stacked as float32 (B, *shape) under its name. With ``trim_text``
    each batch's tokens stop after its longest caption's end-of-text token (for a model ``enable_text_trimming``
    accepted).
    ``plan`` is ``plan_data(cfg, world_size)`` when the caller has made it already (its checks ran then)."""
    plan = plan or plan_data(cfg, world_size)
    transform = ImageTransform.from_preprocess_cfg(preprocess_cfg, train=True, max_pixels=cfg.max_image_pixels)
    dataset = ShardedImageText(
        plan.sources,
        cfg,
        transform,
        tokenizer,
        rank,
        world_size,
        plan.mode,
        normalize_in_workers,
        tuple(fields),
        trim_text,
    )
    return TrainLoader(dataset, cfg.num_workers, cfg.prefetch_factor, pin_memory, agree, stop_requested)
