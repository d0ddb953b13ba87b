"""clipforge.data.prep: tables and HF datasets → img2dataset-layout shards; clipforge.data.inspection checks them;
OpenCLIP reads the output."""

from __future__ import annotations

import argparse
import io
import json
import logging
import re
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from clipforge.cli import build_parser, main
from clipforge.data import prep
from clipforge.data.inspection import inspect_shards
from clipforge.data.shards import write_tar

SAMPLES_PER_SHARD = 5
NUM_GOOD = 24
BAD_ROWS = {3: "missing_file", 8: "corrupt_image", 13: "empty_caption"}
FORMATS = ("JPEG", "PNG", "WEBP", "BMP")
STORED_AS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "png"}  # BMP is re-encoded; the others kept as-is


def caption_of(index: int) -> str:
    return f"a picture number {index} with {index % 5 + 1} stripes"


def key_of(row: int) -> str:
    return f"{row // SAMPLES_PER_SHARD:05d}{row % SAMPLES_PER_SHARD:04d}"


def read_shards(directory: Path) -> dict[str, dict[str, bytes]]:
    """Every sample of every shard under ``directory``: key → {extension: bytes}."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(directory.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                key, extension = member.name.split(".", 1)
                samples.setdefault(key, {})[extension] = tar.extractfile(member).read()
    return samples


def read_shards_of(shard: Path) -> list[str]:
    with tarfile.open(shard) as tar:
        return sorted({member.name.split(".")[0] for member in tar})


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    """Images in several formats and sizes, and the rows of a table naming them: 24 good rows and 3 bad ones."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "images").mkdir()
    rows, good = [], {}
    for row in range(NUM_GOOD + len(BAD_ROWS)):
        kind = BAD_ROWS.get(row)
        name = f"images/{row:03d}.{'jpg' if kind else FORMATS[row % 4].lower()}"
        caption = "" if kind == "empty_caption" else caption_of(row)
        if kind == "missing_file":
            name = "images/not-there.jpg"
        elif kind == "corrupt_image":
            (root / name).write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
        else:
            size = (24 + 3 * row, 40 - row % 7)
            Image.new("RGB", size, (10 * row % 256, 80, 160)).save(root / name, format=FORMATS[row % 4])
            if not kind:
                good[row] = (root / name, caption)
        # one absolute path: relative ones resolve against the table's directory
        rows.append({"filepath": str(root / name) if row == 1 else name, "title": caption, "other": row})
    import pandas as pd

    frame = pd.DataFrame(rows)
    frame.to_csv(root / "table.csv", index=False)
    frame.to_parquet(root / "table.parquet")
    return {"root": root, "good": good, "num_rows": len(rows)}


