"""Checkpoints that cannot be written: a full disk (injected part-way through the DCP and torch.save writes,
synchronous and in the background, and a real tmpfs where this test may mount one), a read-only folder, and a
second writer in the same folder. Each stops with one ``CheckpointWriteError`` line naming the folder (for a full
disk: the space needed and free), removes the partial copy, and leaves the previous checkpoint ``latest``; nothing
incomplete is published."""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from checkpointing import model_pieces
from test_resilience import env, write_config

from clipforge.checkpoints import verify
from clipforge.train.checkpoint import Checkpointer, CheckpointWriteError

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def space(message: str) -> tuple[int, int]:
    """The bytes needed and free that a full disk's message gives, checked against its rounded figures."""
    found = re.search(r"it needs about ([\d.]+) (\w+), ([\d.]+) (\w+) is free \(([\d,]+) vs ([\d,]+) bytes\)", message)
    assert found, message
    needed, free = (int(found.group(i).replace(",", "")) for i in (5, 6))
    units = {"bytes": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}
    assert float(found.group(1)) * units[found.group(2)] == pytest.approx(needed, rel=0.01)
    assert float(found.group(3)) * units[found.group(4)] == pytest.approx(free, rel=0.01, abs=1)
    return needed, free


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def assert_previous_is_latest(directory: Path) -> None:
    assert (directory / "latest").resolve() == directory / "step_00000001"
    assert [p.name for p in Checkpointer(directory).complete()] == ["step_00000001"]
    verify(directory / "latest")
    assert leftovers(directory) == []  # the temporary directory was removed: the disk is not left full


