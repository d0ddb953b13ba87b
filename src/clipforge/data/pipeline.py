"""The training stream: shards → split by rank and worker → tar samples → shuffle → decode → batches.

Per epoch, the shard list is permuted with a seed shared by all ranks, then split disjointly by
rank and by DataLoader worker. Each worker reads its tars with webdataset's tar reader, shuffles
samples in a buffer with a seeded RNG, decodes and transforms images, tokenizes captions in
batches and yields whole batches, so the main process only receives tensors.

Bad input is skipped and counted, never fatal and never slow: a shard that cannot be opened, a
truncated tar, a corrupt image, a caption that is missing, empty or not UTF-8. Each batch carries
its worker's running counts; ``TrainLoader.skipped`` sums them.

Augmentation is seeded per sample from (seed, epoch, rank, worker, position), so a sample gets the
same random crop whether or not the run was interrupted.

Exact resume: every batch also carries how many shuffled samples its worker has consumed. The
``TrainLoader`` state (epoch, consumed per worker, which worker is next) goes into the
checkpoint; on resume each worker replays its shuffle, drops the consumed samples before
decoding them (cheap), and the worker order is rotated so that the DataLoader's round robin
continues where it stopped. The resumed run then sees exactly the batches the uninterrupted one
would have.
"""

from __future__ import annotations

import io
import json
import logging
import random
import tarfile
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import braceexpand
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


@dataclass
class DataConfig:
    """Where training pairs come from and how they are batched."""

    train_urls: str = "???"
    """WebDataset shards, brace-expanded: data/synth/train/{00000..00019}.tar (img2dataset layout)."""
    batch_size: int = 256
    """Samples per rank per step (the global batch is batch_size × world size)."""
    num_workers: int = 2
    """DataLoader worker processes per rank; decoding, augmentation and tokenization happen there."""
    shuffle_buffer: int = 2000
    """Samples held by each worker's shuffle buffer."""
    shuffle_initial: int = 500
    """Samples buffered before the first one is yielded."""
    caption_key: str = "txt"
    """Which member holds the caption: txt, or json:FIELD for a field of the sample's JSON."""
    seed: int = 0
    """Seed of shard order and shuffle buffers (epoch, rank and worker are mixed in)."""
    prefetch_factor: int = 4
    """Batches each worker prepares ahead."""

    def __post_init__(self) -> None:
        for name in ("batch_size", "shuffle_buffer"):
            if getattr(self, name) <= 0:
                raise ValueError(f"data.{name}: must be positive, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers: must be >= 0, got {self.num_workers}")
        if not (self.caption_key == "txt" or self.caption_key.startswith("json:")):
            raise ValueError(f"data.caption_key: expected 'txt' or 'json:FIELD', got {self.caption_key!r}")


def expand_urls(urls: str) -> list[str]:
    """Brace-expand ``urls`` (``::`` separates several patterns)."""
    shards = [url for pattern in urls.split("::") for url in braceexpand.braceexpand(pattern)]
    if not shards:
        raise ValueError(f"data.train_urls: {urls!r} expands to no shards")
    return shards


