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
  same number of batches on every rank, so no agreement is needed.

Each worker reads its tars with webdataset's tar reader (local, ``pipe:`` or fsspec streams, see
``sources.py``), shuffles samples in a seeded buffer, decodes images (``images.py``), reads and
cleans the caption, tokenizes whole batches and yields uint8 image batches, so the main process
only receives tensors.

Bad input is skipped and counted, never slow (no sleeping handler): an unreadable shard, a
truncated tar, a corrupt, zero-byte or over-large image, a caption that is missing, empty or not
UTF-8. Each batch carries its worker's running counts and the first occurrence of each kind; the
``TrainLoader`` logs each kind once per run with its shard and key, and ``TrainLoader.skipped`` sums
the counts (they go to the training metrics). With
``data.strict`` any of them stops the run instead.

Exact resume: every batch carries how many shuffled samples its worker has consumed (and, in
resampled mode, how many batches it has produced). The ``TrainLoader`` state (epoch, consumed and
produced per worker, which worker is next) goes into the checkpoint; on resume each worker replays
its shard plan and shuffle, drops the consumed samples before decoding them, and the worker order
is rotated so that the DataLoader's round robin continues where it stopped. Augmentation and
caption choice are seeded per sample from its place in the stream, so the resumed run sees exactly
the batches the uninterrupted one would have.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import random
import signal
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import webdataset as wds
from open_clip.tokenizer import basic_clean, whitespace_clean
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clipforge.data.images import DecompressionBomb, ImageTransform
from clipforge.data.sources import Source, SourceConfig, open_shard

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
MODES = ("epoch", "resampled")


class DataError(RuntimeError):
    """A bad input met in strict mode."""


@dataclass
class DataConfig:
    """Where training pairs come from and how they are batched."""

    sources: list[SourceConfig] = field(default_factory=list)
    """Shard sets: [{urls: ..., weight: 1.0, num_samples: null}, ...]. See clipforge/data/sources.py."""
    train_urls: str | None = None
    """Shorthand for one source: sources=[{urls: TRAIN_URLS}] (OpenCLIP's --train-data, '::'-separated)."""
    mode: str = "epoch"
    """epoch: every sample once per epoch, shards split disjointly; resampled: shards drawn with replacement."""
    epoch_samples: int | None = None
    """Resampled mode: samples per epoch (None = the sources' total, from num_samples or sizes.json)."""
    shard_shortage: str = "error"
    """Epoch mode with fewer shards than ranks × workers: error, or resample (switch to resampled mode)."""
    batch_size: int = 256
    """Samples per rank per step (the global batch is batch_size × world size)."""
    num_workers: int = 2
    """DataLoader worker processes per rank; decoding, augmentation and tokenization happen there."""
    shuffle_buffer: int = 2000
    """Samples held by each worker's shuffle buffer."""
    shuffle_initial: int = 500
    """Samples buffered before the first one is yielded."""
    caption_key: str = "txt"
    """Caption member: txt (the whole text), txt:lines (one line at random), or json:FIELD (a string, or a list:
    one at random)."""
    max_image_pixels: int = 89_478_485
    """Images whose header declares more pixels are skipped as decompression bombs (Pillow's default limit)."""
    strict: bool = False
    """Stop at the first bad input instead of skipping and counting it."""
    seed: int = 0
    """Seed of shard order, resampling and shuffle buffers (epoch, rank and worker are mixed in)."""
    prefetch_factor: int = 4
    """Batches each worker prepares ahead."""

    def __post_init__(self) -> None:
        for name in ("batch_size", "shuffle_buffer", "max_image_pixels"):
            if getattr(self, name) <= 0:
                raise ValueError(f"data.{name}: must be positive, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers: must be >= 0, got {self.num_workers}")
        if self.mode not in MODES:
            raise ValueError(f"data.mode: expected one of {MODES}, got {self.mode!r}")
        if self.shard_shortage not in ("error", "resample"):
            raise ValueError(f"data.shard_shortage: expected 'error' or 'resample', got {self.shard_shortage!r}")
        if self.epoch_samples is not None and self.epoch_samples <= 0:
            raise ValueError(f"data.epoch_samples: must be positive, got {self.epoch_samples}")
        if not (self.caption_key in ("txt", "txt:lines") or self.caption_key.startswith("json:")):
            raise ValueError(f"data.caption_key: expected 'txt', 'txt:lines' or 'json:FIELD', got {self.caption_key!r}")
        if self.train_urls is not None and self.sources:
            raise ValueError("data.train_urls and data.sources are both set; give one of them")

    def source_configs(self) -> list[SourceConfig]:
        if self.train_urls is None and not self.sources:
            raise ValueError("data.sources: no training data given (set data.sources or data.train_urls)")
        return [SourceConfig(urls=self.train_urls)] if self.train_urls is not None else list(self.sources)


