"""``DistInfo.from_env``: the process group's shape and backend come from whichever launcher's environment is there;
``init_process_group`` joins it, once per torchrun restart, within a bounded time."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from clipforge.distributed import DistInfo, init_process_group

TORCHRUN = {
    "RANK": "5",
    "WORLD_SIZE": "8",
    "LOCAL_RANK": "1",
    "LOCAL_WORLD_SIZE": "4",
    "MASTER_ADDR": "node0",
    "MASTER_PORT": "29500",
}
SRUN = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "4"}


@pytest.mark.parametrize(
    "env, cuda, expected",
    [
        ({}, True, DistInfo(0, 0, 1, 1, "cuda:0", "nccl")),
        ({}, False, DistInfo(0, 0, 1, 1, "cpu", "gloo")),
        (TORCHRUN, True, DistInfo(5, 1, 8, 4, "cuda:1", "nccl")),
        (TORCHRUN, False, DistInfo(5, 1, 8, 4, "cpu", "gloo")),
        ({**TORCHRUN, "ACCELERATE_USE_CPU": "true"}, True, DistInfo(5, 1, 8, 4, "cpu", "gloo")),  # accelerate on CPU
        (SRUN, True, DistInfo(5, 1, 8, 4, "cuda:1", "nccl")),
        (
            {**SRUN, "SLURM_NTASKS_PER_NODE": "4(x2)"},
            True,
            DistInfo(5, 1, 8, 4, "cuda:1", "nccl"),
        ),  # SLURM's repeat form
        # a torchrun inside an sbatch job: torchrun's variables win over the job's
        ({**SRUN, "SLURM_NTASKS": "2", "SLURM_PROCID": "0", **TORCHRUN}, True, DistInfo(5, 1, 8, 4, "cuda:1", "nccl")),
        # a single-task SLURM job (one task per node running torchrun or python): one process
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, False, DistInfo(0, 0, 1, 1, "cpu", "gloo")),
        # the worker group torchrun started after its second restart (--max-restarts)
        ({**TORCHRUN, "TORCHELASTIC_RESTART_COUNT": "2"}, False, DistInfo(5, 1, 8, 4, "cpu", "gloo", restart_count=2)),
    ],
)
def test_from_env(env, cuda, expected):
    assert DistInfo.from_env(env, cuda_available=cuda, device_count=4) == expected  # a GPU per local rank


ONE_GPU_PER_TASK = {"SLURM_PROCID": "7", "SLURM_NTASKS": "8", "SLURM_LOCALID": "3", "SLURM_NTASKS_PER_NODE": "4"}


@pytest.mark.parametrize(
    "env, device_count, expected",
    [
        # srun --gpus-per-task=1: every task sees one GPU, its own, as cuda:0 (cuda:3 would be an invalid ordinal)
        (ONE_GPU_PER_TASK, 1, DistInfo(7, 3, 8, 4, "cuda:0", "nccl")),
        ({**TORCHRUN, "LOCAL_RANK": "3"}, 1, DistInfo(5, 3, 8, 4, "cuda:0", "nccl")),
        (ONE_GPU_PER_TASK, 2, DistInfo(7, 3, 8, 4, "cuda:1", "nccl")),  # two GPUs shared by four tasks
        (ONE_GPU_PER_TASK, 8, DistInfo(7, 3, 8, 4, "cuda:3", "nccl")),  # every GPU of the node visible
        (ONE_GPU_PER_TASK, 0, DistInfo(7, 3, 8, 4, "cuda:0", "nccl")),
    ],
)
def test_the_device_is_the_local_rank_among_the_visible_gpus(env, device_count, expected):
    assert DistInfo.from_env(env, cuda_available=True, device_count=device_count) == expected


def test_the_device_count_is_read_only_for_a_gpu_run(monkeypatch):
    import torch

    def no_count():
        raise AssertionError("torch.cuda.device_count() called for a CPU run")

    monkeypatch.setattr(torch.cuda, "device_count", no_count)
    assert DistInfo.from_env(ONE_GPU_PER_TASK, cuda_available=False).device == "cpu"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # the default, when not passed in
    assert DistInfo.from_env(ONE_GPU_PER_TASK, cuda_available=True).device == "cuda:0"


def test_several_processes_need_a_rendezvous_address():
    with pytest.raises(ValueError, match="MASTER_ADDR and MASTER_PORT"):
        init_process_group(DistInfo.from_env(SRUN, cuda_available=False), SRUN)


def test_one_gpu_per_task_binds_and_wraps_the_visible_device(monkeypatch):
    """init_process_group and DDP use from_env's device (cuda:0 of one visible GPU), not the local rank (3)."""
    import torch

    from clipforge import distributed
    from clipforge.train import parallel

    info = DistInfo.from_env({**ONE_GPU_PER_TASK, "MASTER_ADDR": "node0"}, cuda_available=True, device_count=1)
    calls = {}
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.setdefault("set_device", device))
    monkeypatch.setattr(
        distributed.dist, "rendezvous", lambda *args, **kwargs: iter([(torch.distributed.Store(), 7, 8)])
    )
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda **kwargs: calls.setdefault("init", kwargs))
    monkeypatch.setattr(distributed.dist, "set_timeout", lambda timeout: None)
    distributed.init_process_group(info, {"MASTER_ADDR": "node0"})
    assert calls["set_device"] == torch.device("cuda", 0)
    assert calls["init"]["backend"] == "nccl" and calls["init"]["rank"] == 7

    class Placed(torch.nn.Linear):
        def to(self, *args, **kwargs):  # no GPU here: record the placement instead
            calls["to"] = args
            return self

    monkeypatch.setattr(
        parallel,
        "DistributedDataParallel",
        lambda model, device_ids, device_mesh: calls.setdefault("device_ids", device_ids),
    )
    parallel.parallelize(Placed(2, 2), info, mesh=object())  # the run's mesh; none can be built without a group
    assert calls["to"] == ("cuda:0",) and calls["device_ids"] == [0]


