"""The launch environment, read once, and the one collective the loss needs.

``DistInfo.from_env(os.environ)`` is a pure function of the environment: torchrun and
``accelerate launch`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``..., ``TORCHELASTIC_RESTART_COUNT``), SLURM ``srun``
(``SLURM_PROCID``...) or nothing (a single process). Nothing else in clipforge reads those variables.

``init_process_group`` keeps the rendezvous keys of each torchrun restart apart: torchrun's agent serves one
TCPStore for the whole job, so without that a restarted rank can read a key its killed predecessor wrote (gloo's
listening address: ``Gloo connectFullMesh failed ... Connection refused``, or a connect that never completes).

``build_mesh(info)`` makes the run's one device mesh, once, after ``init_process_group``: every component that talks
to the other ranks (the data-parallel wrapper, the losses, the ranks' agreement, the checkpointer) is handed it, so
they all use the same ranks and the same process group (torchtitan's ``ParallelDims`` and its mesh).

``gather_with_grad`` all-gathers a tensor along dim 0 and routes gradients back to their owner:
the backward pass sums every rank's gradient for the gathered tensor and keeps this rank's
slice, so a "local" loss on each rank, averaged by DDP, equals the loss of one process holding
the whole global batch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

log = logging.getLogger("clipforge.distributed")

JOIN_GRACE_S = 60.0
"""How long past ``connect_timeout_s`` a rank may still be joining before it ends itself: gloo's connect to an address
that went stale can wait in C++ past its own timeout (an hour was seen), out of reach of any Python exception."""


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    device: str = "cpu"
    backend: str = "gloo"
    restart_count: int = 0
    """How many times torchrun has restarted the worker group (``--max-restarts``): 0 on the first start."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(
        cls, env: Mapping[str, str], cuda_available: bool | None = None, device_count: int | None = None
    ) -> DistInfo:
        """Read rank and world size from torchrun/accelerate, SLURM, or default to one process.

        The device is ``cuda:{local_rank % device_count}`` among the GPUs this process sees: srun binding one GPU
        per task (``--gpus-per-task=1``, ``--gpu-bind``) leaves one visible device, ``cuda:0``, to every local
        rank. ``cuda_available`` and ``device_count`` default to what torch reports."""
        if cuda_available is None:
            cuda_available = torch.cuda.is_available()
        restart_count = 0
        if "WORLD_SIZE" in env and "RANK" in env:  # torchrun, accelerate launch, torch.distributed.launch
            rank, world_size = int(env["RANK"]), int(env["WORLD_SIZE"])
            local_rank = int(env.get("LOCAL_RANK", 0))
            local_world_size = int(env.get("LOCAL_WORLD_SIZE", world_size))
            restart_count = int(env.get("TORCHELASTIC_RESTART_COUNT", 0))
        elif "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:  # srun, one task per rank
            rank, world_size = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
            local_rank = int(env.get("SLURM_LOCALID", 0))
            local_world_size = int(env.get("SLURM_NTASKS_PER_NODE", str(world_size)).split("(")[0])
        else:
            rank, local_rank, world_size, local_world_size = 0, 0, 1, 1
        use_cpu = env.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not cuda_available
        if use_cpu:
            device = "cpu"
        else:
            if device_count is None:
                device_count = torch.cuda.device_count()
            device = f"cuda:{local_rank % max(1, device_count)}"
        backend = "gloo" if use_cpu else "nccl"
        return cls(rank, local_rank, world_size, local_world_size, device, backend, restart_count)


def init_process_group(
    info: DistInfo, env: Mapping[str, str], timeout_s: float = 1800, connect_timeout_s: float = 600
) -> None:
    """Create the default process group for ``info`` (no-op for a single process).

    The group's keys live under ``clipforge/restart_{info.restart_count}/`` in the rendezvous store, so the ranks
    of a torchrun restart never read what the previous attempt's ranks wrote there. Connecting (the store, then
    gloo's full mesh) gives up after ``connect_timeout_s`` with an error naming the rendezvous address, and a rank
    still connecting ``JOIN_GRACE_S`` later ends itself; collectives wait up to ``timeout_s`` (a rank may
    legitimately wait that long for another's evaluation or checkpoint)."""
    if not info.is_distributed or dist.is_initialized():
        return
    if "MASTER_ADDR" not in env:
        raise ValueError(
            "a multi-process launch needs MASTER_ADDR and MASTER_PORT in the environment "
            "(torchrun and accelerate set them; under srun export them in the sbatch script)"
        )
    if info.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(info.device))  # the visible device from_env chose, not the local rank
    address = f"tcp://{env['MASTER_ADDR']}:{env.get('MASTER_PORT', '29500')}"
    connect_timeout = timedelta(seconds=connect_timeout_s)
    deadline_s = connect_timeout_s + JOIN_GRACE_S
    still_joining = (
        f"rank {info.rank} of {info.world_size} still joining the process group at {address} (restart "
        f"{info.restart_count}) after {deadline_s:g} s, past its connect timeout of {connect_timeout_s:g} s: exiting"
    )
    with _exit_if_still_running(deadline_s, still_joining):
        try:
            # the store torch would make from this address: a client of torchrun's agent store, or hosted by rank 0
            store, _, _ = next(dist.rendezvous(address, info.rank, info.world_size, timeout=connect_timeout))
            store.set_timeout(connect_timeout)
            dist.init_process_group(
                backend=info.backend,
                store=dist.PrefixStore(f"clipforge/restart_{info.restart_count}", store),
                rank=info.rank,
                world_size=info.world_size,
                timeout=connect_timeout,
            )
        except RuntimeError as error:  # torch's store errors (DistStoreError, DistNetworkError) and gloo's connect
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise ConnectionError(
                f"rank {info.rank} of {info.world_size} could not join the process group at {address} (restart "
                f"{info.restart_count}, connect timeout {connect_timeout_s:g} s): {reason}"
            ) from error
    timeout = timedelta(seconds=timeout_s)
    store.set_timeout(timeout)  # later store waits (new_group's connects) as long as a collective may take
    dist.set_timeout(timeout)