class SkipCounter:
    """Counts skipped inputs by kind and remembers the first of each kind (shard, key, reason).

    Workers do not log: the counts and first occurrences travel with each batch and the
    ``TrainLoader`` logs each kind once per run, in the main process.
    """

    def __init__(self, strict: bool = False) -> None:
        self.counts: Counter[str] = Counter()
        self.first: dict[str, str] = {}
        self.strict = strict

    def skip(self, kind: str, where: str, detail: str = "") -> None:
        message = f"{kind.replace('_', ' ')} at {where}" + (f": {detail}" if detail else "")
        if self.strict:
            raise DataError(f"{message} (data.strict is set; unset it to skip and count bad inputs)")
        self.first.setdefault(kind, message)
        self.counts[kind] += 1

    def tar_handler(self, exn: Exception) -> bool:
        where = " ".join(str(a) for a in exn.args[1:] if isinstance(a, str)) or "?"
        if isinstance(exn, (tarfile.ReadError, EOFError)) or "unexpected end" in str(exn):
            self.skip("truncated_tar", where, str(exn.args[0]) if exn.args else "")
        elif isinstance(exn, OSError):
            self.skip("unreadable_shard", where, str(exn))
        else:
            self.skip("malformed_sample", where, str(exn))
        return True  # keep going


def read_caption(sample: dict[str, Any], caption_key: str, rng: random.Random) -> str:
    """The cleaned caption (ftfy + whitespace, as open_clip's tokenizer cleans).

    Raises KeyError if missing, UnicodeDecodeError/ValueError if not UTF-8 or not JSON.
    """
    if caption_key.startswith("txt"):
        text = sample["txt"].decode("utf-8")
        if caption_key == "txt:lines":
            lines = [line for line in text.splitlines() if line.strip()]
            text = rng.choice(lines) if lines else ""
    else:
        value = json.loads(sample["json"].decode("utf-8"))[caption_key.split(":", 1)[1]]
        if isinstance(value, list):
            value = rng.choice(value) if value else ""
        text = "" if value is None else str(value)
    return whitespace_clean(basic_clean(text))


def assign_shards(shards: list[str], sizes: dict[str, int | None], seed: int, epoch: int,
                  slots: int) -> list[list[str]]:
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