def _gather_on_rank(rank, world_size):
    import torch

    from clipforge.distributed import all_gather

    features = torch.arange(6, dtype=torch.float32).view(3, 2) + 100 * rank  # (B_local, D)
    ids = torch.tensor([rank, 10 + rank], dtype=torch.int64)  # (B_local,)
    return all_gather(features, world_size), all_gather(ids, world_size)


def test_all_gather_concatenates_every_rank_in_rank_order(tmp_path):
    import torch
    from ranks import run_ranks

    results = run_ranks(_gather_on_rank, 3, tmp_path / "ranks")
    features = torch.cat([torch.arange(6, dtype=torch.float32).view(3, 2) + 100 * rank for rank in range(3)])
    ids = torch.tensor([0, 10, 1, 11, 2, 12])
    for gathered_features, gathered_ids in results:
        assert torch.equal(gathered_features, features) and gathered_ids.dtype == torch.int64
        assert torch.equal(gathered_ids, ids)


def _hang_in_a_receive(rank, world_size, marker):
    import time
    from pathlib import Path

    import torch

    if rank == 0:
        time.sleep(600)  # never sends
    Path(marker).touch()
    torch.distributed.recv(torch.empty(1), src=0)


def test_a_hung_collective_fails_the_launch_after_its_timeout(tmp_path):
    """run_ranks(timeout=...) is what keeps a deadlocked NCCL test (tests/test_cuda.py) from stalling the suite."""
    import time

    from ranks import run_ranks

    marker = tmp_path / "rank1_waiting"
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="not done after 20 s"):
        run_ranks(_hang_in_a_receive, 2, tmp_path / "ranks", str(marker), timeout=20)
    assert marker.exists()  # the timeout ended a rank blocked in a receive, not a slow start
    assert time.monotonic() - start < 60


def _torchrun_worker(
    rank, world_size, port, out_dir, restart_count, start_delays_s, connect_timeout_s, reduce_delays_s
):
    """A worker of a torchrun group after ``restart_count`` restarts, a client of the agent's store at ``port``: it
    starts ``start_delays_s[rank]`` late, joins, waits ``reduce_delays_s[rank]``, all-reduces rank + 1, writes the
    sum and ends without a goodbye to its peers, as a killed worker does."""
    import torch

    env = {
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "TORCHELASTIC_RESTART_COUNT": str(restart_count),
        "TORCHELASTIC_USE_AGENT_STORE": "True",
    }
    os.environ.update(env)  # torch reads TORCHELASTIC_USE_AGENT_STORE from the process environment
    time.sleep(start_delays_s[rank])
    init_process_group(DistInfo.from_env(env, cuda_available=False), env, connect_timeout_s=connect_timeout_s)
    time.sleep(reduce_delays_s[rank])
    total = torch.tensor([rank + 1])
    torch.distributed.all_reduce(total)
    (out_dir / f"restart{restart_count}_rank{rank}.txt").write_text(str(total.item()))
    torch.distributed.barrier()


