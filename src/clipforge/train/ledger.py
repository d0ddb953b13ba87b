"""The storage ledger of a fake training step (``clipforge.train.memory``): which storages are alive, how many bytes,
made by which part of the step, and what each collective sends.

The ledger (``StorageLedger``) is a dispatch mode that sees every operation's outputs and keeps one record per
storage (its bytes, the part of the step that made it, when it was made and freed: a weak reference tells), and
follows the storages FSDP resizes in place. The peak is the largest sum of live storages during the step; its
composition comes from the records alive at that moment, each put in one part (``PARTS``): the model's parameters
and buffers, gradients, optimizer state, the objectives' own modules (a head, a decoder: their parameters,
gradients and state), the batch, activations (made in the forward and kept for the backward), loss buffers
(made by the objectives: gathered features, logits or tiles), backward temporaries (activation gradients,
recomputed activations, unsharded gradients before their reduce-scatter), communication buffers (FSDP's
all-gather and reduce-scatter buffers and the blocks' unsharded parameters; DDP's gradient buckets, see below).

Every collective of the step is logged with the bytes each rank sends under the ring algorithms NCCL uses for
large messages: (N - 1)/N of the gathered tensor for an all-gather, of the input for a reduce-scatter, twice
that for an all-reduce, the whole tensor for a send.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch._guards import active_fake_mode
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

PARTS = (
    "parameters",
    "gradients",
    "optimizer_state",
    "objective_modules",
    "batch",
    "activations",
    "loss_buffers",
    "backward_temporaries",
    "optimizer_temporaries",
    "communication_buffers",
    "other",
)
"""The parts of a rank's memory, in the order they are reported (module docstring)."""

PHASE_PARTS = {
    "forward": "activations",
    "loss": "loss_buffers",
    "backward": "backward_temporaries",
    "optimizer": "optimizer_temporaries",
    "batch": "batch",
}


@dataclass
class _Record:
    nbytes: int
    phase: str
    born: int
    died: int | None = None
    communication: bool = False  # a collective's buffer, or a storage FSDP resizes (its unsharded parameters)
    handle: weakref.ref | None = None


@dataclass
class Collective:
    kind: str  # all_gather, reduce_scatter, all_reduce, send, recv, broadcast
    phase: str
    nbytes: int  # the tensor the collective is about: gathered output, scattered input, reduced or sent tensor
    sent: float  # bytes this rank sends (module docstring)


def _collective_kind(func) -> str | None:
    """The collective an operator is (c10d's and the functional collectives'), or None."""
    namespace, _, name = func.name().partition("::")
    if namespace not in ("c10d", "_c10d_functional", "_c10d_functional_autograd"):
        return None
    name = name.split(".")[0]
    for kind, marks in (
        ("all_gather", ("allgather", "all_gather")),
        ("reduce_scatter", ("reduce_scatter",)),
        ("all_reduce", ("allreduce", "all_reduce")),
        ("broadcast", ("broadcast",)),
        ("recv", ("recv",)),
        ("send", ("send",)),
    ):
        if any(mark in name for mark in marks):
            return kind
    return None