class SkipCounter:
    """Counts skipped inputs by kind, logging the first of each kind with its shard and key."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def skip(self, kind: str, where: str, detail: str = "") -> None:
        if self.counts[kind] == 0:
            log.warning("skipping %s at %s%s (further ones are counted, not logged)", kind.replace("_", " "), where,
                        f": {detail}" if detail else "")
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


def decode_image(data: bytes) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = Image.open(io.BytesIO(data))
        image.load()
    return image.convert("RGB")


def read_caption(sample: dict[str, Any], caption_key: str) -> str:
    """Caption from the sample; raises KeyError if missing, UnicodeDecodeError if not UTF-8."""
    if caption_key == "txt":
        return sample["txt"].decode("utf-8")
    field = caption_key.split(":", 1)[1]
    return str(json.loads(sample["json"].decode("utf-8"))[field])


class ShardedImageText(IterableDataset):
    """Yields whole batches: {"images", "texts", "keys", "worker", "consumed", "skipped"}."""

    def __init__(self, shards: list[str], cfg: DataConfig, transform: Callable, tokenizer: Callable,
                 rank: int = 0, world_size: int = 1) -> None:
        self.shards, self.cfg, self.transform, self.tokenizer = shards, cfg, transform, tokenizer
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.resume_consumed: dict[int, int] = {}
        self.rotation = 0

    def shards_for(self, logical_worker: int, num_workers: int) -> list[str]:
        order = list(self.shards)
        random.Random(f"{self.cfg.seed}-shards-{self.epoch}").shuffle(order)  # same on every rank
        return order[self.rank :: self.world_size][logical_worker::num_workers]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        num_workers = info.num_workers if info else 1
        worker = ((info.id if info else 0) + self.rotation) % num_workers  # logical id, see module doc
        shards = self.shards_for(worker, num_workers)
        counter = SkipCounter()
        samples = wds.tarfile_samples([{"url": url} for url in shards], handler=counter.tar_handler)
        rng = random.Random(f"{self.cfg.seed}-buffer-{self.epoch}-{self.rank}-{worker}")
        shuffled = wds.filters._shuffle(samples, self.cfg.shuffle_buffer, self.cfg.shuffle_initial, rng=rng)
        skip = self.resume_consumed.get(worker, 0)
        consumed = 0
        images, texts, keys = [], [], []
        for sample in shuffled:
            consumed += 1
            if consumed <= skip:
                continue
            with torch.random.fork_rng(devices=[]):  # augmentation draws depend on the sample's place only
                torch.manual_seed(zlib.crc32(f"{self.cfg.seed}-{self.epoch}-{self.rank}-{worker}".encode()) * 1_000_003
                                  + consumed)
                decoded = self._decode(sample, counter)
            if decoded is None:
                continue
            images.append(decoded[0])
            texts.append(decoded[1])
            keys.append(sample["__key__"])
            if len(images) == self.cfg.batch_size:
                yield {"images": torch.stack(images), "texts": self.tokenizer(texts), "keys": keys, "worker": worker,
                       "consumed": consumed, "skipped": dict(counter.counts)}
                images, texts, keys = [], [], []
        # A last record without images carries the final counts (skips after the last full batch).
        yield {"images": None, "worker": worker, "consumed": consumed, "skipped": dict(counter.counts)}

    def _decode(self, sample: dict[str, Any], counter: SkipCounter) -> Optional[tuple[torch.Tensor, str]]:
        where = f"{sample.get('__url__')}:{sample.get('__key__')}"
        extension = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
        if extension is None:
            counter.skip("missing_image", where)
            return None
        try:
            caption = read_caption(sample, self.cfg.caption_key)
        except (KeyError, ValueError, UnicodeDecodeError) as exn:
            counter.skip("bad_caption", where, repr(exn))
            return None
        caption = " ".join(caption.split())
        if not caption:
            counter.skip("empty_caption", where)
            return None
        try:
            image = self.transform(decode_image(sample[extension]))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exn:
            counter.skip("decompression_bomb", where, str(exn))
            return None
        except Exception as exn:  # PIL raises many types for corrupt data: all mean "skip this image"
            counter.skip("corrupt_image", where, repr(exn))
            return None
        return image, caption


class TrainLoader:
    """Endless iterator over training batches, epoch after epoch, whose position can be saved."""

    def __init__(self, dataset: ShardedImageText, num_workers: int, prefetch_factor: int = 4,
                 pin_memory: bool = False) -> None:
        self.dataset, self.num_workers = dataset, num_workers
        self.prefetch_factor, self.pin_memory = prefetch_factor, pin_memory
        self.epoch = 0
        self.consumed: dict[int, int] = {}
        self.next_worker = 0
        self.epoch_skipped: dict[int, dict[str, int]] = {}
        self.skipped_before: Counter[str] = Counter()
        self._iterator: Optional[Iterator] = None
        self._epoch_yielded = False

    @property
    def skipped(self) -> dict[str, int]:
        total = Counter(self.skipped_before)
        for counts in self.epoch_skipped.values():
            total.update(counts)
        return dict(total)

    def _start_epoch(self) -> Iterator:
        self.dataset.epoch = self.epoch
        self.dataset.resume_consumed = dict(self.consumed)
        self.dataset.rotation = self.next_worker
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                            prefetch_factor=self.prefetch_factor if self.num_workers else None)
        return iter(loader)

    def __iter__(self) -> "TrainLoader":
        return self

    def __next__(self) -> dict[str, Any]:
        empty_epochs = 0
        while True:
            if self._iterator is None:
                self._iterator = self._start_epoch()
                self._epoch_yielded = False
            try:
                batch = next(self._iterator)
            except StopIteration:
                self._iterator = None
                for counts in self.epoch_skipped.values():
                    self.skipped_before.update(counts)
                self.epoch, self.consumed, self.next_worker, self.epoch_skipped = self.epoch + 1, {}, 0, {}
                empty_epochs = 0 if self._epoch_yielded else empty_epochs + 1
                if empty_epochs == 2:  # a resumed epoch may legitimately be empty; two in a row cannot
                    raise ValueError(f"{len(self.dataset.shards)} shards yielded no full batch of "
                                     f"{self.dataset.cfg.batch_size} on rank {self.dataset.rank}; "
                                     "check data.train_urls and data.batch_size") from None
                continue
            worker = batch.pop("worker")
            self.consumed[worker] = batch.pop("consumed")
            self.epoch_skipped[worker] = batch.pop("skipped")
            if batch["images"] is None:
                continue
            self._epoch_yielded = True
            self.next_worker = (worker + 1) % max(1, self.num_workers)
            return batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "consumed": {str(k): v for k, v in self.consumed.items()},
                "next_worker": self.next_worker, "num_workers": self.num_workers,
                "batch_size": self.dataset.cfg.batch_size, "world_size": self.dataset.world_size,
                "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, have in (("num_workers", self.num_workers), ("batch_size", self.dataset.cfg.batch_size),
                          ("world_size", self.dataset.world_size)):
            if state[key] != have:
                raise ValueError(f"cannot resume the data position exactly: the checkpoint was written with "
                                 f"{key}={state[key]}, this run has {have}")
        self.epoch = int(state["epoch"])
        self.consumed = {int(k): int(v) for k, v in state["consumed"].items()}
        self.next_worker = int(state["next_worker"])
        self.skipped_before = Counter(state.get("skipped", {}))
        self.epoch_skipped = {}
        self._iterator = None


def build_train_loader(cfg: DataConfig, transform: Callable, tokenizer: Callable, rank: int = 0,
                       world_size: int = 1, pin_memory: bool = False) -> TrainLoader:
    shards = expand_urls(cfg.train_urls)
    local = [s for s in shards if "://" not in s and not s.startswith("pipe:")]
    missing = [s for s in local if not Path(s).exists()]
    if missing and len(missing) == len(shards):
        raise FileNotFoundError(f"data.train_urls: none of the {len(shards)} shards exist (first: {missing[0]})")
    slots = world_size * max(1, cfg.num_workers)
    if len(shards) < slots:
        raise ValueError(f"data.train_urls: {len(shards)} shards cannot feed world_size × num_workers = {slots} "
                         "readers disjointly; write more, smaller shards or lower data.num_workers")
    dataset = ShardedImageText(shards, cfg, transform, tokenizer, rank, world_size)
    return TrainLoader(dataset, cfg.num_workers, cfg.prefetch_factor, pin_memory)
