"""The data plane at scale, small: bench/data_plane.py's simulation of a pre-empted epoch resumed on fewer ranks
(2,000 shards × 100 samples, 64 ranks × 4 workers → 48), and the pieces it rests on: the bulk form of the record of
samples taken, the epoch's record stored once over the ranks, the shards balanced over ranks before workers, and a
position planned by the older assignment going on from the samples it records.

The simulation's own checks are set arithmetic per shard against what it trained on; here they must all hold: no
sample twice, nothing lost by the reshard, and the samples never trained on exactly the leftovers docs/training.md
documents (unfilled last batches, and what other ranks hold when the first runs dry, under one shard a rank)."""

from __future__ import annotations

import base64
import heapq
import importlib.util
import json
import math
import random
from collections import Counter
from pathlib import Path

import pytest
from test_data_distributed import SHARD_SIZES, write_uneven_shards
from test_data_reshard import layout, rest_of_epoch, saved

from clipforge.data.pipeline import assign_shards
from clipforge.data.position import Consumed, Ordinals, mask_of

BENCH = Path(__file__).resolve().parents[1] / "bench" / "data_plane.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("data_plane", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict:
    bench = load_bench()
    return bench.run(bench.parse_args(["--small"]), tmp_path_factory.mktemp("data_plane"))


def test_a_resumed_epoch_trains_no_sample_twice_and_misses_only_the_documented_leftovers(small):
    setup, first, rest = small["setup"], small["first_run"], small["rest_of_epoch"]
    second = small["second_checkpoint"]
    assert load_bench().exact(small)  # what the script's exit status says
    assert small["planning"]["every_shard_once"] and small["planning"]["ranks_agree"]
    assert small["reshard"]["ranks_agree"]
    assert first["per_batch_path_same_state"]  # the bulk bookkeeping is the per-batch one
    assert first["record_differs_from_truth"] == small["reshard"]["union_differs_from_truth"] == 0
    assert second["record_differs_from_truth"] == 0 and second["same_layout_keeps_before"]
    assert first["samples_trained_twice"] == second["samples_trained_twice"] == 0
    assert rest["duplicates"] == rest["lost"] == rest["done_shards_planned"] == 0
    total = setup["shards"] * setup["samples_per_shard"]
    assert first["samples_trained"] + rest["samples_planned"] == total
    assert rest["missing"] == rest["unfilled_batches"] + rest["dry_rank_tail"] > 0
    assert rest["unfilled_batches"] < setup["resume_ranks"] * setup["workers"] * setup["batch_size"]
    # the ranks are balanced before their workers: the first to run dry leaves under one shard on each other rank
    assert rest["dry_rank_tail"] < setup["resume_ranks"] * setup["samples_per_shard"]
    assert first["whole_epoch_dry_rank_tail"] < setup["ranks"] * setup["samples_per_shard"]


def test_the_data_state_grows_by_shards_not_by_samples(small):
    """Per rank a few hundred bytes, then per shard in a record its number (and size once its end is read), and a
    bitmap only for the few partly read ones (about one or two per worker): nothing per sample trained."""
    setup, first = small["setup"], small["first_run"]
    bitmap = math.ceil(math.ceil(setup["samples_per_shard"] / 8) / 3) * 4  # base64
    inherited = {"first_run": 0, "second_checkpoint": first["partial_shards"]}  # the record the resumed plan had
    for checkpoint, ranks in (("first_run", setup["ranks"]), ("second_checkpoint", setup["resume_ranks"])):
        found = small[checkpoint]
        bound = 400 * ranks + 24 * found["entries_done"] + (bitmap + 24) * found["entries_partial"]
        assert found["state_bytes"] <= bound, checkpoint
        assert found["entries_partial"] <= inherited[checkpoint] + 3 * ranks * setup["workers"], checkpoint
    # the epoch's record before the resumed plan is written once over the new ranks, not once per rank
    assert small["second_checkpoint"]["state_bytes"] < 2 * small["first_run"]["state_bytes"]


def test_a_mask_takes_what_the_samples_one_by_one_take():
    places = [(3, 0), (3, 9), (5, 2), (3, 4)]
    one_by_one, at_once = Consumed(), Consumed()
    one_by_one.take(places)
    at_once.take_mask(3, mask_of([0, 9, 4]))
    at_once.take_mask(5, 1 << 2)
    at_once.take_mask(7, 0)  # nothing taken: no entry
    assert one_by_one == at_once and set(at_once.partial) == {3, 5}
    at_once.found_sizes({5: 1, 3: 10})  # shard 5 holds one sample: done
    assert at_once.done == {5} and list(at_once.taken(3)) == [0, 4, 9] and 9 in at_once.taken(3)
    at_once.take_mask(3, (1 << 10) - 1)
    assert at_once.done == {3, 5} and not at_once.partial and at_once.count() == 11
    # the checkpoint's bitmap: bit i of byte i // 8, base64, as written before bitmaps were kept as ints
    assert Consumed(partial={3: mask_of([0, 9])}).to_json()["partial"] == {"3": "AQI="}
    assert Consumed.from_json({"done": [], "partial": {"3": "AQI="}, "sizes": {}}).taken(3) == Ordinals(0b1000000001)