def _run_torchrun_workers(
    out_dir: Path, port: int, restart_count: int, start_delays_s=(0, 0), connect_timeout_s=60.0, reduce_delays_s=(0, 0)
) -> list[str]:
    """Two ``_torchrun_worker`` processes; what each rank's all-reduce gave. A worker's error fails the test, and so
    does a group still not done after two minutes.

    Forked, not spawned: torch is imported already (a spawned worker takes 5-10 s to import it again), and the
    workers run no OpenMP region, the one thing a fork after torch's start would break."""
    import torch.multiprocessing as mp

    args = (2, port, out_dir, restart_count, start_delays_s, connect_timeout_s, reduce_delays_s)
    context = mp.start_processes(_torchrun_worker, args=args, nprocs=2, join=False, start_method="fork")
    deadline = time.monotonic() + 120
    while not context.join(max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in context.processes:
                process.kill()
            raise AssertionError(f"restart {restart_count}: the workers were not done after 120 s")
    return [(out_dir / f"restart{restart_count}_rank{rank}.txt").read_text() for rank in range(2)]


def test_a_restarted_group_never_reads_the_previous_attempts_addresses(tmp_path):
    """torchrun's agent serves one store for the whole job. A restarted rank that arrives before its peer must wait
    for the new peer, not connect to the address the killed one left in the store (gloo: "connectFullMesh failed
    ... Connection refused", or a connect that never completes): every attempt writes under names of its own."""
    from torch.distributed import TCPStore

    agent_store = TCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False
    )  # outlives the workers, as torchrun's
    assert _run_torchrun_workers(tmp_path, agent_store.port, 0) == ["3", "3"]
    first = set(agent_store.list_keys())
    seen = set(first)
    # each restart: one rank starts 3 s late, while the store still holds the address of the one that is gone
    for restart_count, start_delays_s in ((1, (0, 3)), (2, (3, 0))):
        assert _run_torchrun_workers(tmp_path, agent_store.port, restart_count, start_delays_s) == ["3", "3"]
        keys = set(agent_store.list_keys())
        assert len(keys - seen) == len(first), (restart_count, sorted(keys))  # none of its names written before
        seen = keys


def test_the_connect_timeout_does_not_shorten_a_collective(tmp_path):
    """Joining gives up after connect_timeout_s; a collective still waits up to timeout_s (here for rank 0, 8 s late,
    as the other ranks wait for an evaluation or a checkpoint)."""
    from torch.distributed import TCPStore

    agent_store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    reduced = _run_torchrun_workers(tmp_path, agent_store.port, 0, connect_timeout_s=3, reduce_delays_s=(8, 0))
    assert reduced == ["3", "3"]


def test_a_rank_whose_peer_never_comes_fails_within_the_connect_timeout(monkeypatch):
    """Rank 0 of 2 with no rank 1: gloo's connect ends with one error naming the address, not a wait without end."""
    import torch
    from torch.distributed import TCPStore

    agent_store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    env = {**TORCHRUN, "RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(agent_store.port)}
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(name, env[name])
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    start = time.monotonic()
    with pytest.raises(ConnectionError) as error:
        init_process_group(DistInfo.from_env(env, cuda_available=False), env, timeout_s=1800, connect_timeout_s=3)
    assert time.monotonic() - start < 30
    message = str(error.value)
    assert message.startswith(
        f"rank 0 of 2 could not join the process group at tcp://127.0.0.1:{agent_store.port} "
        "(restart 0, connect timeout 3 s): "
    ), message
    assert "\n" not in message and not torch.distributed.is_initialized()


def _join_that_never_returns(log_path):
    import logging

    import torch

    from clipforge import distributed

    logging.getLogger("clipforge.distributed").addHandler(logging.FileHandler(log_path))
    distributed.JOIN_GRACE_S = 1.0
    distributed.dist.rendezvous = lambda *args, **kwargs: iter([(torch.distributed.Store(), 0, 2)])
    distributed.dist.init_process_group = lambda **kwargs: time.sleep(120)  # as gloo's connect to a stale address
    env = {**TORCHRUN, "RANK": "0", "WORLD_SIZE": "2"}
    distributed.init_process_group(DistInfo.from_env(env, cuda_available=False), env, connect_timeout_s=1)


def test_a_rank_still_joining_past_the_connect_timeout_ends_itself(tmp_path):
    """gloo's connect to an address that went stale waits in C++ past its own timeout: the rank ends itself, in one
    line, JOIN_GRACE_S after the connect timeout."""
    import multiprocessing

    process = multiprocessing.get_context("fork").Process(target=_join_that_never_returns, args=(tmp_path / "log",))
    start = time.monotonic()
    process.start()
    process.join(60)
    if process.is_alive():
        process.kill()
        raise AssertionError("still joining after 60 s")
    assert process.exitcode == 1 and time.monotonic() - start < 30
    assert (tmp_path / "log").read_text() == (
        "rank 0 of 2 still joining the process group at tcp://node0:29500 (restart 0) after 2 s, past its connect "
        "timeout of 1 s: exiting\n"
    )