class ShardedImageText(IterableDataset):
    """Yields whole batches: {"images" (uint8), "texts", "keys", "worker", "consumed", "produced", "skipped"}."""

    def __init__(self, sources: list[Source], cfg: DataConfig, transform: ImageTransform, tokenizer: Callable,
                 rank: int = 0, world_size: int = 1, mode: str = "epoch", normalize_in_workers: bool = False,
                 sample_ids: bool = False, trim_text: bool = False) -> None:
        self.sources, self.cfg, self.transform, self.tokenizer = sources, cfg, transform, tokenizer
        self.normalize_in_workers = normalize_in_workers
        self.sample_ids = sample_ids  # batches carry caption_ids / image_ids (content hashes) for loss.positives
        self.trim_text = trim_text  # token batches end at their longest caption (models.enable_text_trimming)
        self.rank, self.world_size, self.mode = rank, world_size, mode
        self.shards = [shard for source in sources for shard in source.shards]
        self.sizes = {shard: size for source in sources for shard, size in source.sizes.items()}
        self.epoch = 0
        self.resume_consumed: dict[int, int] = {}
        self.resume_produced: dict[int, int] = {}
        self.worker_batches: dict[int, int] = {}  # resampled mode: batches each logical worker yields per epoch
        self.rotation = 0

    def shards_for(self, logical_worker: int, num_workers: int) -> Iterator[str]:
        if self.mode == "epoch":
            plan = assign_shards(self.shards, self.sizes, self.cfg.seed, self.epoch, self.world_size * num_workers)
            yield from plan[self.rank * num_workers + logical_worker]
            return
        rng = random.Random(f"{self.cfg.seed}-resample-{self.epoch}-{self.rank}-{logical_worker}")
        weights = [source.weight / source.mean_shard_size() for source in self.sources]  # per-sample proportions
        while True:
            source = rng.choices(self.sources, weights)[0]
            yield rng.choice(source.shards)

    def _open(self, shards: Iterator[str], counter: SkipCounter, since_sample: list[int]) -> Iterator[dict[str, Any]]:
        for url in shards:
            since_sample[0] += 1
            if since_sample[0] > 10 * len(self.shards) + 100:  # an endless resampled plan must not spin forever
                raise ValueError(f"rank {self.rank}: {since_sample[0]} shards in a row yielded no sample; are the "
                                 f"shards readable? (first: {self.shards[0]})")
            try:
                stream = open_shard(url)
            except Exception as exn:
                counter.skip("unreadable_shard", url, repr(exn))
                continue
            try:
                yield {"url": url, "stream": stream}
            finally:
                try:
                    stream.close()
                except Exception as exn:  # e.g. a pipe: command that exited non-zero
                    counter.skip("unreadable_shard", url, repr(exn))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        num_workers = info.num_workers if info else 1
        worker = ((info.id if info else 0) + self.rotation) % num_workers  # logical id, see module doc
        counter = SkipCounter(self.cfg.strict)
        since_sample = [0]
        files = wds.tariterators.tar_file_expander(
            self._open(self.shards_for(worker, num_workers), counter, since_sample), handler=counter.tar_handler)
        samples = wds.tariterators.group_by_keys(files, handler=counter.tar_handler)
        rng = random.Random(f"{self.cfg.seed}-buffer-{self.epoch}-{self.rank}-{worker}")
        shuffled = wds.filters._shuffle(samples, self.cfg.shuffle_buffer, self.cfg.shuffle_initial, rng=rng)
        skip = self.resume_consumed.get(worker, 0)
        produced = self.resume_produced.get(worker, 0)
        quota = self.worker_batches.get(worker) if self.mode == "resampled" else None
        consumed = 0
        images, texts, keys, ids = [], [], [], []
        place = f"{self.cfg.seed}-{self.epoch}-{self.rank}-{worker}"
        for sample in shuffled:
            if quota is not None and produced >= quota:
                break
            consumed += 1
            since_sample[0] = 0
            if consumed <= skip:
                continue
            decoded = self._decode(sample, counter, random.Random(f"{place}-{consumed}"))
            if decoded is None:
                continue
            images.append(decoded[0])
            texts.append(decoded[1])
            keys.append(sample["__key__"])
            if self.sample_ids:
                ids.append(decoded[2])
            if len(images) == self.cfg.batch_size:
                produced += 1
                stacked = torch.stack(images)
                if self.normalize_in_workers:
                    stacked = self.transform.normalize(stacked)
                tokens = self.tokenizer(texts)
                if self.trim_text:  # drop the columns after the batch's last end-of-text token (the highest id)
                    tokens = tokens[:, : int(tokens.argmax(dim=1).max()) + 1].contiguous()
                batch = {"images": stacked, "texts": tokens, "keys": keys, "worker": worker,
                         "consumed": consumed, "produced": produced, "skipped": dict(counter.counts),
                         "first_skips": dict(counter.first)}
                if self.sample_ids:
                    batch["caption_ids"], batch["image_ids"] = torch.tensor(ids, dtype=torch.int64).unbind(1)
                yield batch
                images, texts, keys, ids = [], [], [], []
        # A last record without images carries the final counts (skips after the last full batch).
        yield {"images": None, "worker": worker, "consumed": consumed, "produced": produced,
               "skipped": dict(counter.counts), "first_skips": dict(counter.first)}

    def _decode(self, sample: dict[str, Any], counter: SkipCounter,
                rng: random.Random) -> tuple[torch.Tensor, str] | tuple[torch.Tensor, str, tuple[int, int]] | None:
        where = f"{sample.get('__url__')}:{sample.get('__key__')}"
        extension = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
        if extension is None:
            counter.skip("missing_image", where)
            return None
        try:
            caption = read_caption(sample, self.cfg.caption_key, rng)
        except (KeyError, ValueError, UnicodeDecodeError, TypeError) as exn:
            counter.skip("bad_caption", where, repr(exn))
            return None
        if not caption:
            counter.skip("empty_caption", where)
            return None
        try:
            image = self.transform(sample[extension], rng)
        except DecompressionBomb as exn:
            counter.skip("decompression_bomb", where, str(exn))
            return None
        except Exception as exn:  # decoders raise many types for corrupt data: all mean "skip this image"
            counter.skip("corrupt_image", where, repr(exn))
            return None
        if self.sample_ids:
            return image, caption, (stable_id(caption.encode()), stable_id(sample[extension]))
        return image, caption


