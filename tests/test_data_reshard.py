"""The data position resumes on another world size, worker count or batch size (``TrainLoader.reshard``).

Epoch mode, on uneven shards: the rest of the epoch reads every sample not yet trained on exactly once over the new
ranks and workers (checked on sample keys: none twice, and the only samples never seen are those the epoch's end
leaves in unfilled batches, which every epoch drops), and the next epoch is an ordinary one of the new layout.
Resampled mode: fresh streams for what is left of the epoch's samples.

Ranks are simulated in this process: each loader gets its rank and world size and an agreement that answers for
itself alone, so every rank reads its part of the epoch to its own end (the real agreement, which ends the epoch
for all ranks when one runs dry, is tested in test_data_distributed.py).
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from test_data_distributed import SHARD_SIZES, write_uneven_shards
from test_pipeline import PREPROCESS, TOKENIZER

from clipforge.data import DataConfig, build_train_loader


def make(urls, rank, world_size, workers, batch, **extra):
    cfg = DataConfig(
        train_urls=urls, batch_size=batch, num_workers=workers, shuffle_buffer=40, shuffle_initial=10, **extra
    )
    return build_train_loader(cfg, PREPROCESS, TOKENIZER, rank, world_size)


def layout(urls, world_size, workers, batch, **extra):
    return [make(urls, rank, world_size, workers, batch, **extra) for rank in range(world_size)]


def saved(loaders) -> list[dict]:
    states = [json.loads(json.dumps(loader.state_dict())) for loader in loaders]  # as the checkpoint stores them
    for loader in loaders:
        loader.close()
    return states


def rest_of_epoch(loaders) -> tuple[list[str], list[dict]]:
    """Every rank's keys until its epoch ends, and each rank's first batch of the next epoch."""
    keys, next_epoch = [], []
    for loader in loaders:
        epoch = loader.epoch
        while True:
            batch = next(loader)
            if loader.epoch != epoch:
                next_epoch.append(batch)
                break
            keys += batch["keys"]
    return keys, next_epoch


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> str:
    return write_uneven_shards(tmp_path_factory.mktemp("uneven"), with_sizes=True)


CHANGES = {  # (world size, workers, batch) before → after
    "2to1_ranks": ((2, 0, 8), (1, 0, 8)),
    "1to2_ranks": ((1, 0, 8), (2, 0, 8)),
    "2to4_ranks": ((2, 0, 8), (4, 0, 8)),
    "4to2_ranks": ((4, 0, 8), (2, 0, 8)),
    "2to0_workers": ((2, 2, 8), (2, 0, 8)),
    "0to2_workers": ((2, 0, 8), (2, 2, 8)),
    "batch_8to12": ((2, 0, 8), (2, 0, 12)),
    "all_three": ((4, 1, 8), (1, 2, 12)),
}


@pytest.mark.parametrize("change", CHANGES)
def test_the_rest_of_the_epoch_reads_every_remaining_sample_once(uneven, change):
    (world, workers, batch), (new_world, new_workers, new_batch) = CHANGES[change]
    first = layout(uneven, world, workers, batch)
    seen = [key for loader in first for _ in range(5) for key in next(loader)["keys"]]
    states = saved(first)
    resumed = layout(uneven, new_world, new_workers, new_batch)
    for loader in resumed:
        loader.load_state_dicts(states)
    rest, next_epoch = rest_of_epoch(resumed)
    counts = Counter(seen + rest)
    duplicates = [key for key, n in counts.items() if n > 1]
    missing = sum(SHARD_SIZES) - len(counts)
    left_in_unfilled_batches = sum(loader.unbatched.get(0, 0) for loader in resumed)
    print(f"{change}: {len(seen)} seen before, {len(rest)} after, {len(duplicates)} duplicates, {missing} missing")
    assert not duplicates
    assert missing == left_in_unfilled_batches < new_world * max(1, new_workers) * new_batch
    for rank, loader in enumerate(resumed):  # the next epoch: an ordinary one of the new layout
        loader.close()
        fresh = make(uneven, rank, new_world, new_workers, new_batch)
        fresh.epoch = 1
        expected = next(fresh)
        fresh.close()
        assert next_epoch[rank]["keys"] == expected["keys"]
        assert torch.equal(next_epoch[rank]["images"], expected["images"])


def test_a_resharded_epoch_resumes_bit_identically_on_its_own_layout(uneven):
    first = layout(uneven, 2, 0, 8)
    seen = [key for loader in first for _ in range(2) for key in next(loader)["keys"]]
    resumed = layout(uneven, 1, 0, 8)[0]
    resumed.load_state_dicts(saved(first))
    seen += [key for _ in range(3) for key in next(resumed)["keys"]]
    state = json.loads(json.dumps(resumed.state_dict()))
    expected = [next(resumed) for _ in range(20)]  # into the next epoch
    again = make(uneven, 0, 1, 0, 8)
    again.load_state_dicts([state])
    for want in expected:
        got = next(again)
        assert got["keys"] == want["keys"] and torch.equal(got["images"], want["images"])
    # resharding again from there: what both earlier layouts trained on is still known
    twice = layout(uneven, 2, 0, 8)
    for loader in twice:
        loader.load_state_dicts([state])
    rest, _ = rest_of_epoch(twice)
    counts = Counter(seen + rest)
    assert max(counts.values()) == 1 and sum(SHARD_SIZES) - len(counts) == sum(t.unbatched.get(0, 0) for t in twice)


def test_resampled_mode_counts_the_samples_and_draws_afresh(uneven):
    first = layout(uneven, 2, 0, 8, mode="resampled")
    for loader in first:
        for _ in range(10):
            next(loader)
    states = saved(first)
    resumed = layout(uneven, 1, 0, 12, mode="resampled")[0]
    resumed.load_state_dicts(states)
    batches, _ = rest_of_epoch([resumed])
    assert len(batches) // 12 == (sum(SHARD_SIZES) - 2 * 10 * 8) // 12  # the epoch keeps its length in samples
    fresh = make(uneven, 0, 1, 0, 12, mode="resampled")
    assert batches[:12] != next(fresh)["keys"]  # fresh streams, not a replay of the epoch's start
    assert resumed.epoch == 1 and resumed.steps_per_epoch == sum(SHARD_SIZES) // 12


def test_what_cannot_be_resharded_is_refused_with_the_reason(uneven):
    first = layout(uneven, 2, 0, 8)
    for loader in first:
        next(loader)
    states = saved(first)
    with pytest.raises(ValueError, match="data.mode=epoch, this run has resampled"):
        make(uneven, 0, 1, 0, 8, mode="resampled").load_state_dicts(states)
    older = [{k: v for k, v in state.items() if k not in ("taken", "before")} for state in states]
    with pytest.raises(ValueError, match="does not record which samples were trained on.*world_size=2"):
        make(uneven, 0, 1, 0, 8).load_state_dicts(older)
    fewer = uneven.replace("00008", "00007")
    with pytest.raises(ValueError, match="sources had 9 shards, this run's have 8"):
        make(fewer, 0, 1, 0, 8).load_state_dicts(states)