@pytest.fixture(scope="module")
def table_shards(inputs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("table_shards")
    prep.write_from_table(
        inputs["root"] / "table.csv",
        out,
        "filepath",
        "title",
        samples_per_shard=SAMPLES_PER_SHARD,
        num_workers=2,
        progress=False,
    )
    return out


def assert_round_trip(out: Path, good: dict[int, tuple[Path, str]], rows_known: bool = True) -> None:
    """Every good row is one sample with its caption and its image's original bytes (BMP: pixels, as PNG).

    ``rows_known=False``: the source may order rows its own way, so samples are matched by their (unique) caption.
    """
    samples = read_shards(out)
    assert len(samples) == len(good)
    by_caption = {sample["txt"].decode(): (key, sample) for key, sample in samples.items()}
    for row, (path, caption) in good.items():
        key, sample = by_caption[caption]
        meta = json.loads(sample["json"])
        assert meta["key"] == key and meta["caption"] == caption and meta["url"].endswith(path.name)
        assert key == key_of(meta["row"])
        if rows_known:
            assert key == key_of(row) and meta["row"] == row
        source_format = Image.open(path).format
        image_extension = STORED_AS[source_format]
        assert set(sample) == {image_extension, "txt", "json"}
        stored = Image.open(io.BytesIO(sample[image_extension]))
        assert (meta["width"], meta["height"]) == stored.size == Image.open(path).size
        if source_format == "BMP":
            assert stored.convert("RGB").tobytes() == Image.open(path).convert("RGB").tobytes()
        else:
            assert sample[image_extension] == path.read_bytes()


@pytest.mark.parametrize("table", ["table.csv", "table.parquet"])
def test_table_to_shards_round_trips_every_good_row_and_counts_bad_ones(inputs, table, tmp_path, caplog):
    out = tmp_path / "shards"
    with caplog.at_level(logging.WARNING, logger="clipforge.data.prep"):
        summary = prep.write_from_table(
            inputs["root"] / table,
            out,
            "filepath",
            "title",
            samples_per_shard=SAMPLES_PER_SHARD,
            num_workers=2,
            progress=False,
        )
    num_shards = -(-inputs["num_rows"] // SAMPLES_PER_SHARD)
    assert summary["samples"] == NUM_GOOD and summary["rows"] == inputs["num_rows"]
    assert summary["skipped"] == {"missing_file": 1, "corrupt_image": 1, "empty_caption": 1}
    assert summary["shards"] == num_shards and summary["urls"] == str(out / "{00000..00005}.tar")
    assert_round_trip(out, inputs["good"])
    sizes = json.loads((out / "sizes.json").read_text())
    assert sizes == {name: len(read_shards_of(out / name)) for name in sizes}
    assert len(sizes) == num_shards and sum(sizes.values()) == NUM_GOOD
    assert sizes["00000.tar"] == 4 and sizes["00001.tar"] == 4  # rows 3 and 8 are skipped
    for shard in range(num_shards):
        stats = json.loads((out / f"{shard:05d}_stats.json").read_text())
        assert stats["successes"] == sizes[f"{shard:05d}.tar"]
    totals = json.loads((out / "_stats.json").read_text())
    assert totals["count"] == inputs["num_rows"] and totals["successes"] == NUM_GOOD
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for row, kind in BAD_ROWS.items():
        logged = [m for m in messages if m.startswith(f"skipping {kind.replace('_', ' ')}")]
        assert len(logged) == 1 and f"{table} row {row}" in logged[0], messages
    assert any("not-there.jpg" in m for m in messages)


@pytest.mark.parametrize("table", ["table.csv", "table.parquet"])
def test_a_missing_column_is_an_error_naming_it_and_the_file_before_any_work(inputs, table, tmp_path):
    with pytest.raises(ValueError, match=rf"{table}: no caption column 'caption' \(columns: filepath, title, other\)"):
        prep.write_from_table(inputs["root"] / table, tmp_path / "out", "filepath", "caption", progress=False)
    with pytest.raises(ValueError, match=r"no image column 'image'"):
        prep.write_from_table(inputs["root"] / table, tmp_path / "out", "image", "title", progress=False)
    assert not (tmp_path / "out").exists()


def test_resize_sets_the_shorter_side_keeps_the_aspect_and_applies_exif_orientation(tmp_path):
    Image.new("RGB", (120, 60), "red").save(tmp_path / "wide.png")
    Image.new("RGB", (50, 100), "blue").save(tmp_path / "tall.jpg", quality=90)
    Image.new("RGBA", (10, 20), (0, 255, 0, 0)).save(tmp_path / "small.png")  # transparent, upscaled to 32 × 64
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display, so the upright image is 40 × 80
    Image.new("RGB", (80, 40), "white").save(tmp_path / "rotated.jpg", exif=exif)
    names = ["wide.png", "tall.jpg", "small.png", "rotated.jpg"]
    (tmp_path / "t.csv").write_text("path,text\n" + "".join(f"{n},photo {n}\n" for n in names))
    summary = prep.write_from_table(
        tmp_path / "t.csv",
        tmp_path / "out",
        "path",
        "text",
        resize_to=32,
        samples_per_shard=10,
        num_workers=1,
        progress=False,
    )
    assert summary["samples"] == 4 and summary["resize_to"] == 32
    samples = read_shards(tmp_path / "out")
    expected = {"wide.png": (64, 32), "tall.jpg": (32, 64), "small.png": (32, 64), "rotated.jpg": (32, 64)}
    for row, name in enumerate(names):
        sample = samples[f"00000{row:04d}"]
        assert set(sample) == {"jpg", "txt", "json"}
        image = Image.open(io.BytesIO(sample["jpg"]))
        assert image.format == "JPEG" and image.size == expected[name]
        meta = json.loads(sample["json"])
        assert (meta["width"], meta["height"]) == expected[name]
        assert (meta["original_width"], meta["original_height"]) == Image.open(tmp_path / name).size
    small = Image.open(io.BytesIO(samples["000000002"]["jpg"])).convert("RGB")
    assert min(small.getpixel((16, 32))) > 240  # transparency became white, not black


class SimulatedCrash(RuntimeError):
    pass


def test_an_interrupted_run_resumes_keeping_finished_shards_and_ends_identical(inputs, tmp_path, monkeypatch):
    table = inputs["root"] / "table.csv"
    reference = tmp_path / "reference"
    prep.write_from_table(
        table, reference, "filepath", "title", samples_per_shard=SAMPLES_PER_SHARD, num_workers=1, progress=False
    )
    out = tmp_path / "out"
    real_make_sample = prep.make_sample

    def crash_in_shard_2(row, key, options):
        if row.index == 12:
            raise SimulatedCrash("killed while writing shard 2")
        return real_make_sample(row, key, options)

    monkeypatch.setattr(prep, "make_sample", crash_in_shard_2)
    with pytest.raises(SimulatedCrash):
        prep.write_from_table(
            table, out, "filepath", "title", samples_per_shard=SAMPLES_PER_SHARD, num_workers=1, progress=False
        )
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar"]  # no half-written shard
    assert not (out / "00002.tar.tmp").exists()  # cleaned up
    # its stats file, written first, marks the shard as this run's but not complete
    assert json.loads((out / "00002_stats.json").read_text())["status"] == "writing"
    assert not (out / "sizes.json").exists()
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("0000[01]*")}
    monkeypatch.setattr(prep, "make_sample", real_make_sample)

    summary = prep.write_from_table(
        table, out, "filepath", "title", samples_per_shard=SAMPLES_PER_SHARD, num_workers=1, progress=False
    )
    assert summary["resumed_shards"] == 2 and summary["samples"] == NUM_GOOD
    assert summary["skipped"] == {"missing_file": 1, "corrupt_image": 1, "empty_caption": 1}
    assert {name: (out / name).stat().st_mtime_ns for name in finished} == finished
    for shard in sorted(reference.glob("*.tar")):
        assert (out / shard.name).read_bytes() == shard.read_bytes(), shard.name
    assert (out / "sizes.json").read_text() == (reference / "sizes.json").read_text()
    assert_round_trip(out, inputs["good"])


def test_parallel_rerun_rewrites_only_incomplete_shards_and_refuses_other_settings(inputs, tmp_path):
    table = inputs["root"] / "table.parquet"
    out = tmp_path / "out"
    prep.write_from_table(
        table, out, "filepath", "title", samples_per_shard=SAMPLES_PER_SHARD, num_workers=2, progress=False
    )
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("*.tar")}
    (out / "00001.tar").unlink()  # a lost shard
    placeholder = json.loads((out / "00004_stats.json").read_text())
    placeholder = {"shard": "00004.tar", "settings": placeholder["settings"], "status": "writing"}
    (out / "00004_stats.json").write_text(json.dumps(placeholder))  # killed between the tar's rename and its stats
    summary = prep.write_from_table(
        table, out, "filepath", "title", samples_per_shard=SAMPLES_PER_SHARD, num_workers=2, progress=False
    )
    assert summary["resumed_shards"] == 4 and summary["samples"] == NUM_GOOD
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("*.tar")}
    assert set(after) == set(before)
    for name, (mtime, data) in after.items():
        assert data == before[name][1]
        assert (mtime == before[name][0]) == (name not in ("00001.tar", "00004.tar")), name
    with pytest.raises(
        ValueError,
        match=r"out holds shards written with other settings: jpeg_quality None \(this run: "
        r"95\), resize_to None \(this run: 16\); .*--overwrite",
    ):
        prep.write_from_table(
            table, out, "filepath", "title", samples_per_shard=SAMPLES_PER_SHARD, resize_to=16, progress=False
        )
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == {n: m for n, (m, _) in after.items()}
    (out / "notes.txt").write_text("mine")  # not prep's: refused with --overwrite too, and left alone
    with pytest.raises(ValueError, match=r"out holds 1 entry prep did not write \(notes.txt\): .*move them away"):
        prep.write_from_table(table, out, "filepath", "title", resize_to=16, overwrite=True, progress=False)
    assert (out / "notes.txt").read_text() == "mine"
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == {n: m for n, (m, _) in after.items()}
    (out / "notes.txt").unlink()
    summary = prep.write_from_table(table, out, "filepath", "title", resize_to=16, overwrite=True, progress=False)
    assert summary["samples_per_shard"] == 1 and summary["shards"] == inputs["num_rows"]  # auto: 27 rows, one a shard
    assert sorted(p.name for p in out.glob("*.tar")) == [f"{i:05d}.tar" for i in range(summary["shards"])]