@contextlib.contextmanager
def _exit_if_still_running(seconds: float, message: str) -> Iterator[None]:
    """Log ``message`` and end the process (exit status 1) if the block is still running after ``seconds``."""

    def expire() -> None:
        log.error(message)
        os._exit(1)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


MESH_DIM = "dp"
"""The name of the run's one mesh dimension: data parallel, over every rank."""


def build_mesh(info: DistInfo) -> DeviceMesh | None:
    """The run's device mesh: one dimension, ``MESH_DIM``, over every rank in rank order, on the device type of
    ``info.device`` (``cuda`` or ``cpu``); its group holds the default group's ranks (on one device type, torch
    gives the default group itself). Build it once, after ``init_process_group``, and hand it to every component
    that talks to the other ranks.

    One process has no mesh: None. It has no process group (``init_process_group`` makes none, and a mesh needs
    one), and none of its components talks to another rank; each of them reads None as "this process alone"."""
    if not info.is_distributed:
        return None
    if not dist.is_initialized():
        raise RuntimeError(
            f"build_mesh: rank {info.rank} of {info.world_size} has no process group yet (init_process_group first)"
        )
    return init_device_mesh(torch.device(info.device).type, (info.world_size,), mesh_dim_names=(MESH_DIM,))


def mesh_group(mesh: DeviceMesh | None) -> dist.ProcessGroup | None:
    """The process group of ``mesh``'s one dimension, for a collective's ``group=``; None (the default group, which
    one process never uses) without a mesh."""
    return None if mesh is None else mesh.get_group()


def all_gather(tensor: torch.Tensor, world_size: int, group=None) -> torch.Tensor:
    """All-gather ``tensor`` (B_local, ...) → (world_size * B_local, ...) in rank order, without gradient.

    One collective straight into the output (``all_gather_single``, the name ``all_gather_into_tensor`` has in
    torch ≥ 2.14), instead of a list of world_size buffers and a copy by ``torch.cat``."""
    if world_size == 1:
        return tensor
    tensor = tensor.contiguous()
    gathered = tensor.new_empty((world_size * tensor.shape[0], *tensor.shape[1:]))
    dist.all_gather_single(gathered, tensor, group=group)
    return gathered


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, world_size: int, group) -> torch.Tensor:
        ctx.world_size, ctx.group = world_size, group
        return all_gather(tensor, world_size, group)  # (world_size * B_local, ...)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # every rank's gradient for the gathered tensor, summed, and only this rank's rows kept: a reduce-scatter
        # moves half the bytes of an all-reduce followed by a slice
        grad = grad.contiguous()
        local = grad.new_empty((grad.shape[0] // ctx.world_size, *grad.shape[1:]))
        dist.reduce_scatter_single(local, grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return local, None, None


def gather_with_grad(tensor: torch.Tensor, rank: int, world_size: int, group=None) -> torch.Tensor:
    """All-gather ``tensor`` (B_local, ...) → (world_size * B_local, ...) with gradient to the owner.

    This process's rows are the ones at its rank in ``group``: the backward pass's reduce-scatter returns them by
    that rank, so ``rank`` itself is not needed by the collectives (the losses pass it, and use it for labels)."""
    if world_size == 1:
        return tensor
    return _GatherWithGrad.apply(tensor, world_size, group)


class Agreement:
    """``agree(flag) -> bool``: True only if ``flag`` is True on every rank; ``agree(a, b, ...)`` agrees on several
    flags in the same all-reduce and returns a tuple.

    The data loader asks it every step in epoch mode (do all ranks still have a batch?); the trainer once per step
    (no stop signal and no numerics abort on any rank?). It runs on the ranks of ``mesh`` (the default group's
    without one), on a CPU tensor: over the mesh's own group when that is gloo, else over a gloo group of the same
    ranks made here (``group``), so that under NCCL it never synchronises the GPU stream. One process agrees with
    itself and has no group.
    """

    def __init__(self, info: DistInfo, mesh: DeviceMesh | None = None) -> None:
        self.distributed = info.is_distributed
        self.group: dist.ProcessGroup | None = None
        if self.distributed:
            ranks = mesh.get_group() if mesh is not None else dist.group.WORLD
            if dist.get_backend(ranks) == "gloo":
                self.group = ranks
            else:
                self.group = dist.new_group(dist.get_process_group_ranks(ranks), backend="gloo")

    def __call__(self, *flags: bool):
        if self.distributed:
            value = torch.tensor([1 if flag else 0 for flag in flags], dtype=torch.int32)
            dist.all_reduce(value, op=dist.ReduceOp.MIN, group=self.group)
            flags = tuple(bool(v) for v in value.tolist())
        else:
            flags = tuple(bool(flag) for flag in flags)
        return flags[0] if len(flags) == 1 else flags


def make_agreement(info: DistInfo, mesh: DeviceMesh | None = None) -> Agreement:
    """The ranks' agreement (``Agreement``) on ``mesh``'s ranks: the run's mesh (``build_mesh``) once there is one;
    without it (a check before the run is built) the default group's, which are the same ranks."""
    return Agreement(info, mesh)
