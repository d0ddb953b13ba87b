"""Which samples of an epoch have been trained on, by shard and place in the shard, and what remains.

A sample is named by ``(shard, ordinal)``: the shard's index in the run's shard list and the sample's place among
the samples the shard's tar yields. That name depends on neither the world size, nor the number of workers, nor the
batch size, so an epoch's progress written by one layout can be read by another: every rank records the samples of
the batches it trained on (``Consumed.take``), the checkpoint holds each rank's record, and a run with another
layout unions them (``Consumed.union``) and splits what remains (untouched shards, and the untaken samples of
partly read ones) over its own ranks and workers. Samples read into a worker's shuffle buffer or batch but not
trained on are not taken: the new layout reads them again.

A shard is ``done`` when as many of its samples are taken as its tar holds (counted when a worker reaches its end);
partly taken shards keep the set of taken ordinals as a bitmap, a Python int in memory (bit i = ordinal i: union
is an OR, a count is ``bit_count``) and base64 in the checkpoint, deflated where that is shorter. Nothing is kept
per sample trained on: a record costs about 20 bytes per shard it names, plus, for each partly taken shard, its
bitmap (at most a sixth of a byte per sample of the shard, about a third of that deflated); a worker has one to three
of those at a time (the shard it reads and, through its shuffle buffer, the ones before). ``take_mask`` takes many
samples of a shard at once. bench/data_plane.py measures it at 1,024 ranks × 8 workers (docs/scaling.md).
"""

from __future__ import annotations

import base64
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

DEFLATED = "z:"  # not in base64's alphabet


def encode_mask(mask: int) -> str:
    """A set of ordinals (bit i of ``mask`` = ordinal i) as base64 of its little-endian bytes (bit i of byte i // 8),
    or, where shorter, ``z:`` and base64 of those bytes deflated (zlib): a shard taken but for the samples still in
    a shuffle buffer is long runs of ones, and deflated to a third or less."""
    raw = mask.to_bytes((mask.bit_length() + 7) // 8, "little")
    plain, deflated = base64.b64encode(raw).decode(), DEFLATED + base64.b64encode(zlib.compress(raw)).decode()
    return deflated if len(deflated) < len(plain) else plain


def decode_mask(text: str) -> int:
    if text.startswith(DEFLATED):
        return int.from_bytes(zlib.decompress(base64.b64decode(text[len(DEFLATED) :])), "little")
    return int.from_bytes(base64.b64decode(text), "little")


def mask_of(ordinals: Iterable[int]) -> int:
    mask = 0
    for ordinal in ordinals:
        mask |= 1 << ordinal
    return mask


@dataclass(frozen=True)
class Ordinals:
    """The taken ordinals of one shard, as ``Consumed.taken`` gives them: ``in``, ``len`` and iteration."""

    mask: int = 0

    def __contains__(self, ordinal: int) -> bool:
        return self.mask >> ordinal & 1 == 1

    def __len__(self) -> int:
        return self.mask.bit_count()

    def __iter__(self) -> Iterator[int]:
        mask, ordinal = self.mask, 0
        while mask:
            low = mask & -mask
            ordinal = low.bit_length() - 1
            yield ordinal
            mask ^= low


@dataclass
class Consumed:
    """Samples of one epoch trained on: whole shards (``done``) and the taken ordinals of partly read ones
    (``partial``: shard → bitmap).

    ``sizes`` holds the sample counts of the shards whose end a worker reached. ``before`` is what had been taken
    when the current plan was made (the samples of this record are disjoint from it): a shard is done when both
    together hold all of its samples."""

    done: set[int] = field(default_factory=set)
    partial: dict[int, int] = field(default_factory=dict)
    sizes: dict[int, int] = field(default_factory=dict)

    def take(self, places: Iterable[tuple[int, int]], before: Consumed | None = None) -> None:
        """Take samples one by one, as a batch names them: (shard, ordinal)."""
        masks: dict[int, int] = {}
        for shard, ordinal in places:
            masks[shard] = masks.get(shard, 0) | 1 << ordinal
        for shard, mask in masks.items():
            self.partial[shard] = self.partial.get(shard, 0) | mask
        self._settle(set(masks), before)

    def take_mask(self, shard: int, mask: int, before: Consumed | None = None) -> None:
        """Take the ordinals of ``shard`` whose bits are set in ``mask`` at once (``(1 << n) - 1``: its first n):
        what ``take`` does for them one by one."""
        if mask:
            self.partial[shard] = self.partial.get(shard, 0) | mask
            self._settle({shard}, before)

    def found_sizes(self, sizes: dict[int, int], before: Consumed | None = None) -> None:
        self.sizes.update(sizes)
        self._settle(set(sizes) & set(self.partial), before)

    def _settle(self, shards: set[int], before: Consumed | None) -> None:
        for shard in shards:
            size = self.sizes.get(shard, before.sizes.get(shard) if before else None)
            earlier = before.partial.get(shard, 0).bit_count() if before else 0
            if size is not None and self.partial.get(shard, 0).bit_count() + earlier >= size:
                self.done.add(shard)
                self.partial.pop(shard, None)

    def taken(self, shard: int) -> Ordinals:
        """The taken ordinals of a shard that is not done."""
        return Ordinals(self.partial.get(shard, 0))

    def count(self) -> int | None:
        """Samples taken, if every done shard's size is known."""
        if any(shard not in self.sizes for shard in self.done):
            return None
        return sum(self.sizes[shard] for shard in self.done) + sum(mask.bit_count() for mask in self.partial.values())

    @classmethod
    def union(cls, records: Iterable[Consumed]) -> Consumed:
        """Everything any of ``records`` took (the ranks' records of one epoch)."""
        total = cls()
        for record in records:
            total.done |= record.done
            total.sizes.update(record.sizes)
            for shard, mask in record.partial.items():
                total.partial[shard] = total.partial.get(shard, 0) | mask
        for shard in list(total.partial):
            if shard in total.done:
                del total.partial[shard]
        total._settle(set(total.partial), None)
        return total

    def to_json(self, part: tuple[int, int] = (0, 1)) -> dict[str, Any]:
        """The record as the checkpoint stores it; with ``part=(index, count)`` only its shards ≡ index (mod count),
        so that ``count`` ranks holding one record between them store each shard once (``union`` reassembles it)."""
        index, count = part
        partial = sorted(shard for shard in self.partial if shard % count == index)
        return {
            "done": sorted(shard for shard in self.done if shard % count == index),
            "partial": {str(shard): encode_mask(self.partial[shard]) for shard in partial},
            "sizes": {str(shard): self.sizes[shard] for shard in sorted(self.sizes) if shard % count == index},
        }

    @classmethod
    def from_json(cls, state: dict[str, Any]) -> Consumed:
        return cls(
            set(int(shard) for shard in state["done"]),
            {int(shard): decode_mask(bits) for shard, bits in state["partial"].items()},
            {int(shard): int(size) for shard, size in state["sizes"].items()},
        )
