"""clipforge.data.prep_output: every prep writer's --out holds its own earlier output and nothing else, and an --out
that cannot be written is one line before any work (prep table, hf, synthetic, reshard, through the CLI)."""

from __future__ import annotations

import io
import json
import os
import types
from pathlib import Path

import pytest
from PIL import Image

from clipforge.cli import main
from clipforge.curation import reshard
from clipforge.data import prep, shards
from clipforge.data.prep_output import survey
from clipforge.data.shards import write_tar

WRITERS = ("table", "hf", "synthetic", "reshard")


def jpeg(index: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (20, 16), (40 * index % 256, 90, 200)).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """A 4-row table of local images, the same rows as a saved Hugging Face dataset, and shards with a kept list."""
    import datasets

    root = tmp_path_factory.mktemp("writer_inputs")
    (root / "images").mkdir()
    for index in range(4):
        (root / "images" / f"{index}.jpg").write_bytes(jpeg(index))
    (root / "t.csv").write_text("path,caption\n" + "".join(f"images/{i}.jpg,picture {i}\n" for i in range(4)))
    paths = [str(root / "images" / f"{i}.jpg") for i in range(4)]
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    data = {"image": [{"path": path, "bytes": None} for path in paths], "text": [f"picture {i}" for i in range(4)]}
    datasets.Dataset.from_dict(data, features=features).save_to_disk(str(root / "saved"))
    samples = [{"__key__": f"00000{i:04d}", "jpg": jpeg(i), "txt": f"picture {i}"} for i in range(4)]
    write_tar(root / "source" / "00000.tar", iter(samples))
    (root / "kept.tsv").write_text("shard\tkey\n" + "".join(f"00000\t00000{i:04d}\n" for i in range(3)))
    return {"root": root}


def command(writer: str, inputs: dict[str, Path], out: Path) -> list[str]:
    root = inputs["root"]
    return (
        {
            "table": ["prep", "table", str(root / "t.csv"), "--image-column", "path", "--caption-column", "caption"],
            "hf": ["prep", "hf", str(root / "saved")],
            "synthetic": ["prep", "synthetic", "--num-samples", "20", "--samples-per-shard", "10", "--image-size", "16"]
            + ["--num-eval-samples", "2", "--num-retrieval-samples", "2"],
            "reshard": ["prep", "reshard", str(root / "source"), "--kept", str(root / "kept.tsv")],
        }[writer]
        + ["--out", str(out)]
        + ([] if writer == "reshard" else ["--workers", "1", "--quiet"])
    )


def shard_folder(writer: str, out: Path) -> Path:
    return out / "train" if writer == "synthetic" else out


def contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("clipforge prep: error: ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("writer", WRITERS)
def test_an_out_holding_files_prep_did_not_write_is_refused_with_or_without_overwrite(writer, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    folder = shard_folder(writer, out)
    # what `prep reshard` left before its shards were marked: shards and sizes.json, no stats
    write_tar(folder / "00000.tar", iter([{"__key__": "000000000", "jpg": jpeg(9), "txt": "someone else's"}]))
    write_tar(folder / "00005.tar", iter([{"__key__": "000050000", "jpg": jpeg(8), "txt": "someone else's"}]))
    (folder / "sizes.json").write_text('{"00000.tar": 1, "00005.tar": 1}\n')
    before = contents(out)
    for overwrite in ([], ["--overwrite"]):
        assert main(command(writer, inputs, out) + overwrite) == 2
        line = error_line(capsys)
        assert f"{folder} holds 3 entries prep did not write (00000.tar, 00005.tar, sizes.json)" in line, line
        assert "move them away" in line
        assert contents(out) == before  # nothing replaced, nothing added, nothing deleted


def test_the_refusal_lists_a_few_and_counts_the_rest_and_hidden_files_are_ignored(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".DS_Store").write_bytes(b"\0")
    (out / "images").mkdir()  # --out given the images' folder
    for name in ("a.jpg", "b.jpg", "notes.txt", "00003_stats.json"):  # img2dataset's stats carry no settings
        (out / name).write_text("{}")
    assert main(command("table", inputs, out)) == 2
    assert f"{out} holds 5 entries prep did not write (00003_stats.json, a.jpg, b.jpg and 2 more)" in error_line(capsys)
    (out / ".DS_Store").unlink()
    for path in [*out.glob("*.*")]:
        path.unlink()
    (out / "images").rmdir()
    (out / ".DS_Store").write_bytes(b"\0")
    assert main(command("table", inputs, out)) == 0
    assert (out / ".DS_Store").read_bytes() == b"\0"


@pytest.mark.parametrize("writer", WRITERS)
def test_an_earlier_runs_output_is_taken_up_again_and_overwrite_removes_only_it(
    writer, inputs, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(shards, "write_eval_sets", lambda spec: {})  # written anew each time: not the subject here
    out = tmp_path / "out"
    assert main(command(writer, inputs, out)) == 0
    folder = shard_folder(writer, out)
    stats, own, foreign = survey(folder)
    assert stats and not foreign and folder / "00000.tar" in own and folder / "sizes.json" in own
    assert all(found["status"] == "success" for found in stats.values())
    first = contents(out)
    assert main(command(writer, inputs, out)) == 0  # the same settings: resumed (or, reshard, written again)
    assert contents(out).keys() == first.keys()
    assert {name: data for name, data in contents(out).items() if name.endswith(".tar")} == {
        name: data for name, data in first.items() if name.endswith(".tar")
    }
    assert main(command(writer, inputs, out) + ["--overwrite"]) == 0
    assert contents(out).keys() == first.keys()
    capsys.readouterr()


def test_shards_of_an_equivalent_earlier_run_beyond_this_runs_count_are_removed(tmp_path):
    """A table that shrank: its earlier shards 2.. would otherwise stay beside the new ones, mixed."""
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    table = tmp_path / "t.csv"
    table.write_text("path,caption\n" + "a.png,an image\n" * 6)
    prep.write_from_table(
        table, tmp_path / "out", "path", "caption", samples_per_shard=2, num_workers=1, progress=False
    )
    assert len(list((tmp_path / "out").glob("*.tar"))) == 3
    table.write_text("path,caption\n" + "a.png,an image\n" * 3)
    summary = prep.write_from_table(
        table, tmp_path / "out", "path", "caption", samples_per_shard=2, num_workers=1, progress=False
    )
    assert summary["shards"] == 2 and summary["resumed_shards"] == 1  # shard 1 held 2 rows, now 1: written again
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "00000.tar",
        "00000_stats.json",
        "00001.tar",
        "00001_stats.json",
        "_stats.json",
        "sizes.json",
    ]


def fake_read_only(monkeypatch, target: Path) -> None:
    real = os.statvfs
    monkeypatch.setattr(
        os, "statvfs", lambda path: types.SimpleNamespace(f_flag=os.ST_RDONLY) if Path(path) == target else real(path)
    )


def fake_no_permission(monkeypatch, target: Path) -> None:
    real = os.access
    monkeypatch.setattr(
        os, "access", lambda path, mode, **kw: False if Path(path) == target else real(path, mode, **kw)
    )


def forbid_reading_the_input(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the input was read before --out was checked")

    for module, name in ((prep, "read_table"), (prep, "open_hf_dataset"), (reshard, "read_kept")):
        monkeypatch.setattr(module, name, refuse)
    monkeypatch.setattr(shards, "write_eval_sets", refuse)
    monkeypatch.setattr(shards, "ProcessPoolExecutor", refuse)


@pytest.mark.parametrize("writer", WRITERS)
@pytest.mark.parametrize("case", ["a file", "under a file", "read-only", "no permission"])
def test_an_out_that_cannot_be_written_is_one_line_before_any_work(writer, case, inputs, tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "locked").mkdir()
    out, expected = {
        "a file": (tmp_path / "file", "it is a file, not a folder"),
        "under a file": (tmp_path / "file" / "out", f"{tmp_path / 'file'} is a file, not a folder"),
        "read-only": (tmp_path / "locked" / "out", f"{tmp_path / 'locked'} is on a read-only filesystem"),
        "no permission": (tmp_path / "locked" / "out", f"no permission to write in {tmp_path / 'locked'}"),
    }[case]
    if case == "read-only":
        fake_read_only(monkeypatch, tmp_path / "locked")
    elif case == "no permission":
        fake_no_permission(monkeypatch, tmp_path / "locked")
    forbid_reading_the_input(monkeypatch)
    assert main(command(writer, inputs, out)) == 2
    assert f"error: --out {out}: {expected}" in error_line(capsys)
    assert (tmp_path / "file").read_text() == "not a folder" and not any((tmp_path / "locked").iterdir())


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a folder without write permission")
def test_a_folder_without_write_permission_is_refused(inputs, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    assert main(command("table", inputs, locked / "out")) == 2
    assert f"no permission to write in {locked}" in error_line(capsys)


def test_a_shard_whose_final_stats_a_kill_prevented_is_written_again(tmp_path):
    """The stats written before the tar mark it as prep's: a kill between the tar's rename and the final stats leaves
    a shard that is resumed, not refused as someone else's."""
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    table = tmp_path / "t.csv"
    table.write_text("path,caption\n" + "a.png,an image\n" * 4)
    out = tmp_path / "out"
    prep.write_from_table(table, out, "path", "caption", samples_per_shard=2, num_workers=1, progress=False)
    stats = json.loads((out / "00001_stats.json").read_text())
    (out / "00001_stats.json").write_text(
        json.dumps({"shard": "00001.tar", "settings": stats["settings"]} | {"status": "writing"})
    )
    (out / "00000.tar.tmp").write_bytes(b"half a shard")  # and a write cut short
    summary = prep.write_from_table(table, out, "path", "caption", samples_per_shard=2, num_workers=1, progress=False)
    assert summary["resumed_shards"] == 1 and summary["samples"] == 4
    assert json.loads((out / "00001_stats.json").read_text())["status"] == "success"
    assert not (out / "00000.tar.tmp").exists()
