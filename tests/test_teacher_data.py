"""data.teacher: stored teacher embeddings travel with their samples through shuffling, skipped bad samples and
resume; a sample without a row is skipped and counted; a run with them trains and distils."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_pipeline import jpeg, loader

from clipforge.data.shards import write_tar
from clipforge.data.teacher import write_shard_embeddings

NUM_SHARDS, PER_SHARD, WIDTH = 4, 30, 6
BROKEN = {"000010003", "000020011"}  # corrupt images: skipped and counted, their teacher rows unused
UNLISTED = {"000030007", "000000020"}  # no teacher row: skipped as missing_teacher


def fingerprint(key: str) -> np.ndarray:
    """A teacher row that names its key: (D,) with the key's number in it."""
    return np.array([int(key), int(key) % 97, 1, 2, 3, 4], dtype=np.float32) / 1e9


@pytest.fixture(scope="module")
def shards_with_teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher")
    for shard in range(NUM_SHARDS):
        keys = [f"{shard:05d}{index:04d}" for index in range(PER_SHARD)]
        samples = [
            {"__key__": key, "jpg": b"broken" if key in BROKEN else jpeg((index * 8, 100, 50)), "txt": f"sample {key}"}
            for index, key in enumerate(keys)
        ]
        write_tar(root / "shards" / f"{shard:05d}.tar", iter(samples))
        listed = [key for key in keys if key not in UNLISTED]
        rows = np.stack([fingerprint(key) for key in listed])
        write_shard_embeddings(root / "teacher", f"{shard:05d}", listed, rows, -rows)
    (root / "teacher" / "teacher.json").write_text(json.dumps({"embed_dim": WIDTH, "temperature": 0.05}))
    return root


def assert_aligned(batch):
    for key, image, text in zip(batch["keys"], batch["teacher_image"], batch["teacher_text"]):
        np.testing.assert_array_equal(image.numpy(), fingerprint(key).astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal(text.numpy(), -image.numpy())


@pytest.mark.parametrize("workers", [0, 2])
def test_rows_stay_with_their_samples_through_shuffle_skips_and_resume(shards_with_teacher, workers):
    urls = f"{shards_with_teacher}/shards/{{00000..00003}}.tar"
    options = dict(workers=workers, batch_size=10, teacher=str(shards_with_teacher / "teacher"), shuffle_buffer=40)
    reference = loader(urls, **options)
    expected = [next(reference) for _ in range(16)]  # 116 usable samples: 11 batches an epoch; crosses into epoch 1
    seen = [key for batch in expected[:11] for key in batch["keys"]]
    assert sorted(seen) != seen  # shuffled
    assert not set(seen) & (BROKEN | UNLISTED)
    assert set(reference.skipped) == {"corrupt_image", "missing_teacher"}  # each counted, in every epoch
    assert min(reference.skipped.values()) >= 2
    for batch in expected:
        assert batch["teacher_image"].shape == (10, WIDTH) and batch["teacher_image"].dtype == torch.float32
        assert_aligned(batch)
    for stop in (5, 13):
        first = loader(urls, **options)
        for _ in range(stop):
            next(first)
        resumed = loader(urls, **options)
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        for want in expected[stop:]:
            got = next(resumed)
            assert got["keys"] == want["keys"]
            assert torch.equal(got["teacher_image"], want["teacher_image"])
            assert_aligned(got)


def test_a_wrong_teacher_folder_fails_before_any_worker(shards_with_teacher, tmp_path):
    with pytest.raises(FileNotFoundError, match="teacher.json"):
        loader(f"{shards_with_teacher}/shards/00000.tar", teacher=str(tmp_path))


def test_missing_rows_stop_a_strict_run_naming_the_sample(shards_with_teacher):
    from clipforge.data.pipeline import DataError

    run = loader(f"{shards_with_teacher}/shards/00003.tar", teacher=str(shards_with_teacher / "teacher"), strict=True)
    with pytest.raises(DataError, match="missing teacher at .*00003.tar:000030007"):
        for _ in range(10):
            next(run)


def test_training_distils_from_stored_embeddings_then_from_an_online_teacher(synth_data, tiny_resnet_json, tmp_path):
    import tarfile

    from test_train import config

    from clipforge.train.loop import train

    rng = np.random.default_rng(0)
    for shard in range(6):
        with tarfile.open(synth_data / "train" / f"{shard:05d}.tar") as tar:
            keys = list(dict.fromkeys(member.name.split(".")[0] for member in tar))
        rows = rng.normal(size=(len(keys), 8)).astype(np.float32)
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        write_shard_embeddings(tmp_path / "teacher", f"{shard:05d}", keys, rows, rows)
    (tmp_path / "teacher" / "teacher.json").write_text(json.dumps({"embed_dim": 8, "temperature": 0.1}))
    common = ("train.steps=3", "checkpoint.every=3", "loss.distill_weight=0.5", "data.num_workers=1")
    stored = config(synth_data, tiny_resnet_json, tmp_path / "stored", *common, f"data.teacher={tmp_path}/teacher")
    train(stored)
    records = [json.loads(line) for line in (tmp_path / "stored" / "metrics.jsonl").read_text().splitlines()]
    assert any(record.get("train/distill", 0) > 0 for record in records), records[0]
    online = config(
        synth_data,
        tiny_resnet_json,
        tmp_path / "online",
        *common,
        f"loss.distill_model={tmp_path}/stored/checkpoints/latest",
    )
    train(online)
    records = [json.loads(line) for line in (tmp_path / "online" / "metrics.jsonl").read_text().splitlines()]
    assert any(record.get("train/distill", 0) > 0 for record in records)


def test_distillation_needs_exactly_one_teacher(synth_data, tiny_resnet_json, tmp_path):
    from test_train import config

    from clipforge.config import ConfigError

    with pytest.raises(ConfigError, match="needs one teacher"):
        config(synth_data, tiny_resnet_json, tmp_path, "loss.distill_weight=0.5")
    with pytest.raises(ConfigError, match="loss.distill_weight=0 would not use it"):
        config(synth_data, tiny_resnet_json, tmp_path, f"data.teacher={tmp_path}")
