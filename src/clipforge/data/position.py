"""Which samples of an epoch have been trained on, by shard and place in the shard, and what remains.

A sample is named by ``(shard, ordinal)``: the shard's index in the run's shard list and the sample's place among
the samples the shard's tar yields. That name depends on neither the world size, nor the number of workers, nor the
batch size, so an epoch's progress written by one layout can be read by another: every rank records the samples of
the batches it trained on (``Consumed.take``), the checkpoint holds each rank's record, and a run with another
layout unions them (``Consumed.union``) and splits what remains (untouched shards, and the untaken samples of
partly read ones) over its own ranks and workers. Samples read into a worker's shuffle buffer or batch but not
trained on are not taken: the new layout reads them again.

A shard is ``done`` when as many of its samples are taken as its tar holds (counted when a worker reaches its end);
partly taken shards keep the set of taken ordinals, stored as a bitmap.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


def encode_ordinals(ordinals: Iterable[int]) -> str:
    """A set of ordinals as a base64 bitmap (bit i of byte i // 8 set for ordinal i)."""
    ordinals = list(ordinals)
    bitmap = bytearray((max(ordinals) // 8 + 1) if ordinals else 0)
    for ordinal in ordinals:
        bitmap[ordinal // 8] |= 1 << (ordinal % 8)
    return base64.b64encode(bytes(bitmap)).decode()


def decode_ordinals(text: str) -> set[int]:
    bitmap = base64.b64decode(text)
    return {8 * index + bit for index, byte in enumerate(bitmap) if byte for bit in range(8) if byte >> bit & 1}


@dataclass
class Consumed:
    """Samples of one epoch trained on: whole shards (``done``) and the taken ordinals of partly read ones.

    ``sizes`` holds the sample counts of the shards whose end a worker reached. ``before`` is what had been taken
    when the current plan was made (the samples of this record are disjoint from it): a shard is done when both
    together hold all of its samples."""

    done: set[int] = field(default_factory=set)
    partial: dict[int, set[int]] = field(default_factory=dict)
    sizes: dict[int, int] = field(default_factory=dict)

    def take(self, places: Iterable[tuple[int, int]], before: Consumed | None = None) -> None:
        touched = set()
        for shard, ordinal in places:
            self.partial.setdefault(shard, set()).add(ordinal)
            touched.add(shard)
        self._settle(touched, before)

    def found_sizes(self, sizes: dict[int, int], before: Consumed | None = None) -> None:
        self.sizes.update(sizes)
        self._settle(set(sizes) & set(self.partial), before)

    def _settle(self, shards: set[int], before: Consumed | None) -> None:
        for shard in shards:
            size = self.sizes.get(shard, before.sizes.get(shard) if before else None)
            earlier = len(before.partial.get(shard, ())) if before else 0
            if size is not None and len(self.partial.get(shard, ())) + earlier >= size:
                self.done.add(shard)
                self.partial.pop(shard, None)

    def taken(self, shard: int) -> set[int]:
        """The taken ordinals of a shard that is not done."""
        return self.partial.get(shard, set())

    def count(self) -> int | None:
        """Samples taken, if every done shard's size is known."""
        if any(shard not in self.sizes for shard in self.done):
            return None
        return sum(self.sizes[shard] for shard in self.done) + sum(len(v) for v in self.partial.values())

    @classmethod
    def union(cls, records: Iterable[Consumed]) -> Consumed:
        """Everything any of ``records`` took (the ranks' records of one epoch)."""
        total = cls()
        for record in records:
            total.done |= record.done
            total.sizes.update(record.sizes)
            for shard, ordinals in record.partial.items():
                total.partial.setdefault(shard, set()).update(ordinals)
        for shard in list(total.partial):
            if shard in total.done:
                del total.partial[shard]
        total._settle(set(total.partial), None)
        return total

    def to_json(self) -> dict[str, Any]:
        return {
            "done": sorted(self.done),
            "partial": {str(shard): encode_ordinals(ordinals) for shard, ordinals in sorted(self.partial.items())},
            "sizes": {str(shard): size for shard, size in sorted(self.sizes.items())},
        }

    @classmethod
    def from_json(cls, state: dict[str, Any]) -> Consumed:
        return cls(
            set(int(shard) for shard in state["done"]),
            {int(shard): decode_ordinals(bits) for shard, bits in state["partial"].items()},
            {int(shard): int(size) for shard, size in state["sizes"].items()},
        )