def test_a_bitmap_of_long_runs_is_stored_deflated_and_a_plain_one_still_reads():
    held = random.Random(0).sample(range(9_000, 10_000), 300)  # a shard taken but for what a shuffle buffer holds
    mask = ((1 << 10_000) - 1) ^ mask_of(held)
    stored = Consumed(partial={7: mask}).to_json()["partial"]["7"]
    plain = base64.b64encode(mask.to_bytes(1_250, "little")).decode()
    assert stored.startswith("z:") and len(stored) < len(plain) / 3
    for text in (stored, plain):
        record = Consumed.from_json({"done": [], "partial": {"7": text}, "sizes": {}})
        assert record.partial == {7: mask} and len(record.taken(7)) == 10_000 - 300 and held[0] not in record.taken(7)


def test_the_epochs_record_is_stored_once_over_the_ranks():
    record = Consumed(done={1, 2, 8}, partial={4: 0b1011, 5: 0b1}, sizes={1: 10, 2: 10, 8: 3, 4: 12})
    parts = [record.to_json(part=(rank, 3)) for rank in range(3)]
    assert sorted(shard for part in parts for shard in part["done"]) == [1, 2, 8]
    assert sum(len(part["partial"]) for part in parts) == 2
    assert Consumed.union(Consumed.from_json(part) for part in parts) == record


def lpt(shards, size, slots):
    """One level over every slot at once, largest first, the lowest slot among equals: the older assignment."""
    heap, out = [(0, slot) for slot in range(slots)], [[] for _ in range(slots)]
    for shard in sorted(shards, key=lambda s: -size[s]):
        load, slot = heapq.heappop(heap)
        out[slot].append(shard)
        heapq.heappush(heap, (load + size[shard], slot))
    return out


def test_shards_are_balanced_over_ranks_before_workers():
    shards = list(range(2_000))
    sizes = dict.fromkeys(shards, 100)
    plan = assign_shards(shards, sizes, seed=0, epoch=0, slots=64 * 4, ranks=64)
    per_rank = [sum(len(slot) for slot in plan[rank * 4 : (rank + 1) * 4]) for rank in range(64)]
    assert sorted(Counter(per_rank)) == [31, 32]  # 2,000 = 64 × 31 + 16: sixteen ranks get one more
    assert sorted(s for slot in plan for s in slot) == shards
    older = lpt(shards, sizes, 64 * 4)  # 208 slots of 8 and 48 of 7: ranks 0–51 hold 32, the others 28
    assert max(per_rank) - min(per_rank) == 1 < 32 - 28 == max(map(len, older[:4])) * 4 - len(older[-1]) * 4
    # on one rank the assignment is the older one (checkpoints of one rank resume bit for bit across it)
    uneven = {shard: random.Random(shard).randint(1, 500) for shard in shards}
    one_rank = assign_shards(shards, uneven, seed=3, epoch=2, slots=4)
    order = list(shards)
    random.Random("3-shards-2").shuffle(order)
    place = {shard: i for i, shard in enumerate(order)}
    assert one_rank == [sorted(slot, key=place.__getitem__) for slot in lpt(order, uneven, 4)]


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> str:
    return write_uneven_shards(tmp_path_factory.mktemp("uneven"), with_sizes=True)


def test_a_position_of_the_older_assignment_goes_on_from_the_samples_it_records(uneven):
    first = layout(uneven, 2, 0, 8)
    seen = [key for loader in first for _ in range(4) for key in next(loader)["keys"]]
    states = saved(first)
    for state in states:  # as the older assignment wrote them: no version, the record whole on every rank
        del state["plan"], state["before_split"]
    resumed = layout(uneven, 2, 0, 8)
    with pytest.raises(ValueError, match="planned by another shard assignment"):
        resumed[0].load_state_dict(states[0])
    for loader in resumed:
        loader.load_state_dicts(states)  # the same layout, another plan: resharded, sample-exact
    rest, _ = rest_of_epoch(resumed)
    counts = Counter(seen + rest)
    assert max(counts.values()) == 1
    assert sum(SHARD_SIZES) - len(counts) == sum(loader.unbatched.get(0, 0) for loader in resumed)


def test_a_rank_alone_cannot_load_its_share_of_the_epochs_record(uneven):
    first = layout(uneven, 2, 0, 8)
    for loader in first:
        next(loader)
    states = json.loads(json.dumps(saved(first)))
    with pytest.raises(ValueError, match="holds 1/2 of what the epoch had taken"):
        layout(uneven, 2, 0, 8)[1].load_state_dict(states[1])
