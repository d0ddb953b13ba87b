"""``checkpoint.async_save``: the model and optimizer are copied, then written in the background (DCP async_save).

The save returns before the files are written, and what it writes is the state at the save even though the next
step changes the weights meanwhile; a background write that fails publishes nothing, so ``latest`` still names the
previous complete, verified checkpoint, which loads.
"""

from __future__ import annotations

import threading

import pytest
import torch
import torch.distributed.checkpoint as dcp
from checkpointing import model_pieces

from clipforge.checkpoints import has_dcp_weights, read_weights, verify
from clipforge.models import ModelConfig, build_model
from clipforge.train.checkpoint import Checkpointer, CheckpointWriteError


@pytest.fixture
def model(tiny_model_json):
    torch.manual_seed(0)
    return build_model(ModelConfig(name=tiny_model_json)).model


def test_the_next_step_starts_before_the_files_are_written(model, tmp_path, monkeypatch):
    release, writing = threading.Event(), threading.Event()
    original = dcp.FileSystemWriter.write_data

    def held(self, plan, planner):  # the background write waits until the "next step" has changed the weights
        writing.set()
        assert release.wait(60)
        return original(self, plan, planner)

    monkeypatch.setattr(dcp.FileSystemWriter, "write_data", held)
    checkpointer = Checkpointer(tmp_path, asynchronous=True)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    final = checkpointer.save(1, model_pieces(model, 1), "train: {}\n")
    assert writing.wait(60) and not final.exists()  # save returned; nothing is published yet
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)  # the next step
    release.set()
    checkpointer.wait()
    verify(final)
    assert has_dcp_weights(final) and (tmp_path / "latest").resolve() == final
    saved = read_weights(final)
    assert all(torch.equal(saved[name], before[name]) for name in saved)


def test_a_failed_background_write_leaves_the_previous_checkpoint_latest(model, tmp_path, monkeypatch, tiny_model_json):
    checkpointer = Checkpointer(tmp_path, asynchronous=True)
    checkpointer.save(1, model_pieces(model, 1), "train: {}\n")
    checkpointer.wait()

    def failing(self, plan, planner):
        raise OSError("No space left on device")

    monkeypatch.setattr(dcp.FileSystemWriter, "write_data", failing)
    checkpointer.save(2, model_pieces(model, 2), "train: {}\n")  # returns: the failure is in the background
    with pytest.raises(CheckpointWriteError, match="^checkpoint of step 2 not written to .*: No space left") as raised:
        checkpointer.wait()  # one line naming the folder, with DCP's CheckpointException (every rank's error) as cause
    assert "No space left on device" in str(raised.value.__cause__.failures[0])
    monkeypatch.undo()
    assert [p.name for p in checkpointer.complete()] == ["step_00000001"]
    assert checkpointer.latest_intact() == (tmp_path / "latest").resolve() == tmp_path / "step_00000001"
    assert not list(tmp_path.glob(".step_00000002*"))
    torch.manual_seed(1)
    fresh = build_model(ModelConfig(name=tiny_model_json)).model
    Checkpointer(tmp_path).load(tmp_path / "latest", model_pieces(fresh))
    saved = read_weights(tmp_path / "step_00000001")
    assert all(torch.equal(fresh.state_dict()[name], saved[name]) for name in saved)
