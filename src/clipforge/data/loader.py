"""The training loader: the dataset of ``pipeline.py`` run epoch after epoch on each rank, the ranks kept in step,
and its position saved and restored, on the same layout or another.

Entry point: ``build_train_loader(cfg.data, ...)`` (called by ``clipforge.train.build``). ``TrainLoader`` owns:

* epoch turnover: a fresh DataLoader over ``ShardedImageText`` for each epoch, which ends when this rank's workers
  have no full batch left; two epochs in a row without a batch are a ``DataError``.
* the ranks' agreement: with several ranks, every step, in both modes, one tiny all-reduce (``agree``, a MIN on a
  CPU process group) asks: does every rank have a batch, has no rank's data failed, has no rank been asked to stop
  while it waited? In epoch mode the ranks whose shards hold fewer samples run dry first, and the epoch ends for
  all of them together when one has none, so that no rank ever waits in a collective for a peer that has stopped.
* waiting, bounded: a rank that waits ``data.max_wait_seconds`` for a batch stops every rank with a one-line
  ``DataError`` naming the sources and the skip counts; a stop request while it waits is ``StopRequested`` on
  every rank.
* the data position (``state_dict``): the epoch, the samples consumed and batches produced per worker, which worker
  is next, the skip counts, and the samples this rank trained on (``position.Consumed``). On the same layout a rank
  resumes bit-identically (``load_state_dict``); on another world size, ``num_workers`` or ``batch_size``
  ``reshard`` unions every rank's record and the dataset plans the rest of the epoch from it. docs/training.md has
  the table.

What the position costs at scale (bench/data_plane.py, docs/scaling.md): the record a resharded epoch's plan was
made from (``before``) is the same on every rank, and as large as the whole run's records together, so each rank
stores only its shards ≡ rank (mod world size) of it (``before_split``) and ``load_state_dicts`` reassembles it
(``load_state_dict`` alone refuses such a part). The plan is made once per rank, before the workers start, which
inherit it. A position also names the shard assignment it was planned by (``plan``, ``pipeline.PLAN_VERSION``): one
written by another assignment on several ranks goes on through ``reshard`` (sample-exact), since its workers' counts
mean nothing on this plan.
"""

from __future__ import annotations

import atexit
import logging
import signal
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from clipforge.data.config import DataConfig
from clipforge.data.images import ImageTransform
from clipforge.data.pipeline import PLAN_VERSION, DataPlan, ShardedImageText, StopRequested, plan_data
from clipforge.data.position import Consumed
from clipforge.data.samples import DataError

log = logging.getLogger(__name__)

POLL_SECONDS = 1.0  # how often a rank waiting for its workers checks for a stop request and for a stall

__all__ = ["TrainLoader", "build_train_loader"]


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

    def worker_plans(self) -> list[list[int]]:
        """Epoch mode: the shards (indices into ``dataset.shards``) each of this rank's workers reads, in order, from
        the position this loader holds now: what the workers' ``shards_for`` give when the epoch (re)starts."""
        self._hand_position()
        workers = max(1, self.num_workers)
        return [list(self.dataset.shards_for(worker, workers)) for worker in range(workers)]

    def _hand_position(self) -> None:
        """The dataset (which the workers get a copy of) takes the epoch and the position from this loader."""
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
        if self.dataset.mode == "epoch":  # made once here, not once per worker
            self.dataset.plan(max(1, self.num_workers))

    def _start_epoch(self) -> Iterator:
        self._hand_position()
        loader = DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor if self.num_workers else None,
            worker_init_fn=_ignore_stop_signals if self.num_workers else None,
            timeout=POLL_SECONDS if self.num_workers else 0,
            # Starting an iterator draws the workers' base seed from this generator. From the global one it would
            # shift every later model-side draw (patch dropout, LoRA dropout) after a resume, whose restored RNG
            # state is the checkpoint's; the data's own randomness is seeded explicitly and never reads it.
            generator=torch.Generator().manual_seed(self.epoch * 1_000_003 + self.dataset.rank),
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
            # the record before this epoch's plan is the same on every rank: each stores its 1 / world size of it
            "before": self.before.to_json(part=(self.dataset.rank, self.dataset.world_size)),
            "before_split": self.dataset.world_size,
            "plan": PLAN_VERSION,
            "taken": None if self.taken is None else self.taken.to_json(),
            "samples_before": self.samples_before,
        }

    def load_state_dicts(self, states: list[dict[str, Any]]) -> None:
        """Every rank's saved position, by rank (the checkpointer's call). With the same world size, workers, batch
        size and mode, this rank takes its own and resumes bit-identically (``load_state_dict``); otherwise the
        epoch's remaining samples are redistributed over this run's ranks and workers (``reshard``)."""
        rank, layout = self.dataset.rank, self._layout()
        same = len(states) == self.dataset.world_size and all(states[rank].get(k, v) == v for k, v in layout.items())
        if same and not self._same_plan(states[rank]):  # the samples it records are placed on this run's plan
            log.info(
                "data position planned by shard assignment %s, this run's is %s",
                states[rank].get("plan", 1),
                PLAN_VERSION,
            )
            same = False
        if same:
            before = Consumed.union(Consumed.from_json(state["before"]) for state in states if "before" in state)
            self.load_state_dict(states[rank], before)
        else:
            self.reshard(states)

    def _same_plan(self, state: dict[str, Any]) -> bool:
        """Whether ``state`` was written on this version's shard assignment (``pipeline.PLAN_VERSION``); it only
        matters for several ranks in epoch mode (one rank's plan is the same in every version)."""
        return self.dataset.mode != "epoch" or self.dataset.world_size == 1 or state.get("plan", 1) == PLAN_VERSION

    def _layout(self) -> dict[str, Any]:
        return {
            "num_workers": self.num_workers,
            "batch_size": self.dataset.cfg.batch_size,
            "world_size": self.dataset.world_size,
            "mode": self.dataset.mode,
        }

    def load_state_dict(self, state: dict[str, Any], before: Consumed | None = None) -> None:
        """This rank's own saved position, written with this run's layout: the same batches as the run that saved it.
        ``before`` is the union of every rank's part of the record before the epoch's plan (``load_state_dicts``
        makes it); a rank's state alone holds all of it only at world size 1."""
        if before is None and state.get("before_split", 1) > 1:
            raise ValueError(
                f"rank {self.dataset.rank}'s data position holds 1/{state['before_split']} of what the epoch had "
                "taken before its plan: load every rank's with load_state_dicts"
            )
        if not self._same_plan(state):
            raise ValueError(
                f"rank {self.dataset.rank}'s data position was planned by another shard assignment (version "
                f"{state.get('plan', 1)}, this one is {PLAN_VERSION}): load every rank's with load_state_dicts, which "
                "goes on from the samples they record"
            )
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
        if before is None:
            before = Consumed.from_json(state["before"]) if "before" in state else Consumed()
        self.before = before
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
                "checkpoint does not record which samples were trained on (a data position of an older layout, or "
                "of a run resumed from one within this epoch); resume it with its own "
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
