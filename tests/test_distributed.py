"""``DistInfo.from_env``: the process group's shape and backend come from whichever launcher's environment is there."""

from __future__ import annotations

import pytest

from clipforge.distributed import DistInfo, init_process_group

TORCHRUN = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "node0",
            "MASTER_PORT": "29500"}
SRUN = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "4"}


@pytest.mark.parametrize("env, cuda, expected", [
    ({}, True, DistInfo(0, 0, 1, 1, "cuda:0", "nccl")),
    ({}, False, DistInfo(0, 0, 1, 1, "cpu", "gloo")),
    (TORCHRUN, True, DistInfo(5, 1, 8, 4, "cuda:1", "nccl")),
    (TORCHRUN, False, DistInfo(5, 1, 8, 4, "cpu", "gloo")),
    ({**TORCHRUN, "ACCELERATE_USE_CPU": "true"}, True, DistInfo(5, 1, 8, 4, "cpu", "gloo")),  # accelerate on CPU
    (SRUN, True, DistInfo(5, 1, 8, 4, "cuda:1", "nccl")),
    ({**SRUN, "SLURM_NTASKS_PER_NODE": "4(x2)"}, True, DistInfo(5, 1, 8, 4, "cuda:1", "nccl")),  # SLURM's repeat form
    # a torchrun inside an sbatch job: torchrun's variables win over the job's
    ({**SRUN, "SLURM_NTASKS": "2", "SLURM_PROCID": "0", **TORCHRUN}, True, DistInfo(5, 1, 8, 4, "cuda:1", "nccl")),
    # a single-task SLURM job (one task per node running torchrun or python): one process
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, False, DistInfo(0, 0, 1, 1, "cpu", "gloo")),
])
def test_from_env(env, cuda, expected):
    assert DistInfo.from_env(env, cuda_available=cuda) == expected


def test_several_processes_need_a_rendezvous_address():
    with pytest.raises(ValueError, match="MASTER_ADDR and MASTER_PORT"):
        init_process_group(DistInfo.from_env(SRUN, cuda_available=False), SRUN)