def hf_rows(inputs) -> tuple[list, list[str], dict[int, tuple[Path, str]]]:
    """Image column values (paths; a row without an image; a corrupt one) and captions (one empty)."""
    images, captions, good = [], [], {}
    for row, (path, caption) in enumerate(list(inputs["good"].values())[:11]):
        images.append({"path": str(path), "bytes": None})
        captions.append(caption)
        good[row] = (path, caption)
    images += [None, {"path": None, "bytes": b"GIF89a garbage"}, {"path": str(inputs["good"][0][0]), "bytes": None}]
    captions += ["no image here", "a corrupt one", "   "]
    return images, captions, good


@pytest.mark.parametrize("how", ["save_to_disk", "in_memory"])
def test_hf_dataset_to_shards(inputs, tmp_path, how):
    import datasets

    images, captions, good = hf_rows(inputs)
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    dataset = datasets.Dataset.from_dict({"image": images, "text": captions}, features=features)
    if how == "save_to_disk":
        dataset.save_to_disk(str(tmp_path / "saved"))
        source = str(tmp_path / "saved")
    else:
        source = dataset
    summary = prep.write_from_hf(
        source, tmp_path / "out", samples_per_shard=SAMPLES_PER_SHARD, num_workers=2, progress=False
    )
    assert summary["samples"] == 11 and summary["rows"] == 14 and summary["shards"] == 3
    assert summary["skipped"] == {"missing_image": 1, "corrupt_image": 1, "empty_caption": 1}
    assert_round_trip(tmp_path / "out", good)
    with pytest.raises(ValueError, match=r"no caption column 'caption' \(columns: image, text\)"):
        prep.write_from_hf(source, tmp_path / "other", caption_column="caption", progress=False)


