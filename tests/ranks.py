"""Run a function on N gloo processes (spawned) and collect what each rank returns; on N GPUs under NCCL with
``device="cuda"`` (rank r on cuda:r)."""

from __future__ import annotations

import multiprocessing
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

from clipforge.distributed import DistInfo, destroy_process_group, init_process_group


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank, fn, world_size, port, out_dir, args, device="cpu"):
    # A spawned child defaults to spawning its own children; processes started by torchrun or srun fork
    # their DataLoader workers. Do as they do (spawned workers would re-import everything, ~20 s each).
    multiprocessing.set_start_method("fork", force=True)
    if device == "cuda":
        info = DistInfo(
            rank=rank,
            local_rank=rank,
            world_size=world_size,
            local_world_size=world_size,
            device=f"cuda:{rank}",
            backend="nccl",
        )
    else:
        info = DistInfo(rank=rank, world_size=world_size, local_world_size=world_size)
    init_process_group(info, {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
        torch.distributed.barrier()  # no rank tears gloo down while another still talks (SIGABRT otherwise)
    except BaseException:
        destroy_process_group()
        raise
    # Every rank's result is saved and every rank is past the barrier: leave without running C++ destructors.
    # gloo's background threads, torn down at interpreter exit, sometimes abort the process ("terminate called
    # without an active exception", SIGABRT) after the test's work is done, failing a passing test.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(fn, world_size: int, out_dir: Path, *args, device: str = "cpu", timeout: float | None = None) -> list:
    """``fn(rank, world_size, *args)`` on each rank under an initialised gloo group (``device="cuda"``: NCCL, rank r
    on cuda:r); the results, by rank. ``timeout`` seconds: a rank still running then (a hung collective) fails the
    test with TimeoutError instead of stalling the suite."""
    import time

    out_dir.mkdir(parents=True, exist_ok=True)
    context = mp.start_processes(
        _entry,
        args=(fn, world_size, free_port(), str(out_dir), args, device),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    deadline = None if timeout is None else time.monotonic() + timeout
    while not context.join(None if deadline is None else max(0.0, deadline - time.monotonic())):
        if deadline is not None and time.monotonic() >= deadline:
            for process in context.processes:
                process.kill()
            raise TimeoutError(
                f"{getattr(fn, '__name__', fn)} on {world_size} {device} ranks: not done after "
                f"{timeout} s (a collective that never completes?)"
            )
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]


def launch_ranks(command: list[str], world_size: int, timeout: float = 240, **env: str) -> list[tuple[int, str]]:
    """``command`` as each rank of a torchrun-style launch on this host (RANK, WORLD_SIZE, MASTER_* set; any
    launcher or SLURM variables of the calling environment removed); (exit code, stdout + stderr) per rank."""
    import tempfile
    import time

    base = {
        k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_", "MASTER_"))
    }
    port = str(free_port())
    logs = [tempfile.TemporaryFile(mode="w+") for _ in range(world_size)]  # no pipe fills while another is read
    processes = [
        subprocess.Popen(
            command,
            text=True,
            stdout=logs[rank],
            stderr=subprocess.STDOUT,
            env={
                **base,
                "RANK": str(rank),
                "WORLD_SIZE": str(world_size),
                "LOCAL_RANK": str(rank),
                "LOCAL_WORLD_SIZE": str(world_size),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
                "OMP_NUM_THREADS": "1",
                "PYTHONUNBUFFERED": "1",
                **env,
            },
        )
        for rank in range(world_size)
    ]
    try:
        deadline = time.time() + timeout
        for process in processes:
            process.wait(timeout=max(1.0, deadline - time.time()))
    finally:
        for process in processes:
            process.kill()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    return [(process.returncode, output) for process, output in zip(processes, outputs)]