def write_half_then_fail(real):
    """``real`` (``torch.save``, taking (value, path-or-stream)) writes half its bytes to its destination, then the
    disk is full."""

    def failing(value, destination, *args, **kwargs):
        import io

        buffer = io.BytesIO()
        real(value, buffer, *args, **kwargs)
        data = buffer.getvalue()
        if hasattr(destination, "write"):
            destination.write(data[: len(data) // 2])
        else:
            Path(destination).write_bytes(data[: len(data) // 2])
        raise ENOSPC

    return failing


@pytest.fixture
def model():
    torch.manual_seed(0)
    return torch.nn.Linear(300, 200)


@pytest.mark.parametrize("writer", ["dcp", "torch.save"])
def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_previous_latest(
    writer, model, tmp_path, monkeypatch
):
    checkpointer = Checkpointer(tmp_path)
    checkpointer.save(1, model_pieces(model, 1), "train: {}\n")
    if writer == "dcp":
        fill_dcp_files_after(monkeypatch, 10_000)
    else:
        monkeypatch.setattr(torch, "save", write_half_then_fail(torch.save))
    with pytest.raises(CheckpointWriteError) as raised:
        checkpointer.save(2, model_pieces(model, 2), "train: {}\n")
    message = str(raised.value)
    assert "\n" not in message
    assert f"checkpoint of step 2 not written to {tmp_path}: No space left on device on the filesystem at " in message
    needed, free = space(message)
    weights = 300 * 200 * 4 + 200 * 4  # the Linear's float32 weight and bias; and a few KiB of generator states
    assert weights < needed < weights + 10_000 and free > 0, message
    assert "step_00000001 stays latest" in message
    monkeypatch.undo()
    assert_previous_is_latest(tmp_path)


class FullAfter:
    """A DCP output stream (``FileSystem.create_stream``'s context manager) whose disk fills after ``room`` bytes."""

    def __init__(self, manager, room: int) -> None:
        self.manager, self.room, self.stream = manager, room, None

    def write(self, data) -> int:
        if len(data) > self.room:
            self.stream.write(bytes(data[: self.room]))
            raise ENOSPC
        self.room -= len(data)
        return self.stream.write(data)

    def __getattr__(self, name):
        return getattr(self.stream, name)

    def __enter__(self):
        self.stream = self.manager.__enter__()
        return self

    def __exit__(self, *exc):
        return self.manager.__exit__(*exc)


def fill_dcp_files_after(monkeypatch, room: int) -> None:
    """From now on, the disk is full after ``room`` bytes of each file torch.distributed.checkpoint writes."""
    from torch.distributed.checkpoint.filesystem import FileSystem

    original = FileSystem.create_stream

    def filling(self, path, mode):
        manager = original(self, path, mode)
        return FullAfter(manager, room) if "w" in mode else manager

    monkeypatch.setattr(FileSystem, "create_stream", filling)


def test_a_full_disk_during_an_async_checkpoint_is_one_line(model, tmp_path, monkeypatch, caplog):
    checkpointer = Checkpointer(tmp_path, asynchronous=True)
    checkpointer.save(1, model_pieces(model, 1), "train: {}\n")
    checkpointer.wait()
    fill_dcp_files_after(monkeypatch, 10_000)
    checkpointer.save(2, model_pieces(model, 2), "train: {}\n")  # returns: the write fails in the background
    with pytest.raises(CheckpointWriteError, match=r"^checkpoint of step 2 not written to .*No space left on device"):
        checkpointer.wait()
    ours = [record.getMessage() for record in caplog.records if record.name.startswith("clipforge")]
    assert len(ours) == 1 and ours[0].startswith("background checkpoint of step 2 failed: checkpoint of step 2 not")
    assert "\n" not in ours[0] and "Traceback" not in ours[0]
    monkeypatch.undo()
    assert_previous_is_latest(tmp_path)


def test_a_read_only_folder_is_one_line_naming_the_path(model, tmp_path, monkeypatch):
    checkpointer = Checkpointer(tmp_path)
    checkpointer.save(1, model_pieces(model, 1), "train: {}\n")

    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(CheckpointWriteError) as raised:
        checkpointer.save(2, model_pieces(model, 2), "train: {}\n")
    monkeypatch.undo()
    assert str(raised.value).startswith(
        f"checkpoint of step 2 not written to {tmp_path}: Read-only file system ({tmp_path}/.step_00000002."
    )
    assert "step_00000001 stays latest" in str(raised.value)
    assert_previous_is_latest(tmp_path)


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs, where this process may mount one (root, a mount namespace that allows it); skipped elsewhere."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip() or done.returncode}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_a_real_full_disk(asynchronous, small_disk):
    model = torch.nn.Linear(400, 400)  # 627 KiB of weights: the second checkpoint does not fit beside the first
    checkpointer = Checkpointer(small_disk, asynchronous=asynchronous)
    checkpointer.save(1, model_pieces(model, 1), "train: {}\n")
    checkpointer.wait()
    with pytest.raises(CheckpointWriteError) as raised:
        checkpointer.save(2, model_pieces(model, 2), "train: {}\n")
        checkpointer.wait()
    message = str(raised.value)
    assert f"No space left on device on the filesystem at {small_disk};" in message, message
    needed, free = space(message)
    assert 400 * 401 * 4 < needed < free + 1024**2 // 2 and free < 1024**2 // 2, message
    assert_previous_is_latest(small_disk)


def test_an_incomplete_directory_is_never_published(model, tmp_path, monkeypatch):
    """As when a second trainer in the same folder removed a file of this one's checkpoint before it was renamed."""
    written = Checkpointer._write_shards

    def removed(self, temporary, tensors):
        written(self, temporary, tensors)
        (temporary / ".metadata").unlink()

    monkeypatch.setattr(Checkpointer, "_write_shards", removed)
    with pytest.raises(CheckpointWriteError, match="checkpoint of step 1 not published: .* missing .metadata"):
        Checkpointer(tmp_path).save(1, model_pieces(model, 1), "train: {}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_two_writers_in_one_folder_never_mix_their_files(model, tmp_path, monkeypatch):
    """Writer A is held mid-checkpoint while writer B writes the same step; both then finish, whole."""
    import torch.distributed.checkpoint as dcp

    holding, release = threading.Event(), threading.Event()
    real = dcp.FileSystemWriter.write_data

    def held(self, plan, planner):
        if threading.current_thread().name == "writer-a":
            holding.set()
            assert release.wait(60)
        return real(self, plan, planner)

    monkeypatch.setattr(dcp.FileSystemWriter, "write_data", held)
    errors = []

    def writer_a():
        try:
            Checkpointer(tmp_path).save(1, model_pieces(model, 1), "train: {a: 1}\n")
        except BaseException as exn:  # noqa: BLE001 — reported by the assertion below
            errors.append(exn)

    thread = threading.Thread(target=writer_a, name="writer-a")
    thread.start()
    assert holding.wait(60)
    Checkpointer(tmp_path).save(1, model_pieces(model, 1), "train: {b: 1}\n")
    release.set()
    thread.join(60)
    assert errors == []
    verify(tmp_path / "step_00000001")
    assert (tmp_path / "step_00000001" / "config.yaml").read_text() == "train: {a: 1}\n"  # A's, whole
    assert leftovers(tmp_path) == []


FULL_DISK = """
import contextlib, errno, os, sys
from torch.distributed.checkpoint.filesystem import FileSystem

real, calls = FileSystem.create_stream, []

def fills(self, path, mode):  # the second checkpoint's DCP shard file: 1000 bytes, then the disk is full
    if "w" not in mode or not str(path).endswith(".distcp"):
        return real(self, path, mode)
    calls.append(path)
    if len(calls) < 2:
        return real(self, path, mode)
    return filled(real(self, path, mode))

@contextlib.contextmanager
def filled(manager):
    with manager as stream:
        stream.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        yield stream

FileSystem.create_stream = fills
from clipforge.cli import main

sys.exit(main(sys.argv[1:]))
"""


def test_clipforge_train_on_a_full_disk_exits_in_one_line(synth_data, tiny_model_json, tmp_path):
    config = write_config(tmp_path / "cfg.yaml", synth_data, tiny_model_json, tmp_path / "run", steps=6)
    script = tmp_path / "full_disk.py"
    script.write_text(FULL_DISK)
    done = subprocess.run(
        [sys.executable, str(script), "train", str(config)], env=env(), capture_output=True, text=True, timeout=300
    )
    errors = [line for line in done.stderr.splitlines() if line.startswith("clipforge train: error")]
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and len(errors) == 1, done.stderr[-3000:]
    assert errors[0].startswith("clipforge train: error: CheckpointWriteError: checkpoint of step 6 not written to ")
    assert "No space left on device" in errors[0] and "step_00000003 stays latest" in errors[0]
    checkpoints = tmp_path / "run" / "checkpoints"
    assert (checkpoints / "latest").resolve().name == "step_00000003" and leftovers(checkpoints) == []
