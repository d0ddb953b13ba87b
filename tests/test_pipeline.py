import io
import json
import logging
from collections import Counter

import open_clip
import pytest
import torch
from PIL import Image

from clipforge.data import DataConfig, build_train_loader
from clipforge.data.pipeline import DataError
from clipforge.data.shards import write_tar

PREPROCESS = {"size": (32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "interpolation": "bicubic"}
TOKENIZER = open_clip.get_tokenizer("ViT-B-32", context_length=24)


def jpeg(color=(200, 30, 30), size=32) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="JPEG")
    return buffer.getvalue()


def loader(urls, rank=0, world_size=1, agree=None, **overrides):
    sources = {"train_urls": urls} if isinstance(urls, str) else {"sources": urls}
    cfg = DataConfig(
        **sources,
        batch_size=overrides.pop("batch_size", 16),
        num_workers=overrides.pop("workers", 0),
        shuffle_buffer=overrides.pop("shuffle_buffer", 50),
        shuffle_initial=10,
        **overrides,
    )
    return build_train_loader(
        cfg, PREPROCESS, TOKENIZER, rank, world_size, **({} if agree is None else {"agree": agree})
    )


def test_batches_have_the_right_shapes(synth_data):
    batches = loader(f"{synth_data}/train/{{00000..00005}}.tar", workers=2)
    batch = next(batches)
    assert batch["images"].shape == (16, 3, 32, 32) and batch["images"].dtype == torch.uint8
    assert batch["texts"].shape == (16, 24) and batch["texts"].dtype == torch.long
    assert len(batch["keys"]) == 16 and len(set(batch["keys"])) == 16
    assert batches.skipped == {}


def test_an_epoch_sees_every_sample_once(synth_data):
    batches = loader(f"{synth_data}/train/{{00000..00005}}.tar", workers=2, batch_size=100)
    keys = []
    while batches.epoch == 0:
        keys += next(batches)["keys"]
    keys = keys[:-100]  # the first batch of epoch 1
    assert len(keys) == len(set(keys)) == 3000


