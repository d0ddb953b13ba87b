"""Sources: local, pipe: and fsspec shards; sample counts from sizes.json or img2dataset's stats; weights."""

from __future__ import annotations

import io
import json
from collections import Counter

import fsspec
import open_clip
import pytest
from PIL import Image

from clipforge.data import DataConfig, SourceConfig, build_train_loader
from clipforge.data.shards import write_tar
from clipforge.data.sources import Source, shard_sizes

PREPROCESS = {"size": (16, 16), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "interpolation": "bicubic"}
TOKENIZER = open_clip.get_tokenizer("ViT-B-32", context_length=16)


def jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (20, 20), (200, 30, 30)).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_source(root, prefix: str, shards: int, per_shard: int, counts: str = "sizes"):
    root.mkdir(parents=True, exist_ok=True)
    for shard in range(shards):
        write_tar(
            root / f"{shard:05d}.tar",
            iter(
                [
                    {"__key__": f"{prefix}{shard:02d}{i:04d}", "jpg": jpeg(), "txt": f"{prefix} sample"}
                    for i in range(per_shard)
                ]
            ),
        )
        if counts == "stats":  # img2dataset's per-shard file
            (root / f"{shard:05d}_stats.json").write_text(json.dumps({"count": per_shard + 3, "successes": per_shard}))
    if counts == "sizes":
        (root / "sizes.json").write_text(json.dumps({f"{s:05d}.tar": per_shard for s in range(shards)}))
    return f"{root}/{{00000..{shards - 1:05d}}}.tar"


def make_loader(sources, **options):
    cfg = DataConfig(
        sources=sources,
        batch_size=options.pop("batch_size", 10),
        num_workers=options.pop("workers", 0),
        shuffle_buffer=20,
        shuffle_initial=5,
        **options,
    )
    return build_train_loader(cfg, PREPROCESS, TOKENIZER)


def test_sample_counts_from_sizes_json_stats_files_or_the_config(tmp_path):
    a = write_source(tmp_path / "a", "a", 3, 7, counts="sizes")
    b = write_source(tmp_path / "b", "b", 2, 5, counts="stats")
    c = write_source(tmp_path / "c", "c", 2, 4, counts=None)
    assert sum(shard_sizes([f"{tmp_path}/a/{i:05d}.tar" for i in range(3)]).values()) == 21
    assert Source.resolve(SourceConfig(urls=a), 0).num_samples == 21
    assert Source.resolve(SourceConfig(urls=b), 1).num_samples == 10  # "successes", not "count"
    assert Source.resolve(SourceConfig(urls=c), 2).num_samples is None
    assert Source.resolve(SourceConfig(urls=c, num_samples=8), 2).num_samples == 8
    with pytest.raises(ValueError, match=r"data\.sources\[1\]: resampled mode needs the sample count"):
        make_loader([SourceConfig(urls=a), SourceConfig(urls=c)], mode="resampled")
    # with data.epoch_samples a lone source needs no count, but mixing needs each source's (weights are per sample)
    assert make_loader([SourceConfig(urls=c)], mode="resampled", epoch_samples=20).steps_per_epoch == 2
    with pytest.raises(ValueError, match=r"data\.sources\[1\]: resampled mode needs its sample count to weight"):
        make_loader([SourceConfig(urls=a), SourceConfig(urls=c)], mode="resampled", epoch_samples=20)


def test_epoch_mode_reads_every_source_once(tmp_path):
    a = write_source(tmp_path / "a", "a", 3, 10)
    b = write_source(tmp_path / "b", "b", 2, 10)
    loader = make_loader([SourceConfig(urls=a), SourceConfig(urls=b)], batch_size=5)
    keys = []
    while loader.epoch == 0:
        batch = next(loader)
        keys += batch["keys"] if loader.epoch == 0 else []
    assert sorted(keys) == sorted(
        [f"a{s:02d}{i:04d}" for s in range(3) for i in range(10)]
        + [f"b{s:02d}{i:04d}" for s in range(2) for i in range(10)]
    )
    with pytest.raises(ValueError, match=r"data\.sources\[1\]\.weight=3\.0: weights only apply in resampled mode"):
        make_loader([SourceConfig(urls=a), SourceConfig(urls=b, weight=3.0)])


def test_resampled_weights_are_per_sample_proportions(tmp_path):
    # source a has big shards, b small ones: per-sample weights must correct for that
    a = write_source(tmp_path / "a", "a", 2, 40)
    b = write_source(tmp_path / "b", "b", 4, 10)
    loader = make_loader(
        [SourceConfig(urls=a, weight=1.0), SourceConfig(urls=b, weight=3.0)],
        mode="resampled",
        epoch_samples=4000,
        batch_size=50,
    )
    counts = Counter(key[0] for _ in range(loader.steps_per_epoch) for key in next(loader)["keys"])
    share_b = counts["b"] / (counts["a"] + counts["b"])
    assert 0.68 < share_b < 0.82, counts  # 3:1 → 75% of samples from b


def test_resampled_weights_use_num_samples_when_shards_have_no_counts(tmp_path):
    # like an hf:// or s3:// source with only data.sources[i].num_samples: its shard size is num_samples / shards
    a = write_source(tmp_path / "a", "a", 2, 40)
    b = write_source(tmp_path / "b", "b", 4, 10, counts=None)
    loader = make_loader(
        [SourceConfig(urls=a, weight=1.0), SourceConfig(urls=b, weight=3.0, num_samples=40)],
        mode="resampled",
        epoch_samples=4000,
        batch_size=50,
    )
    counts = Counter(key[0] for _ in range(loader.steps_per_epoch) for key in next(loader)["keys"])
    share_b = counts["b"] / (counts["a"] + counts["b"])
    assert 0.68 < share_b < 0.82, counts  # 3:1 → 75% from b (it was 100%: b's shards counted as 1 sample each)


def test_pipe_and_fsspec_urls(tmp_path):
    local = write_source(tmp_path / "a", "a", 2, 6)
    piped = f"pipe:cat {tmp_path}/a/{{00000..00001}}.tar"
    memory = fsspec.filesystem("memory")
    for shard in range(2):
        memory.pipe(f"/bench/{shard:05d}.tar", (tmp_path / "a" / f"{shard:05d}.tar").read_bytes())
    memory.pipe("/bench/sizes.json", json.dumps({"00000.tar": 6, "00001.tar": 6}).encode())
    for urls in (local, piped, "memory://bench/{00000..00001}.tar", f"file://{tmp_path}/a/{{00000..00001}}.tar"):
        loader = make_loader([SourceConfig(urls=urls)], batch_size=4)
        keys = []
        while loader.epoch == 0:
            batch = next(loader)
            keys += batch["keys"] if loader.epoch == 0 else []
        assert sorted(keys) == sorted(f"a{s:02d}{i:04d}" for s in range(2) for i in range(6)), urls
        assert loader.skipped_before == Counter(), urls
    assert Source.resolve(SourceConfig(urls="memory://bench/{00000..00001}.tar"), 0).num_samples == 12


def test_a_failing_pipe_is_an_unreadable_shard(tmp_path):
    good = write_source(tmp_path / "a", "a", 1, 8)
    loader = make_loader([SourceConfig(urls=f"{good}::pipe:cat {tmp_path}/nowhere.tar")], batch_size=4)
    keys = []
    while loader.epoch == 0:
        batch = next(loader)
        keys += batch["keys"] if loader.epoch == 0 else []
    assert len(keys) == 8 and loader.skipped_before["unreadable_shard"] >= 1
