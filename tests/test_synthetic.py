import hashlib
import io
import json
import tarfile

import pytest
from PIL import Image

from clipforge.data import synthetic
from clipforge.data.shards import FIXED_MTIME, SyntheticSpec, write_synthetic, write_tar


def tar_members(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_same_seed_same_bytes_whatever_the_process_count(tmp_path):
    digests = []
    for workers, name in ((1, "a"), (2, "b")):
        write_synthetic(
            SyntheticSpec(
                out=str(tmp_path / name),
                num_samples=60,
                samples_per_shard=25,
                image_size=32,
                num_eval_samples=10,
                num_retrieval_samples=5,
                num_workers=workers,
            ),
            progress=False,
        )
        files = sorted(p for p in (tmp_path / name).rglob("*") if p.is_file())
        digests.append({str(p.relative_to(tmp_path / name)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files})
    assert digests[0] == digests[1]
    assert "train/00002.tar" in digests[0] and "eval/retrieval/test/0.tar" in digests[0]
    assert (
        "eval/segmentation/annotations/test/s0000000.png" in digests[0]
        and "eval/referring/refs_test.json" in digests[0]
    )


def test_shard_members_are_plain_ustar_entries(tmp_path):
    """One header block per member: no pax header (tarfile writes one for a float mtime)."""
    path = tmp_path / "a.tar"
    assert write_tar(path, iter([{"__key__": "k0", "txt": b"a caption", "json": b"{}"}])) == 1
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    assert sorted(m.name for m in members) == ["k0.json", "k0.txt"]
    assert all(m.pax_headers == {} and m.mtime == FIXED_MTIME for m in members)


def test_other_seed_other_data():
    images = []
    for seed in (0, 1):
        rng = synthetic.sample_rng(seed, "train", 5)
        images.append(synthetic.render(synthetic.sample_scene(rng), rng).tobytes())
    assert images[0] != images[1]


def test_img2dataset_layout_and_captions_describe_the_scene(synth_data):
    members = tar_members(synth_data / "train" / "00000.tar")
    keys = sorted({name.split(".")[0] for name in members})
    assert len(keys) == 500 and keys[0] == "000000000"
    sizes = json.loads((synth_data / "train" / "sizes.json").read_text())
    assert sizes["00000.tar"] == 500 and sum(sizes.values()) == 3000
    for key in keys[:100]:
        text = members[f"{key}.txt"].decode()
        meta = json.loads(members[f"{key}.json"])
        assert meta["caption"] == text and meta["key"] == key
        image = Image.open(io.BytesIO(members[f"{key}.jpg"]))
        assert image.format == "JPEG" and image.size == (32, 32)
        names_colors = any(color in text for color in synthetic.COLORS)  # some captions leave colour out
        for obj in meta["scene"]["objects"]:
            assert obj["color"] in text or not names_colors
            assert obj["shape"] in text or synthetic.PLURALS[obj["shape"]] in text


def test_training_never_shows_heldout_combinations_but_eval_does(synth_data):
    seen = set()
    for shard in sorted((synth_data / "train").glob("*.tar")):
        for name, data in tar_members(shard).items():
            if name.endswith(".json"):
                seen |= {(o["shape"], o["color"]) for o in json.loads(data)["scene"]["objects"]}
    assert not seen & synthetic.HELDOUT_COMBOS
    assert len(seen) == len(synthetic.SHAPES) * len(synthetic.COLORS) - len(synthetic.HELDOUT_COMBOS)
    eval_members = tar_members(synth_data / "eval" / "shapes" / "test" / "0.tar")
    eval_combos = [
        (o["shape"], o["color"])
        for name, data in eval_members.items()
        if name.endswith(".json")
        for o in json.loads(data)["objects"]
    ]
    unseen = sum(combo in synthetic.HELDOUT_COMBOS for combo in eval_combos)
    assert 0.4 < unseen / len(eval_combos) < 0.6


def test_clip_benchmark_layout(synth_data):
    shapes = synth_data / "eval" / "shapes"
    assert (shapes / "test" / "nshards.txt").read_text().strip() == "1"
    assert (shapes / "classnames.txt").read_text().split() == list(synthetic.SHAPES)
    assert all("{c}" in t for t in (shapes / "zeroshot_classification_templates.txt").read_text().splitlines())
    members = tar_members(shapes / "test" / "0.tar")
    labels = [int(v) for k, v in members.items() if k.endswith(".cls")]
    assert len(labels) == 300 and set(labels) == set(range(len(synthetic.SHAPES)))
    retrieval = synth_data / "eval" / "retrieval"
    assert (retrieval / "dataset_type.txt").read_text().strip() == "retrieval"
    captions = [
        v.decode().splitlines() for k, v in tar_members(retrieval / "test" / "0.tar").items() if k.endswith(".txt")
    ]
    assert len(captions) == 100 and all(len(c) == 5 for c in captions)
    assert sum(len(set(c)) for c in captions) / len(captions) > 3  # mostly distinct phrasings


def small_spec(out, **changes) -> SyntheticSpec:
    values = dict(num_samples=30, samples_per_shard=10, image_size=16, num_eval_samples=2, num_retrieval_samples=2)
    values.update(num_eval_train_samples=0, num_workers=1)
    return SyntheticSpec(out=str(out), **{**values, **changes})


def test_a_rerun_keeps_complete_shards_refuses_other_settings_and_overwrite_replaces(tmp_path):
    spec = small_spec(tmp_path / "s")
    write_synthetic(spec, progress=False)
    train = tmp_path / "s" / "train"
    first = {p.name: p.read_bytes() for p in train.glob("*.tar")}
    (train / "00001.tar").unlink()
    kept = {name: (train / name).stat().st_mtime_ns for name in ("00000.tar", "00002.tar")}
    assert write_synthetic(spec, progress=False)["train_samples"] == 30
    assert {p.name: p.read_bytes() for p in train.glob("*.tar")} == first
    assert {name: (train / name).stat().st_mtime_ns for name in kept} == kept  # not written again
    with pytest.raises(ValueError, match=r"train holds shards written with other settings: seed 0 \(this run: 1\)"):
        write_synthetic(small_spec(tmp_path / "s", seed=1), progress=False)
    assert {p.name: p.read_bytes() for p in train.glob("*.tar")} == first
    write_synthetic(small_spec(tmp_path / "s", seed=1), progress=False, overwrite=True)
    replaced = {p.name: p.read_bytes() for p in train.glob("*.tar")}
    assert replaced.keys() == first.keys() and all(replaced[name] != first[name] for name in first)
    assert json.loads((train / "00000_stats.json").read_text())["settings"]["seed"] == 1


def test_an_out_with_other_files_is_refused_and_a_dropped_probe_split_is_removed(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "my_data").mkdir()
    with pytest.raises(ValueError, match=r"s holds 1 entry prep did not write \(my_data/\)"):
        write_synthetic(small_spec(tmp_path / "s"), progress=False, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["my_data"]
    write_synthetic(small_spec(tmp_path / "t", num_eval_train_samples=2), progress=False)
    assert (tmp_path / "t" / "eval" / "shapes" / "train" / "0.tar").is_file()
    write_synthetic(small_spec(tmp_path / "t"), progress=False)  # the same training shards, no probe split
    assert not (tmp_path / "t" / "eval" / "shapes" / "train" / "0.tar").exists()
