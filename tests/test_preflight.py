"""The run's pre-flight (``clipforge.train.preflight``): what ``train --dry-run`` and ``submit`` check, for a given
world size, and the same refusals from the real run before any work: an output directory it cannot write, data with
no sample, more readers than shards."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from clipforge.cli import main
from clipforge.data.pipeline import plan_data
from clipforge.data.shards import write_tar
from clipforge.data.sources import SourceConfig
from clipforge.train import preflight
from clipforge.train.config import load_config
from clipforge.train.preflight import check_output_dir, check_run, dry_run

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def shards_of(synth_data: Path) -> str:
    return f"{synth_data}/train/{{00000..00005}}.tar"  # 6 shards, 500 samples each


def config(run_dir: Path, urls: str, *overrides: str):
    return load_config(
        CONFIGS / "demo.yaml",
        [f"train.output_dir={run_dir}", f"data.sources=[{{urls: '{urls}'}}]", "eval.suite=null", *overrides],
    )


def empty_shards(directory: Path, count: int = 3, samples: int = 0) -> str:
    """``count`` shards as ``prep`` leaves them when nothing was usable: empty tars, sizes.json of zeros."""
    for shard in range(count):
        write_tar(directory / f"{shard:05d}.tar", iter([]))
    (directory / "sizes.json").write_text(json.dumps({f"{shard:05d}.tar": samples for shard in range(count)}))
    return f"{directory}/{{00000..{count - 1:05d}}}.tar"


def listing(root: Path) -> list[str]:
    return sorted(str(path.relative_to(root)) for path in root.rglob("*"))


# ------------------------------------------------------------------------------------------------ output directory


def test_an_output_dir_that_is_a_file_is_named(tmp_path):
    (tmp_path / "run").write_text("")
    with pytest.raises(ValueError, match=r"^train.output_dir: \S+/run is a file, not a directory$"):
        check_output_dir(tmp_path / "run")


def test_a_checkpoints_entry_that_is_a_file_is_named(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("")
    with pytest.raises(
        ValueError, match=r"run/checkpoints is a file, not a directory \(the run writes its checkpoints"
    ):
        check_output_dir(tmp_path / "run")


def test_an_output_dir_under_a_file_or_a_dangling_link_is_named(tmp_path):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ValueError, match=r"a-file/runs/x cannot be created: \S+/a-file is a file, not a directory"):
        check_output_dir(tmp_path / "a-file" / "runs" / "x")
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"link is a broken symbolic link"):
        check_output_dir(tmp_path / "link")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory")
def test_a_read_only_output_dir_is_named(tmp_path):
    for read_only, run_dir in ((tmp_path / "a", tmp_path / "a"), (tmp_path / "b", tmp_path / "b" / "run")):
        read_only.mkdir()
        read_only.chmod(0o555)
        try:
            with pytest.raises(ValueError, match=r"is not writable \(Permission denied\)"):
                check_output_dir(run_dir)
        finally:
            read_only.chmod(0o755)


def test_an_unwritable_directory_is_named_with_the_systems_reason(tmp_path, monkeypatch):
    """What a read-only filesystem or a directory without write permission says (simulated: root may write anyway)."""

    def refuse(prefix, dir):  # noqa: A002 — tempfile's own keyword
        raise OSError(30, "Read-only file system", str(Path(dir) / prefix))

    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    monkeypatch.setattr(preflight.tempfile, "mkstemp", refuse)
    with pytest.raises(ValueError, match=r"^train.output_dir: \S+/run is not writable \(Read-only file system\)$"):
        check_output_dir(tmp_path / "run")
    with pytest.raises(ValueError, match=r"new/run cannot be created: \S+ is not writable \(Read-only file system\)"):
        check_output_dir(tmp_path / "new" / "run")


def test_checking_leaves_nothing_behind(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "config.yaml").write_text("x: 1\n")
    before = listing(tmp_path)
    check_output_dir(tmp_path / "run")
    check_output_dir(tmp_path / "fresh" / "run")  # a run directory still to be made is not made
    assert listing(tmp_path) == before


@pytest.mark.parametrize("dry_run_flag", [["--dry-run"], []], ids=["dry-run", "run"])
def test_train_stops_on_an_unusable_output_dir_in_one_line_before_any_work(dry_run_flag, tmp_path, capsys, synth_data):
    """The dry run reports what the run does; the run stops before its process group, lock or config.yaml."""
    for make, path in (
        (lambda: (tmp_path / "file-run").write_text(""), tmp_path / "file-run"),
        (lambda: (tmp_path / "run" / "checkpoints").write_text(""), tmp_path / "run"),
    ):
        (tmp_path / "run").mkdir(exist_ok=True)
        make()
        before = listing(tmp_path)
        urls = shards_of(synth_data)
        code = main(
            [
                "train",
                str(CONFIGS / "demo.yaml"),
                "--set",
                f"train.output_dir={path}",
                "--set",
                f"data.sources=[{{urls: '{urls}'}}]",
                "--set",
                "eval.suite=null",
                *dry_run_flag,
            ]
        )
        err = capsys.readouterr().err
        assert code == 2, err
        assert re.search(r"clipforge train: error: train.output_dir: \S+ is a file, not a directory", err), err
        assert len(err.strip().splitlines()) == 1, err
        assert listing(tmp_path) == before  # no config.yaml, no lock, no probe left


# ------------------------------------------------------------------------------------------------------- empty data


def test_empty_shards_are_refused_by_the_dry_run_naming_them(tmp_path, capsys):
    urls = empty_shards(tmp_path / "data", count=49)
    code = main(
        [
            "train",
            str(CONFIGS / "demo.yaml"),
            "--dry-run",
            "--set",
            f"train.output_dir={tmp_path / 'run'}",
            "--set",
            f"data.sources=[{{urls: '{urls}'}}]",
            "--set",
            "eval.suite=null",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 2, out
    assert (
        f"data.sources[0]: its 49 shards ({urls}) hold 0 samples by the sizes.json or *_stats.json beside them: "
        "nothing to train on" in err
    ), err
    assert "steps_per_epoch" not in out


def test_fewer_samples_than_one_global_batch_are_refused(tmp_path):
    urls = empty_shards(tmp_path / "data", count=2, samples=50)  # 100 samples, counted; batch 64 × 2 ranks
    with pytest.raises(
        ValueError, match=r"100 samples in all .* make no full global batch of 128 \(data.batch_size 64"
    ):
        check_run(config(tmp_path / "run", urls, "data.batch_size=64", "data.num_workers=1"), world_size=2)
    assert check_run(config(tmp_path / "run", urls, "data.batch_size=64", "data.num_workers=1"), 1)["steps_per_epoch"]


def test_a_source_configured_with_no_samples_is_refused(synth_data):
    cfg = config(Path("unused"), shards_of(synth_data)).data
    cfg.sources = [SourceConfig(urls=shards_of(synth_data), num_samples=0)]
    with pytest.raises(ValueError, match=r"data.sources\[0\]: data.sources\[0\].num_samples is 0: nothing to train on"):
        plan_data(cfg, 1)


def test_the_run_refuses_empty_data_before_it_builds_the_model(tmp_path, capsys, monkeypatch):
    """The real run stops at the same check, in build_run, before the model (which would take seconds) is built."""

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the data was checked")

    monkeypatch.setattr("clipforge.train.build.build_model", no_model)
    urls = empty_shards(tmp_path / "data")
    code = main(
        [
            "train",
            str(CONFIGS / "demo.yaml"),
            "--set",
            f"train.output_dir={tmp_path / 'run'}",
            "--set",
            f"data.sources=[{{urls: '{urls}'}}]",
            "--set",
            "eval.suite=null",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "data.sources[0]: its 3 shards" in err and "hold 0 samples" in err, err


# ------------------------------------------------------------------------------------------------------- world size


def test_the_checks_are_made_for_the_world_size_given(tmp_path, synth_data, monkeypatch):
    cfg = config(tmp_path / "run", shards_of(synth_data), "data.num_workers=2", "data.batch_size=100")
    found = check_run(cfg, world_size=3)  # 3 × 2 = 6 readers for 6 shards
    assert found == {
        "world_size": 3,
        "shards": 6,
        "samples": 3000,
        "data_mode": "epoch",
        "steps_per_epoch": 10,
        "resume_from": "none (fresh start)",
    }
    with pytest.raises(ValueError, match="6 shards cannot feed world_size × num_workers = 8 readers"):
        check_run(cfg, world_size=4)
    monkeypatch.setenv("WORLD_SIZE", "4")  # the default: this launch's world size, as `train` reads it
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="= 8 readers"):
        check_run(cfg)
    assert check_run(cfg, world_size=1)["steps_per_epoch"] == 30


def test_the_dry_run_counts_the_global_batch_of_its_world_size(tmp_path, synth_data):
    cfg = config(tmp_path / "run", shards_of(synth_data), "data.num_workers=1", "data.batch_size=100")
    one, three = dry_run(cfg, world_size=1), dry_run(cfg, world_size=3)
    assert three["train_pflops_total"] == pytest.approx(3 * one["train_pflops_total"])
    assert (one["world_size"], one["steps_per_epoch"], three["steps_per_epoch"]) == (1, 30, 10)
    assert not (tmp_path / "run").exists()


def test_a_run_directory_a_live_trainer_holds_is_refused_by_the_checks(tmp_path, synth_data):
    from clipforge.train.lock import RunLock, RunLocked

    cfg = config(tmp_path / "run", shards_of(synth_data), "data.num_workers=1")
    lock = RunLock(tmp_path / "run", os.environ).acquire()  # this live process holds it, as a running trainer does
    try:
        with pytest.raises(RunLocked, match=r"run is in use by another clipforge train .*--take-over-lock"):
            check_run(cfg, world_size=1)
    finally:
        lock.release()
    assert check_run(cfg, world_size=1)["shards"] == 6  # released: the checks pass


def test_the_dry_run_builds_the_loss_terms_refusing_their_bad_options(tmp_path, synth_data, monkeypatch):
    from clipforge.losses.config import TERMS

    monkeypatch.setitem(TERMS, "mean_colour", "objective_example:build")  # tests/objective_example.py
    cfg = config(tmp_path / "run", shards_of(synth_data), "data.num_workers=1", "model.name=tiny-vit-64")
    assert dry_run(cfg, world_size=1)["loss_terms"] == "contrastive"
    terms = config(
        tmp_path / "run",
        shards_of(synth_data),
        "data.num_workers=1",
        "model.name=tiny-vit-64",
        "loss.terms=[{name: mean_colour}]",
    )
    assert dry_run(terms, world_size=1)["loss_terms"] == "contrastive, mean_colour"
    bad = config(
        tmp_path / "run",
        shards_of(synth_data),
        "data.num_workers=1",
        "model.name=tiny-vit-64",
        "loss.terms=[{name: mean_colour, options: {depth: 2}}]",
    )
    with pytest.raises(ValueError, match=r"loss.terms\[0\] \(mean_colour\): unknown options \['depth'\]"):
        dry_run(bad, world_size=1)
