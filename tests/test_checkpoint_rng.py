"""The RNG state in a checkpoint: this rank's generators only, restored exactly, CUDA touched only for a GPU device.

The GPU round trip itself is in tests/test_cuda.py; here the CUDA functions are replaced by fakes that raise (a CPU
rank must never call them) or record which device's generator was read or set.
"""

from __future__ import annotations

import logging
import random
import sys

import pytest
import torch
from checkpointing import as_older_layout, load_checkpoint, save_checkpoint

from clipforge.train.state import RNGState

CUDA_FUNCTIONS = (
    "is_available",
    "device_count",
    "current_device",
    "init",
    "_lazy_init",
    "get_rng_state",
    "get_rng_state_all",
    "set_rng_state",
    "set_rng_state_all",
)


@pytest.fixture
def no_cuda(monkeypatch):
    """Every torch.cuda function a generator save or restore could reach raises (the tests seed torch themselves:
    torch.manual_seed queues a CUDA seed, which is no part of the code under test; and torch itself asks whether CUDA
    is available, which initialises nothing, where torch.distributed.checkpoint writes a file or AdamW steps)."""

    def forbidden(name):
        real = getattr(torch.cuda, name)

        def call(*args, **kwargs):
            if name == "is_available" and sys._getframe(1).f_globals["__name__"].startswith("torch."):
                return real(*args, **kwargs)
            raise AssertionError(f"torch.cuda.{name} called for a CPU device")

        return call

    for name in CUDA_FUNCTIONS:
        monkeypatch.setattr(torch.cuda, name, forbidden(name))


def draws() -> tuple[list[float], list[float]]:
    return torch.rand(5).tolist(), [random.random() for _ in range(3)]


def test_a_cpu_rank_round_trips_its_generators_through_a_checkpoint_without_cuda(no_cuda, tmp_path):
    torch.manual_seed(7)
    random.seed(8)
    draws()  # a generator somewhere in its stream, not at a seed
    assert set(RNGState("cpu").state_dict()) == {"torch", "python"}
    model = torch.nn.Linear(2, 2)
    save_checkpoint(tmp_path, model)  # the generators as they are now
    expected = draws()
    torch.manual_seed(0)
    random.seed(0)
    load_checkpoint(tmp_path / "step_00000001", model)
    assert draws() == expected


def as_every_gpus_list(checkpoint, every_gpu: list[torch.Tensor]) -> None:
    """Make ``checkpoint``'s rank-0 generators those of a layout that saved every visible GPU's, as a list under
    "cuda" (a checkpoint whose manifest has no ``format``)."""
    state = torch.load(checkpoint / "rng_rank0.pt", weights_only=True)
    torch.save({"torch": state["torch"], "python": state["python"], "cuda": every_gpu}, checkpoint / "rng_rank0.pt")
    as_older_layout(checkpoint)


def test_a_gpu_checkpoint_with_every_gpus_generator_resumes_on_a_cpu(no_cuda, tmp_path):
    """A CPU run ignores the list and still gets the torch and Python generators back."""
    torch.manual_seed(3)
    random.seed(4)
    model = torch.nn.Linear(2, 2)
    checkpoint = save_checkpoint(tmp_path, model)
    as_every_gpus_list(checkpoint, [torch.zeros(16, dtype=torch.uint8), torch.ones(16, dtype=torch.uint8)])
    expected = draws()
    torch.manual_seed(0)
    random.seed(0)
    load_checkpoint(checkpoint, model)
    assert draws() == expected


class FakeCudaGenerators:
    """torch.cuda's generator functions for two GPUs whose states are distinct tensors; reads and writes recorded."""

    def __init__(self, monkeypatch):
        self.states = {0: torch.full((16,), 10, dtype=torch.uint8), 1: torch.full((16,), 11, dtype=torch.uint8)}
        self.set_calls: list[tuple[torch.Tensor, torch.device]] = []
        monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": self.states[torch.device(device).index])
        monkeypatch.setattr(
            torch.cuda,
            "set_rng_state",
            lambda state, device="cuda": self.set_calls.append((state, torch.device(device))),
        )
        for name in ("get_rng_state_all", "set_rng_state_all"):
            monkeypatch.setattr(torch.cuda, name, self._refuse(name))

    @staticmethod
    def _refuse(name):
        def call(*args, **kwargs):
            raise AssertionError(f"torch.cuda.{name}: every GPU's generator, not this rank's")

        return call


def test_a_gpu_rank_saves_and_restores_its_own_device_only(monkeypatch):
    cuda = FakeCudaGenerators(monkeypatch)
    state = RNGState("cuda:1").state_dict()
    assert set(state) == {"torch", "python", "cuda_device"}
    assert torch.equal(state["cuda_device"], cuda.states[1])
    RNGState("cuda:1").load_state_dict(state)
    [(restored, device)] = cuda.set_calls
    assert torch.equal(restored, cuda.states[1]) and device == torch.device("cuda", 1)


def test_a_checkpoint_with_every_gpus_generator_gives_a_gpu_rank_the_entry_of_its_device(monkeypatch, caplog, tmp_path):
    cuda = FakeCudaGenerators(monkeypatch)
    model = torch.nn.Linear(2, 2)
    checkpoint = save_checkpoint(tmp_path, model, device="cuda:1")
    every_gpu = [torch.full((16,), 20, dtype=torch.uint8), torch.full((16,), 21, dtype=torch.uint8)]
    as_every_gpus_list(checkpoint, every_gpu)
    load_checkpoint(checkpoint, model, device="cuda:1")
    [(restored, device)] = cuda.set_calls
    assert torch.equal(restored, every_gpu[1]) and device == torch.device("cuda", 1)
    # resumed with fewer visible GPUs than wrote it: nothing to take for cuda:1, no error
    cuda.set_calls.clear()
    as_every_gpus_list(checkpoint, every_gpu[:1])
    with caplog.at_level(logging.WARNING):
        load_checkpoint(checkpoint, model, device="cuda:1")
    assert cuda.set_calls == [] and "no CUDA generator state for cuda:1" in caplog.text