def _tensors(value) -> list[torch.Tensor]:
    return [leaf for leaf in tree_flatten(value)[0] if isinstance(leaf, torch.Tensor)]


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class StorageLedger(TorchDispatchMode):
    """Every storage the operations under it make, with its part of the step, birth and death (module docstring)."""

    def __init__(self, world_size: int) -> None:
        super().__init__()
        self.world_size = world_size
        self.records: list[_Record] = []
        self.index = WeakIdKeyDictionary()  # storage -> position in records
        self.clock = 0
        self.phase = "setup"
        self.live = 0
        self.peak, self.peak_at = 0, 0
        self.collectives: list[Collective] = []
        self.fake_mode = None
        self._resize = torch.UntypedStorage.resize_

    # the ledger

    def _died(self, position: int, _reference) -> None:
        record = self.records[position]
        if record.died is None:
            self.clock += 1
            record.died = self.clock
            self.live -= record.nbytes

    def track(self, tensor: torch.Tensor, communication: bool = False) -> _Record:
        """The record of ``tensor``'s storage (``tensor.to_local()``'s for a DTensor), made if it has none."""
        if isinstance(tensor, DTensor):
            tensor = tensor.to_local()
        storage = tensor.untyped_storage()
        position = self.index.get(storage)
        record = self._born(storage, communication) if position is None else self.records[position]
        record.communication |= communication
        return record

    def _born(self, storage: torch.UntypedStorage, communication: bool) -> _Record:
        self.clock += 1
        record = _Record(storage.nbytes(), self.phase, self.clock, communication=communication)
        position = len(self.records)
        record.handle = weakref.ref(storage, lambda reference: self._died(position, reference))
        self.records.append(record)
        self.index[storage] = position
        self.live += record.nbytes
        if self.live > self.peak:
            self.peak, self.peak_at = self.live, self.clock
        return record

    def _resized(self, storage: torch.UntypedStorage, size: int) -> None:
        """FSDP frees and refills its unsharded parameters by resizing their storages in place (no operator): a
        death and a birth, the new bytes owned by the part of the step that refills them."""
        self._resize(storage, size)
        position = self.index.get(storage)
        if position is None:
            return
        old = self.records[position]
        old.handle = None  # the storage lives on under its new record
        self._died(position, None)
        self._born(storage, communication=True)

    def start(self) -> None:
        """The step starts now: the peak is counted from here."""
        self.peak, self.peak_at = self.live, self.clock
        self.collectives.clear()

    def __enter__(self):
        self.fake_mode = active_fake_mode()
        torch.UntypedStorage.resize_ = lambda storage, size: self._resized(storage, size)
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._resize
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(issubclass(kind, DTensor) for kind in types):
            return NotImplemented  # let DTensor run its local operations, which come back here
        if func is torch.ops._c10d_functional.wait_tensor.default and active_fake_mode() is not None:
            out = args[0]  # the fake kernel makes a new tensor where the real one returns its input
        else:
            out = func(*args, **(kwargs or {}))
        if active_fake_mode() is not self.fake_mode:  # DTensor's own shape propagation, not the step's memory
            return out
        kind = _collective_kind(func)
        if kind is not None:
            self._log_collective(kind, args, out)
        for tensor in _tensors(out):
            self.track(tensor, communication=kind is not None and self.phase in ("forward", "backward"))
        return out

    def _log_collective(self, kind: str, args, out) -> None:
        tensors = _tensors(args) + _tensors(out)
        if not tensors:
            return
        n = self.world_size
        if kind in ("all_gather", "reduce_scatter"):
            nbytes = max(tensor_bytes(tensor) for tensor in tensors)  # the gathered output; the scattered input
            sent = nbytes * (n - 1) / n
        else:
            nbytes = sum(tensor_bytes(tensor) for tensor in _tensors(args[0]))
            sent = {"all_reduce": 2 * nbytes * (n - 1) / n, "send": nbytes, "broadcast": nbytes}.get(kind, 0.0)
        self.collectives.append(Collective(kind, self.phase, nbytes, sent))
        if self.phase in ("forward", "backward"):
            for tensor in tensors:
                self.track(tensor, communication=True)

    # reading it

    def alive_at(self, moment: int) -> list[tuple[int, _Record]]:
        return [
            (position, record)
            for position, record in enumerate(self.records)
            if record.born <= moment and (record.died is None or record.died > moment)
        ]


class PhaseRecorder:
    """The step's profiling hooks (``clipforge.train.profile``), used to tell the ledger which part is running."""

    active = False

    def __init__(self, ledger: StorageLedger) -> None:
        self.ledger = ledger

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        # an objective's own part (``loss/NAME``) is loss memory like the rest of the loss
        before, self.ledger.phase = self.ledger.phase, {"copy": "batch"}.get(name, name.split("/")[0])
        try:
            yield
        finally:
            self.ledger.phase = before

    def forward(self, model: torch.nn.Module):
        return self.part("forward")


@contextlib.contextmanager
def fake_process_group(world_size: int) -> Iterator[None]:
    """A process group of ``world_size`` ranks in this one process, this being rank 0 (torch's ``fake`` backend:
    collectives return at once, their outputs shaped but not filled)."""
    if world_size == 1:
        yield
        return
    if dist.is_initialized():
        raise RuntimeError("planning needs its own fake process group; this process already has one")
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", rank=0, world_size=world_size, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()
