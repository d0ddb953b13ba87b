"""Run a function on N gloo processes (spawned) and collect what each rank returns."""

from __future__ import annotations

import multiprocessing
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp

from clipforge.distributed import DistInfo, destroy_process_group, init_process_group


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank, fn, world_size, port, out_dir, args):
    # A spawned child defaults to spawning its own children; processes started by torchrun or srun fork
    # their DataLoader workers. Do as they do (spawned workers would re-import everything, ~20 s each).
    multiprocessing.set_start_method("fork", force=True)
    info = DistInfo(rank=rank, world_size=world_size, local_world_size=world_size)
    init_process_group(info, {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
        torch.distributed.barrier()  # no rank tears gloo down while another still talks (SIGABRT otherwise)
    finally:
        destroy_process_group()


def run_ranks(fn, world_size: int, out_dir: Path, *args) -> list:
    """``fn(rank, world_size, *args)`` on each rank under an initialised gloo group; the results, by rank."""
    out_dir.mkdir(parents=True, exist_ok=True)
    mp.start_processes(_entry, args=(fn, world_size, free_port(), str(out_dir), args), nprocs=world_size, join=True,
                       start_method="spawn")
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]