def stable_id(data: bytes) -> int:
    """A 63-bit content hash (BLAKE2b): equal captions / image files get equal ids on every rank and worker."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


def _ignore_stop_signals(worker_id: int) -> None:
    """Pre-emption signals (SLURM sends them to every process of the step) are the trainer's business: a worker
    that died of one would take the epoch down with it; workers exit with their parent instead."""
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def _all_ranks_agree(flag: bool) -> bool:
    return flag


class TrainLoader:
    """Endless iterator over training batches, epoch after epoch, whose position can be saved.

    ``agree(flag) -> bool`` must return True only if ``flag`` is True on every rank (a MIN all-reduce);
    in epoch mode it is asked every step whether all ranks still have a batch.
    """

    def __init__(self, dataset: ShardedImageText, num_workers: int, prefetch_factor: int = 4,
                 pin_memory: bool = False, agree: Callable[[bool], bool] = _all_ranks_agree) -> None:
        self.dataset, self.num_workers, self.transform = dataset, num_workers, dataset.transform
        self.prefetch_factor, self.pin_memory, self.agree = prefetch_factor, pin_memory, agree
        self.epoch = 0
        self.consumed: dict[int, int] = {}
        self.produced: dict[int, int] = {}
        self.next_worker = 0
        self.epoch_skipped: dict[int, dict[str, int]] = {}
        self.skipped_before: Counter[str] = Counter()
        self._iterator: Iterator | None = None
        self._epoch_yielded = False
        self._logged: set[str] = set()
        if dataset.mode == "resampled":
            steps = self.steps_per_epoch
            workers = max(1, num_workers)
            dataset.worker_batches = {w: steps // workers + (w < steps % workers) for w in range(workers)}

    @property
    def steps_per_epoch(self) -> int | None:
        """Batches per rank per epoch: exact in resampled mode, an upper bound in epoch mode (None if unknown)."""
        global_batch = self.dataset.cfg.batch_size * self.dataset.world_size
        if self.dataset.mode == "resampled":
            total = self.dataset.cfg.epoch_samples or sum(s.num_samples or 0 for s in self.dataset.sources)
            return max(1, total // global_batch)
        if any(v is None for v in self.dataset.sizes.values()):
            return None
        return sum(v or 0 for v in self.dataset.sizes.values()) // global_batch

    @property
    def skipped(self) -> dict[str, int]:
        total = Counter(self.skipped_before)
        for counts in self.epoch_skipped.values():
            total.update(counts)
        return dict(total)

    def _start_epoch(self) -> Iterator:
        self.dataset.epoch = self.epoch
        self.dataset.resume_consumed = dict(self.consumed)
        self.dataset.resume_produced = dict(self.produced)
        self.dataset.rotation = self.next_worker
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                            prefetch_factor=self.prefetch_factor if self.num_workers else None,
                            worker_init_fn=_ignore_stop_signals if self.num_workers else None)
        return iter(loader)

    def __iter__(self) -> TrainLoader:
        return self

    def close(self) -> None:
        """Stop the current epoch's workers now. They ignore SIGTERM (pre-emption is the trainer's business), so
        the interpreter's exit, which terminates daemonic children and then joins them, would wait for them
        forever if the iterator had not been collected by then; the trainer calls this when it is done."""
        iterator, self._iterator = self._iterator, None
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is None:  # no workers, or none started
            return
        shutdown()  # done event + a None to each worker; joins them with a timeout
        for worker in getattr(iterator, "_workers", []):
            if worker.is_alive():
                worker.kill()
                worker.join(timeout=10)

    def _next_in_epoch(self) -> dict[str, Any] | None:
        """The next batch of the current epoch on this rank, or None when this rank's epoch is over."""
        if self._iterator is None:
            self._iterator = self._start_epoch()
            self._epoch_yielded = False
        for batch in self._iterator:
            worker = batch.pop("worker")
            self.consumed[worker] = batch.pop("consumed")
            self.produced[worker] = batch.pop("produced")
            self.epoch_skipped[worker] = batch.pop("skipped")
            for kind, message in batch.pop("first_skips").items():
                if kind not in self._logged:
                    self._logged.add(kind)
                    log.warning("skipping %s (further ones are counted, not logged)", message)
            if batch["images"] is None:
                continue
            self.next_worker = (worker + 1) % max(1, self.num_workers)
            return batch
        return None

    def __next__(self) -> dict[str, Any]:
        empty_epochs = 0
        while True:
            batch = self._next_in_epoch()
            have = batch is not None
            if self.dataset.mode == "epoch" and self.dataset.world_size > 1:
                have = self.agree(have)  # every rank ends the epoch at the same step
            if have:
                self._epoch_yielded = True
                return batch
            self._iterator = None
            for counts in self.epoch_skipped.values():
                self.skipped_before.update(counts)
            self.epoch, self.next_worker = self.epoch + 1, 0
            self.consumed, self.produced, self.epoch_skipped = {}, {}, {}
            empty_epochs = 0 if self._epoch_yielded else empty_epochs + 1
            self._epoch_yielded = False
            if empty_epochs == 2:  # a resumed epoch may legitimately be empty; two in a row cannot
                raise ValueError(f"{len(self.dataset.shards)} shards yielded no full batch of "
                                 f"{self.dataset.cfg.batch_size} on some rank (this is rank {self.dataset.rank}); "
                                 "check data.sources and data.batch_size")

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "consumed": {str(k): v for k, v in self.consumed.items()},
                "produced": {str(k): v for k, v in self.produced.items()},
                "next_worker": self.next_worker, "num_workers": self.num_workers, "mode": self.dataset.mode,
                "batch_size": self.dataset.cfg.batch_size, "world_size": self.dataset.world_size,
                "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, have in (("num_workers", self.num_workers), ("batch_size", self.dataset.cfg.batch_size),
                          ("world_size", self.dataset.world_size), ("mode", self.dataset.mode)):
            if state.get(key, have) != have:
                raise ValueError(f"cannot resume the data position exactly: the checkpoint was written with "
                                 f"{key}={state[key]}, this run has {have}")
        self.epoch = int(state["epoch"])
        self.consumed = {int(k): int(v) for k, v in state["consumed"].items()}
        self.produced = {int(k): int(v) for k, v in state.get("produced", {}).items()}
        self.next_worker = int(state["next_worker"])
        self.skipped_before = Counter(state.get("skipped", {}))
        self.epoch_skipped = {}
        self._iterator = None


