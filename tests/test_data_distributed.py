"""2 ranks × 2 workers over uneven shards: no hang, no duplicate, same number of steps on every rank."""

from __future__ import annotations

import io
import json
from collections import Counter

import open_clip
import pytest
from PIL import Image
from ranks import run_ranks

from clipforge.data import DataConfig, build_train_loader
from clipforge.data.shards import write_tar
from clipforge.distributed import DistInfo, make_agreement

PREPROCESS = {"size": (16, 16), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "interpolation": "bicubic"}
SHARD_SIZES = [10, 50, 120, 30, 80, 200, 15, 60, 95]  # 660 samples, very uneven
BATCH = 8


def write_uneven_shards(root, with_sizes: bool):
    buffer = io.BytesIO()
    Image.new("RGB", (20, 20), (10, 200, 30)).save(buffer, format="JPEG")
    for shard, size in enumerate(SHARD_SIZES):
        write_tar(
            root / f"{shard:05d}.tar",
            iter(
                [
                    {"__key__": f"{shard:03d}{i:04d}", "jpg": buffer.getvalue(), "txt": f"sample {i} of shard {shard}"}
                    for i in range(size)
                ]
            ),
        )
    if with_sizes:
        (root / "sizes.json").write_text(json.dumps({f"{s:05d}.tar": n for s, n in enumerate(SHARD_SIZES)}))
    return f"{root}/{{00000..{len(SHARD_SIZES) - 1:05d}}}.tar"


def make_loader(urls, rank, world_size, mode, agree=None, **extra):
    cfg = DataConfig(
        train_urls=urls, batch_size=BATCH, num_workers=2, shuffle_buffer=40, shuffle_initial=10, mode=mode, **extra
    )
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=16)
    return build_train_loader(
        cfg, PREPROCESS, tokenizer, rank, world_size, **({} if agree is None else {"agree": agree})
    )


def first_epoch_keys(rank, world_size, urls, mode, extra):
    loader = make_loader(
        urls, rank, world_size, mode, make_agreement(DistInfo(rank=rank, world_size=world_size)), **extra
    )
    steps = []
    while loader.epoch == 0:
        steps.append(next(loader)["keys"])
    return {"steps": steps[:-1], "steps_per_epoch": loader.steps_per_epoch}


@pytest.mark.parametrize("with_sizes", [True, False])
def test_epoch_mode_no_duplicates_and_equal_steps(tmp_path, with_sizes):
    urls = write_uneven_shards(tmp_path, with_sizes)
    ranks = run_ranks(first_epoch_keys, 2, tmp_path / "out", urls, "epoch", {})
    assert len(ranks[0]["steps"]) == len(ranks[1]["steps"]) > 0  # the same number of steps: nobody waits forever
    keys = [key for rank in ranks for step in rank["steps"] for key in step]
    assert all(len(step) == BATCH for rank in ranks for step in rank["steps"])
    duplicates = [key for key, n in Counter(keys).items() if n > 1]
    assert not duplicates
    if with_sizes:  # balanced by sample counts: little is dropped at the epoch's end
        assert len(keys) >= sum(SHARD_SIZES) - 2 * 2 * BATCH * 2, len(keys)


def test_resampled_mode_equal_steps_from_the_sample_count(tmp_path):
    urls = write_uneven_shards(tmp_path, with_sizes=True)
    ranks = run_ranks(first_epoch_keys, 2, tmp_path / "out", urls, "resampled", {})
    expected = sum(SHARD_SIZES) // (BATCH * 2)
    assert [len(rank["steps"]) for rank in ranks] == [expected, expected]
    assert ranks[0]["steps_per_epoch"] == expected
    # draws differ per rank (seeded by rank) and cover more than one shard
    keys0 = {key for step in ranks[0]["steps"] for key in step}
    keys1 = {key for step in ranks[1]["steps"] for key in step}
    assert keys0 != keys1 and len({key[:3] for key in keys0 | keys1}) > 3


def test_too_few_shards_is_an_error_or_resampling(tmp_path):
    urls = write_uneven_shards(tmp_path, with_sizes=True).replace("00008", "00002")  # 3 shards, 2 × 2 readers
    with pytest.raises(ValueError, match=r"3 shards cannot feed world_size × num_workers = 4.*shard_shortage"):
        make_loader(urls, 0, 2, "epoch")
    loader = make_loader(urls, 1, 2, "epoch", shard_shortage="resample")
    assert loader.dataset.mode == "resampled"
    assert loader.steps_per_epoch == (10 + 50 + 120) // (BATCH * 2)
    assert len(next(loader)["keys"]) == BATCH