def test_corrupt_samples_are_skipped_and_counted(tmp_path, caplog):
    good = [{"__key__": f"g{i:03d}", "jpg": jpeg(), "txt": f"a red square number {i}"} for i in range(40)]
    bad = [
        {"__key__": "b_corrupt", "jpg": b"\xff\xd8\xff not really a jpeg", "txt": "broken"},
        {"__key__": "b_zero", "jpg": b"", "txt": "zero bytes"},
        {"__key__": "b_truncated", "jpg": jpeg()[:60], "txt": "cut short"},
        {"__key__": "b_utf8", "jpg": jpeg(), "txt": b"\xff\xfe caption"},
        {"__key__": "b_empty", "jpg": jpeg(), "txt": "   \n "},
        {"__key__": "b_nocaption", "jpg": jpeg()},
        {"__key__": "b_noimage", "txt": "an image went missing"},
    ]
    write_tar(tmp_path / "0.tar", iter(good[:20] + bad))
    write_tar(tmp_path / "1.tar", iter(good[20:]))
    whole = (tmp_path / "1.tar").read_bytes()
    (tmp_path / "2.tar").write_bytes(whole[: len(whole) // 2])  # truncated tar: its first samples still count
    with caplog.at_level(logging.WARNING):
        batches = loader(f"{tmp_path}/{{0..3}}.tar", batch_size=4, shuffle_buffer=1)  # 3.tar does not exist
        keys = []
        while batches.epoch == 0:
            keys += next(batches)["keys"]
    skipped = batches.skipped
    assert skipped["corrupt_image"] == 3
    assert skipped["bad_caption"] == 1 and skipped["missing_caption"] == 1  # not UTF-8; no .txt
    assert skipped["empty_caption"] == 1 and skipped["missing_image"] == 1
    assert skipped["unreadable_shard"] == 1 and skipped["truncated_tar"] == 1  # the cut counted once
    assert not any(k.startswith("b_") for k in keys)
    assert "3.tar" in caplog.text and "b_corrupt" in caplog.text


def test_no_shards_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="none of the 2 shards exist"):
        loader(f"{tmp_path}/{{0..1}}.tar")
    write_tar(tmp_path / "0.tar", iter([{"__key__": "a", "jpg": jpeg(), "txt": "x"}]))
    with pytest.raises(ValueError, match="world_size × num_workers"):
        loader(f"{tmp_path}/0.tar", workers=2)


@pytest.mark.parametrize("mode", ["epoch", "resampled"])
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_gives_exactly_the_same_batches(synth_data, workers, mode):
    urls = f"{synth_data}/train/{{00000..00005}}.tar"
    options = dict(workers=workers, batch_size=64, mode=mode)
    reference = loader(urls, **options)
    expected = [next(reference) for _ in range(60)]  # crosses into epoch 1
    assert reference.epoch == 1
    for stop in (17, 45):  # mid-epoch 0, and mid-epoch 1
        first = loader(urls, **options)
        for _ in range(stop):
            next(first)
        state = json.loads(json.dumps(first.state_dict()))  # what the checkpoint stores
        resumed = loader(urls, **options)
        resumed.load_state_dict(state)
        for want in expected[stop:]:
            got = next(resumed)
            assert got["keys"] == want["keys"]
            assert torch.equal(got["images"], want["images"])  # the same random crops
            assert torch.equal(got["texts"], want["texts"])


def test_resume_refuses_a_different_layout(synth_data):
    urls = f"{synth_data}/train/{{00000..00005}}.tar"
    state = loader(urls, workers=2).state_dict()
    with pytest.raises(ValueError, match="num_workers=2"):
        loader(urls, workers=0).load_state_dict(state)


def all_of_epoch(batches):
    keys, texts = [], []
    while batches.epoch == 0:
        batch = next(batches)
        if batches.epoch == 0:
            keys += batch["keys"]
            texts += batch["texts"].tolist()
    return keys, texts


def test_captions_from_json_lists_lines_and_cleaned(tmp_path):
    options = ["a red square", "a crimson box", "one red block"]
    samples = [
        {
            "__key__": f"s{i:02d}",
            "jpg": jpeg(),
            "txt": "\n".join(options) + "\n",
            "json": json.dumps({"captions": options, "title": "caf\u00c3\u00a9 &amp;   t\u00e9a\t\n"}),
        }
        for i in range(40)
    ]
    samples.append(
        {"__key__": "s_empty", "jpg": jpeg(), "txt": "x", "json": json.dumps({"captions": [], "title": " "})}
    )
    write_tar(tmp_path / "0.tar", iter(samples))
    urls = str(tmp_path / "0.tar")

    expected = {tuple(TOKENIZER([option])[0].tolist()): option for option in options}
    for key in ("json:captions", "txt:lines"):
        batches = loader(urls, batch_size=5, caption_key=key)
        keys, texts = all_of_epoch(batches)
        chosen = Counter(expected[tuple(t)] for t in texts)  # every token row is one whole option
        assert set(chosen) == set(options) and min(chosen.values()) >= 5, chosen  # picked at random, all used
    # ftfy + html unescape + whitespace, as open_clip cleans: mojibake "cafÃ©" becomes "café"
    batches = loader(urls, batch_size=5, caption_key="json:title")
    keys, texts = all_of_epoch(batches)
    assert texts[0] == TOKENIZER(["café & téa"])[0].tolist()
    assert dict(batches.skipped_before) == {"empty_caption": 1}
    # the whole txt is one caption by default
    keys, texts = all_of_epoch(loader(urls, batch_size=5))
    assert texts[0] == TOKENIZER([" ".join(options)])[0].tolist()


def test_strict_mode_stops_at_the_first_bad_input_naming_it(tmp_path):
    write_tar(
        tmp_path / "0.tar",
        iter(
            [{"__key__": f"g{i}", "jpg": jpeg(), "txt": "fine"} for i in range(5)]
            + [{"__key__": "b_corrupt", "jpg": b"\xff\xd8\xff junk", "txt": "broken"}]
        ),
    )
    with pytest.raises(DataError, match=r"corrupt image at .*0\.tar:b_corrupt.*data\.strict"):
        next(loader(str(tmp_path / "0.tar"), batch_size=8, strict=True))


def test_bad_input_costs_no_sleep_and_the_pixel_limit_is_configurable(tmp_path, monkeypatch, caplog):
    import time

    monkeypatch.setattr(time, "sleep", lambda seconds: pytest.fail(f"slept {seconds} s for a bad sample"))
    big = io.BytesIO()
    Image.new("RGB", (300, 300), (5, 5, 5)).save(big, format="PNG")
    samples = [{"__key__": f"b{i:03d}", "jpg": b"\xff\xd8\xff bad", "txt": "broken"} for i in range(200)]
    samples += [{"__key__": f"big{i}", "png": big.getvalue(), "txt": "too many pixels"} for i in range(3)]
    samples += [{"__key__": f"g{i:03d}", "jpg": jpeg(), "txt": "fine"} for i in range(20)]
    write_tar(tmp_path / "0.tar", iter(samples))
    with caplog.at_level(logging.WARNING):
        batches = loader(str(tmp_path / "0.tar"), batch_size=4, max_image_pixels=200 * 200)
        keys, _ = all_of_epoch(batches)
    assert dict(batches.skipped_before) == {"corrupt_image": 200, "decompression_bomb": 3}  # epoch 0's counts
    assert sorted(keys) == [f"g{i:03d}" for i in range(20)]
    next(batches)  # well into epoch 1, where the same bad samples are met again
    assert caplog.text.count("skipping corrupt image") == 1  # logged once per kind per run, with shard and key
    assert caplog.text.count("skipping decompression bomb") == 1 and "0.tar:big" in caplog.text


def test_workers_can_normalise_for_a_cpu_run(synth_data):
    urls = f"{synth_data}/train/{{00000..00005}}.tar"
    raw = loader(urls, workers=2, batch_size=32)
    cfg = DataConfig(train_urls=urls, batch_size=32, num_workers=2, shuffle_buffer=50, shuffle_initial=10)
    normalised = build_train_loader(cfg, PREPROCESS, TOKENIZER, normalize_in_workers=True)
    for _ in range(3):
        a, b = next(raw), next(normalised)
        assert a["keys"] == b["keys"] and b["images"].dtype == torch.float32
        expected = raw.transform.normalize(a["images"])
        assert torch.allclose(b["images"], expected) and b["images"].mean().abs() < 3
        assert normalised.transform.normalize(b["images"]) is b["images"]  # the trainer's call passes it through
        assert torch.allclose(expected, (a["images"].float() / 255 - 0.5) / 0.25, atol=1e-5)  # PREPROCESS mean, std


CLOSE_SCRIPT = """
import sys
from clipforge.train.config import load_config
from clipforge.data.loader import build_train_loader
from clipforge.models import build_model

cfg = load_config(None, [f"data.train_urls={sys.argv[1]}/train/{{00000..00005}}.tar", "data.batch_size=32",
                         "data.num_workers=2", f"model.name={sys.argv[2]}"])
built = build_model(cfg.model)
LOADER = build_train_loader(cfg.data, built.preprocess_cfg, built.tokenizer, normalize_in_workers=True)
next(LOADER)
workers = list(LOADER._iterator._workers)
CYCLE = [LOADER]
CYCLE.append(CYCLE)  # still referenced when the interpreter exits, as objects in a reference cycle can be
LOADER.close()
print("alive after close:", sum(worker.is_alive() for worker in workers), flush=True)
"""


def test_close_stops_the_workers_so_the_process_can_exit(synth_data, tiny_resnet_json):
    """Workers ignore SIGTERM; without close() a process still holding the loader at exit waits for them forever
    (multiprocessing terminates daemonic children with SIGTERM, then joins them): seen as a hung SLURM job."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", CLOSE_SCRIPT, str(synth_data), tiny_resnet_json],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "alive after close: 0" in done.stdout


def test_missing_shards_are_found_by_listing_each_directory_once(tmp_path, monkeypatch):
    """At 200,000 shards a stat per shard per rank is a metadata storm: existence comes from one listing per
    directory, and the answer equals a stat of each shard."""
    from pathlib import Path

    from clipforge.data import sources

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for index in range(0, 300, 3):  # every third shard exists
            (tmp_path / name / f"{index:05d}.tar").write_bytes(b"")
    shards = [str(tmp_path / name / f"{index:05d}.tar") for name in ("a", "b", "c") for index in range(300)]
    truth = [shard for shard in shards if not Path(shard).exists()]
    listed, stats = [], []
    real_listdir, real_exists = sources.os.listdir, Path.exists
    monkeypatch.setattr(sources.os, "listdir", lambda d: listed.append(d) or real_listdir(d))
    monkeypatch.setattr(Path, "exists", lambda self: stats.append(self) or real_exists(self))
    assert sources.missing_local(shards) == truth
    assert len(listed) == 3  # a, b and the absent c, once each
    assert len(stats) == 2 * 200 + 300  # only the names a listing lacks are stat'ed
    monkeypatch.undo()
    assert sources.missing_local([*shards[:3], "pipe:cat x", "s3://bucket/0.tar"]) == truth[:2]