def build_train_loader(cfg: DataConfig, preprocess_cfg: dict[str, Any], tokenizer: Callable, rank: int = 0,
                       world_size: int = 1, pin_memory: bool = False,
                       agree: Callable[[bool], bool] = _all_ranks_agree,
                       normalize_in_workers: bool = False, sample_ids: bool = False,
                       trim_text: bool = False) -> TrainLoader:
    """The training loader for this rank. ``preprocess_cfg`` is open_clip's (``model.visual.preprocess_cfg``):
    output size, mean, std, interpolation. Batches hold uint8 images and ``loader.transform.normalize`` makes
    the model's float input from them on the training device; with ``normalize_in_workers`` (training on a
    CPU) the workers do that and batches arrive normalised (``normalize`` then passes them through). With
    ``sample_ids`` batches also hold ``caption_ids`` and ``image_ids`` (int64 (B,), 63-bit BLAKE2b hashes of the
    cleaned caption and of the image file's bytes) for the multi-positive loss. With ``trim_text`` each batch's
    tokens stop after its longest caption's end-of-text token (for a model ``enable_text_trimming`` accepted)."""
    sources = [Source.resolve(source, i) for i, source in enumerate(cfg.source_configs())]
    transform = ImageTransform.from_preprocess_cfg(preprocess_cfg, train=True, max_pixels=cfg.max_image_pixels)
    mode = cfg.mode
    num_shards = sum(len(source.shards) for source in sources)
    slots = world_size * max(1, cfg.num_workers)
    if mode == "epoch":
        for i, source in enumerate(sources):
            if source.weight != 1.0 and len(sources) > 1:
                raise ValueError(f"data.sources[{i}].weight={source.weight}: weights only apply in resampled mode "
                                 "(epoch mode reads every sample once); set data.mode=resampled")
        if num_shards < slots:
            message = (f"data.sources: {num_shards} shards cannot feed world_size × num_workers = {slots} readers "
                       "disjointly")
            if cfg.shard_shortage == "error":
                raise ValueError(message + "; write more, smaller shards, lower data.num_workers, or set "
                                 "data.shard_shortage=resample")
            log.warning("%s: switching to resampled mode (data.shard_shortage=resample)", message)
            mode = "resampled"
    unknown = [i for i, source in enumerate(sources) if source.num_samples is None]
    if mode == "resampled" and unknown and cfg.epoch_samples is None:
        raise ValueError(f"data.sources[{unknown[0]}]: resampled mode needs the sample count: set its num_samples, or "
                         "data.epoch_samples, or write sizes.json beside the shards")
    if mode == "resampled" and unknown and len(sources) > 1:  # weights are shares of samples, not of shards
        raise ValueError(f"data.sources[{unknown[0]}]: resampled mode needs its sample count to weight sources by "
                         "samples: set its num_samples, or write sizes.json beside the shards")
    dataset = ShardedImageText(sources, cfg, transform, tokenizer, rank, world_size, mode, normalize_in_workers,
                               sample_ids, trim_text)
    return TrainLoader(dataset, cfg.num_workers, cfg.prefetch_factor, pin_memory, agree)