def test_hf_imagefolder_with_metadata_to_shards(inputs, tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    good = {}
    with open(folder / "metadata.jsonl", "w") as metadata:
        for row, (path, caption) in enumerate(list(inputs["good"].values())[:7]):
            shutil.copy(path, folder / path.name)
            metadata.write(json.dumps({"file_name": path.name, "text": caption}) + "\n")
            good[row] = (folder / path.name, caption)
        (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff truncated")
        metadata.write(json.dumps({"file_name": "broken.jpg", "text": "a broken file"}) + "\n")
    summary = prep.write_from_hf(
        folder,
        tmp_path / "out",
        imagefolder=True,
        cache_dir=str(tmp_path / "hf-cache"),
        samples_per_shard=SAMPLES_PER_SHARD,
        num_workers=1,
        progress=False,
    )
    assert summary["samples"] == 7 and summary["skipped"] == {"corrupt_image": 1}
    assert_round_trip(tmp_path / "out", good, rows_known=False)


def write_bad_shard(path: Path) -> None:
    good_jpeg = io.BytesIO()
    Image.new("RGB", (40, 30), "green").save(good_jpeg, format="JPEG")
    jpeg = good_jpeg.getvalue()
    write_tar(
        path,
        iter(
            [
                {"__key__": "000000000", "jpg": b"\xff\xd8\xff not a jpeg", "txt": "a corrupt image"},
                {"__key__": "000000001", "jpg": jpeg},
                {"__key__": "000000002", "jpg": jpeg, "txt": " "},
                {"__key__": "000000003", "jpg": jpeg, "txt": b"\xff\xfe caption in latin-1: caf\xe9"},
                {"__key__": "000000004", "txt": "a caption without an image"},
                {"__key__": "000000005", "jpg": jpeg, "txt": "a good sample with bad json", "json": "{not json"},
                {"__key__": "000000006", "png": jpeg, "txt": "a good sample"},
            ]
        ),
    )


def truncated_copy(shard: Path, target: Path, sample_index: int) -> None:
    """``shard`` cut inside the data of the first member of its ``sample_index``-th sample."""
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    keys = sorted({m.name.split(".")[0] for m in members})
    first = next(m for m in members if m.name.startswith(keys[sample_index]))
    target.write_bytes(shard.read_bytes()[: first.offset_data + 10])


def test_inspect_reports_counts_problems_by_kind_and_histograms(table_shards, inputs, tmp_path):
    report = inspect_shards(table_shards, num_workers=2)
    assert report["ok"] and report["problems"] == {}
    assert report["shards"] == 6 and report["samples"] == report["valid"] == NUM_GOOD
    assert report["sizes_json"] == "matches"
    assert report["extensions"] == Counter(STORED_AS[Image.open(path).format] for path, _ in inputs["good"].values())
    assert sum(report["caption_words"].values()) == NUM_GOOD and report["caption_words"]["4-7"] == NUM_GOOD
    assert report["caption_chars"]["max"] == max(len(caption) for _, caption in inputs["good"].values())
    sizes = [Image.open(path).size for path, _ in inputs["good"].values()]
    shorter = [min(size) for size in sizes]
    assert 0 < sum(side < 32 for side in shorter) < NUM_GOOD  # both bins are used
    assert report["image_shorter_side"] == {
        "<32": sum(side < 32 for side in shorter),
        "32-63": sum(32 <= side < 64 for side in shorter),
        "64-127": 0,
        "128-255": 0,
        "256-511": 0,
        "512-1023": 0,
        "1024-2047": 0,
        ">=2048": 0,
    }
    assert report["image_aspect_ratio"]["0.5-0.75"] == sum(0.5 <= w / h < 0.75 for w, h in sizes) > 0
    assert sum(report["image_aspect_ratio"].values()) == NUM_GOOD
    assert report["image_width"] == {"min": min(w for w, _ in sizes), "max": max(w for w, _ in sizes)}
    stats = json.loads((table_shards / "_stats.json").read_text())
    assert stats["inspect"]["valid"] == NUM_GOOD and stats["successes"] == NUM_GOOD  # the writer's keys are kept

    bad = tmp_path / "bad"
    write_bad_shard(bad / "00000.tar")
    truncated_copy(table_shards / "00002.tar", bad / "00001.tar", sample_index=2)
    (bad / "00002.tar").write_bytes(b"this is not a tar file at all" * 30)
    report = inspect_shards(bad, num_workers=1)
    assert not report["ok"] and report["shards"] == 3
    # training's kinds (bad JSON beside a .txt caption is no problem: training reads the .txt)
    assert report["problems"] == {
        "corrupt_image": 1,
        "missing_caption": 1,
        "empty_caption": 1,
        "bad_caption": 1,
        "missing_image": 1,
        "truncated_tar": 1,
        "unreadable_shard": 1,
    }
    assert report["samples"] == 7 + 2 and report["valid"] == 2 + 2
    assert "00000.tar:000000000: not an image format" in report["examples"]["corrupt_image"]
    assert "00001.tar: after 2 samples" in report["examples"]["truncated_tar"]
    assert report["per_shard"]["00001.tar"] == {"samples": 2, "valid": 2, "problems": {"truncated_tar": 1}}
    assert report["sizes_json"] == "absent" and not (bad / "sizes.json").exists()  # not from a broken shard
    assert json.loads((bad / "_stats.json").read_text())["inspect"]["problems"] == report["problems"]


def test_inspect_checks_sizes_json_and_writes_it_when_absent(table_shards, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(table_shards, copy)
    sizes = json.loads((copy / "sizes.json").read_text())
    (copy / "sizes.json").write_text(json.dumps({**sizes, "00003.tar": 7}))
    report = inspect_shards(f"{copy}/{{00000..00005}}.tar", write_stats=False, num_workers=1)
    assert report["problems"] == {"sizes_json_mismatch": 1} and not report["ok"]
    assert "sizes.json says 7 samples in 00003.tar, it holds 5" in report["examples"]["sizes_json_mismatch"]
    (copy / "sizes.json").unlink()
    report = inspect_shards(copy, num_workers=1)
    assert report["ok"] and report["sizes_json"] == "written"
    assert json.loads((copy / "sizes.json").read_text()) == sizes
    with pytest.raises(FileNotFoundError, match="bad: no such shard or directory"):
        inspect_shards(tmp_path / "bad")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .tar shards"):
        inspect_shards(tmp_path / "empty")


def test_cli_prep_table_hf_and_inspect(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(
        [
            "prep",
            "table",
            str(inputs["root"] / "table.csv"),
            "--out",
            str(out),
            "--image-column",
            "filepath",
            "--caption-column",
            "title",
            "--samples-per-shard",
            "10",
            "--resize",
            "16",
            "--workers",
            "1",
            "--quiet",
        ]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["samples"] == NUM_GOOD and summary["shards"] == 3 and summary["resize_to"] == 16
    assert main(["prep", "inspect", str(out), "--quiet"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert "warning" not in captured.err  # 3 shards feed 1 rank × 2 workers
    assert main(["prep", "inspect", str(out), "--quiet", "--no-write", "--world-size", "2"]) == 0
    assert re.search(
        r"warning: 3 shards cannot feed world size 2 × data.num_workers 2 = 4 readers", capsys.readouterr().err
    )
    assert report["valid"] == NUM_GOOD and report["image_shorter_side"]["<32"] == NUM_GOOD
    assert report["image_width"]["min"] == report["image_height"]["min"] == 16 and report["extensions"] == {
        "jpg": NUM_GOOD
    }
    (out / "00001.tar").write_bytes((out / "00001.tar").read_bytes()[:700])
    assert main(["prep", "inspect", str(out), "--quiet", "--no-write"]) == 1
    assert (
        main(
            [
                "prep",
                "table",
                str(inputs["root"] / "table.csv"),
                "--out",
                str(tmp_path / "x"),
                "--image-column",
                "path",
                "--caption-column",
                "title",
            ]
        )
        == 2
    )
    assert "table.csv: no image column 'path'" in capsys.readouterr().err
    assert main(["prep", "hf", str(inputs["root"]), "--out", str(tmp_path / "y")]) == 2
    assert "not a dataset saved with save_to_disk" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["table", "hf", "inspect"])
def test_every_prep_subcommand_explains_every_option(kind, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["prep", kind, "--help"])
    assert exit_info.value.code == 0 and capsys.readouterr().out
    prep_parser = build_parser()._subparsers._group_actions[0].choices["prep"]
    sub = prep_parser._subparsers._group_actions[0].choices[kind]
    for action in sub._actions:
        assert action.help, f"prep {kind} option {action.option_strings or action.dest} has no help"


def tolerant_open_clip_tar_reader(monkeypatch) -> None:
    """Let ``open_clip_train``'s loader run under webdataset 1.0.2.

    webdataset ≥ 0.2.96 yields an empty ``{}`` at each shard's end and OpenCLIP's ``group_by_keys_nothrow``
    dies on it with ``KeyError: 'fname'`` (open_clip#935) whatever the shards hold; drop those entries.
    """
    from open_clip_train import data

    def tarfile_to_samples_nothrow(src, handler=data.log_and_continue):
        files = data.tar_file_expander(data.url_opener(src, handler=handler), handler=handler)
        return data.group_by_keys_nothrow((f for f in files if "fname" in f), handler=handler)

    monkeypatch.setattr(data, "tarfile_to_samples_nothrow", tarfile_to_samples_nothrow)


def read_with_open_clip(urls: str, monkeypatch, batch_size: int = 4, image_size: int = 32) -> tuple[list, object]:
    """All batches ``open_clip_train.data.get_wds_dataset`` yields for one epoch of ``urls`` (sized by sizes.json)."""
    import open_clip
    from open_clip_train.data import get_wds_dataset

    tolerant_open_clip_tar_reader(monkeypatch)
    args = argparse.Namespace(
        train_data=urls,
        val_data=None,
        train_num_samples=None,
        dataset_resampled=False,
        train_data_upsampling_factors=None,
        seed=0,
        batch_size=batch_size,
        workers=0,
        world_size=1,
    )
    transform = open_clip.image_transform(image_size, is_train=True)
    info = get_wds_dataset(args, transform, is_train=True, tokenizer=open_clip.get_tokenizer("RN50"))
    return list(info.dataloader), info.dataloader


def test_open_clip_train_loader_reads_prep_output(table_shards, inputs, monkeypatch):
    import open_clip

    batches, loader = read_with_open_clip(str(table_shards / "{00000..00005}.tar"), monkeypatch)
    assert loader.num_samples == NUM_GOOD and loader.num_batches == NUM_GOOD // 4  # from our sizes.json
    assert len(batches) == NUM_GOOD // 4
    for images, texts in batches:
        assert images.shape == (4, 3, 32, 32) and texts.shape == (4, 77)
    seen = sorted(tuple(row.tolist()) for _, texts in batches for row in texts)
    tokenizer = open_clip.get_tokenizer("RN50")
    expected = sorted(tuple(tokenizer(caption)[0].tolist()) for _, caption in inputs["good"].values())
    assert seen == expected  # every good sample exactly once in one epoch


def test_a_hugging_face_column_of_urls_is_refused_with_a_pointer_to_img2dataset(tmp_path):
    import datasets

    dataset = datasets.Dataset.from_dict({"image_url": ["https://example.com/a.jpg"], "text": ["a cat"]})
    with pytest.raises(ValueError, match=r"image column 'image_url' holds URLs .*Dataset.to_parquet.*img2dataset"):
        prep.write_from_hf(dataset, tmp_path / "out", image_column="image_url", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_table_whose_paths_all_miss_fails_naming_the_folder_and_leaves_no_shards(inputs, tmp_path, capsys):
    """Paths relative to another folder than the table's: nothing usable, so no shards and exit 2."""
    import pandas as pd

    table = tmp_path / "elsewhere" / "pairs.csv"
    table.parent.mkdir()
    frame = pd.read_csv(inputs["root"] / "table.csv")
    frame["filepath"] = [str(Path(path)).removeprefix(f"{inputs['root']}/") for path in frame["filepath"]]
    frame.to_csv(table, index=False)
    out = tmp_path / "out"
    arguments = ["prep", "table", str(table), "--out", str(out), "--image-column", "filepath"]
    arguments += ["--caption-column", "title", "--samples-per-shard", "2", "--workers", "1", "--quiet"]
    assert main(arguments) == 2
    captured = capsys.readouterr()
    line = captured.err.strip().splitlines()[-1]
    assert line.startswith("clipforge prep: error: ") and "Traceback" not in captured.err and not captured.out
    assert f"{table}: none of its {inputs['num_rows']} rows gave a sample ({inputs['num_rows']} missing_file)" in line
    assert f"e.g. row 0 (images/000.jpeg): {table.parent / 'images' / '000.jpeg'}: No such file or directory" in line
    assert f"relative image paths were resolved against {table.parent} (the folder of the table)" in line
    assert "--image-root" in line
    assert not out.exists()  # not 14 empty shards that look like a finished dataset
    out.mkdir()
    assert main(arguments) == 2 and out.is_dir() and not any(out.iterdir())  # a folder the user made stays
    assert main([*arguments, "--image-root", str(inputs["root"])]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == NUM_GOOD


def test_a_table_whose_paths_mostly_miss_warns_with_the_count_and_the_folder(tmp_path, caplog):
    Image.new("RGB", (8, 8)).save(tmp_path / "there.png")
    (tmp_path / "t.csv").write_text("path,caption\n" + "there.png,found\n" + "gone.png,lost\n" * 19)
    with caplog.at_level(logging.WARNING, logger="clipforge.data.prep"):
        summary = prep.write_from_table(tmp_path / "t.csv", tmp_path / "out", "path", "caption", progress=False)
    assert summary["samples"] == 1
    warned = [r.getMessage() for r in caplog.records if "name an image file that does not exist" in r.getMessage()]
    assert len(warned) == 1 and "19 of 20 rows" in warned[0]
    assert f"resolved against {tmp_path} (the folder of the table)" in warned[0]


def test_inspect_calls_shards_without_samples_empty_not_ok(tmp_path, capsys):
    for shard in range(3):
        write_tar(tmp_path / "empty" / f"{shard:05d}.tar", iter([]))
    report = inspect_shards(tmp_path / "empty", num_workers=1)
    assert not report["ok"] and report["problems"] == {"empty": 1} and report["samples"] == 0
    assert report["examples"]["empty"] == "3 shards hold no samples"
    assert main(["prep", "inspect", str(tmp_path / "empty"), "--quiet", "--no-write", "--workers", "1"]) == 1
    assert json.loads(capsys.readouterr().out)["ok"] is False
