"""One device mesh per run: every component that talks to the other ranks uses the mesh ``build_run`` made.

On 2 gloo ranks the run's mesh (``clipforge.distributed.build_mesh``) is replaced by one over a process group of its
own, over the same ranks, made for the test. Every rank then builds a real run (``build_run``: the tiny ViT, the
synthetic shards, the configured objectives) under DDP with the negative queue, and under FSDP2 with the CLIP loss,
and takes one training step the way the loop does (a batch from the loader, the step, the per-step agreement), then
checkpoints it and reads the checkpoint back. Each gloo group counts the collectives that went through it (its
sequence number): all of them went through the mesh's group and none through the default group, which is what
every component would fall back to. The run's parts also hold that very mesh or its group: the FSDP2 parameters'
``device_mesh``, DDP's process group, the objectives' and the agreement's group.
"""

from __future__ import annotations

import pytest
from ranks import run_ranks

from clipforge.distributed import DistInfo, build_mesh

CASES = {
    "ddp_queue": ["parallel.strategy=ddp", "loss.queue_size=16"],
    "fsdp_clip": ["parallel.strategy=fsdp"],
}


def _collectives(group) -> int:
    """How many collectives ``group`` has run on this rank (gloo numbers each one)."""
    return group._get_sequence_number_for_group()


def _one_step(run, dist_info: DistInfo) -> None:
    """A step as the loop takes it (batch, step, agreement), then a checkpoint of it, read back."""
    from clipforge.train.loop import prepare_batch

    batch = prepare_batch(next(run.loader), run.loader.transform, dist_info.device, False, False)
    run.step_fn(batch)
    run.agree(True, True)  # the loop's per-step agreement (no stop, no numerics abort)
    saved = run.checkpointer.save(1, run.pieces, "train: {}\n")
    run.checkpointer.wait()
    run.checkpointer.load(saved, run.pieces)


def _losses(objectives) -> list:
    """The loss modules and queues the objectives hold (``.group``: the process group of their collectives)."""
    found = []
    for member in objectives.members:
        for holder in (member, getattr(member, "loss", None), getattr(member, "queue", None)):
            if holder is not None and hasattr(holder, "group"):
                found.append(holder)
    return found


def _build_and_step(rank: int, world_size: int, data: str, model_json: str, out: str) -> dict:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor

    from clipforge.losses import ObjectiveContext
    from clipforge.train import build
    from clipforge.train.config import load_config

    dist_info = DistInfo(rank=rank, world_size=world_size, local_world_size=world_size)
    standard = build_mesh(dist_info)
    results: dict = {
        "standard": (
            standard.device_type,
            standard.mesh_dim_names,
            dist.get_process_group_ranks(standard.get_group()),
            standard.get_local_rank(),
        )
    }
    try:  # an objective told another place than the one it has in the mesh
        ObjectiveContext(rank=world_size - 1 - rank, world_size=world_size, mesh=standard)
        results["misplaced_context"] = "accepted"
    except ValueError as error:
        results["misplaced_context"] = str(error)
    for name, overrides in CASES.items():
        own_group = dist.new_group(list(range(world_size)))  # the same ranks, another group
        mesh = DeviceMesh.from_group(own_group, "cpu", mesh_dim_names=("dp",))
        cfg = load_config(
            None,
            [
                f"data.train_urls={data}/train/{{00000..00005}}.tar",
                "data.num_workers=0",
                "data.batch_size=4",
                f"model.name={model_json}",
                f"train.output_dir={out}/{name}",
                "train.steps=2",
                *overrides,
            ],
        )
        torch.manual_seed(rank)
        default_before = _collectives(dist.group.WORLD)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(build, "build_mesh", lambda info, mesh=mesh: mesh)
            run = build.build_run(cfg, dist_info, lambda: False)
        mesh_before = _collectives(own_group)
        _one_step(run, dist_info)
        group = mesh.get_group()
        parameters = list(run.model.parameters())
        results[name] = {
            "run_mesh": run.mesh is mesh,
            "own_group": group is own_group and group is not dist.group.WORLD,
            "sharded_on_mesh": [p.device_mesh is mesh for p in parameters if isinstance(p, DTensor)],
            "ddp_group": getattr(run.model, "process_group", group) is group,
            "loss_groups": [holder.group is group for holder in _losses(run.step_fn.objectives)],
            "agreement_group": run.agree.group is group,
            "mesh_collectives": _collectives(own_group) - mesh_before,
            "default_collectives": _collectives(dist.group.WORLD) - default_before,
        }
        run.loader.close()
    return results


@pytest.fixture(scope="module")
def ranks(synth_data, tiny_model_json, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("mesh")
    return run_ranks(_build_and_step, 2, out / "ranks", str(synth_data), tiny_model_json, str(out), timeout=300)


def test_the_run_mesh_is_one_data_parallel_dimension_over_every_rank(ranks):
    for rank, result in enumerate(ranks):
        assert result["standard"] == ("cpu", ("dp",), [0, 1], rank)
        misplaced = f"rank {1 - rank} of 2 is not this process's place in its mesh (rank {rank} of 2)"
        assert misplaced in result["misplaced_context"]
    assert build_mesh(DistInfo()) is None  # one process: no process group, no mesh


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_component_uses_the_run_mesh(ranks, case):
    for result in ranks:
        found = result[case]
        assert found["run_mesh"] and found["own_group"]
        assert found["agreement_group"] and found["ddp_group"]
        assert found["loss_groups"] and all(found["loss_groups"]), found["loss_groups"]
        if case.startswith("fsdp"):
            assert found["sharded_on_mesh"] and all(found["sharded_on_mesh"])
        else:
            assert not found["sharded_on_mesh"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_step_talks_only_through_the_mesh_group(ranks, case):
    for result in ranks:
        found = result[case]
        assert found["mesh_collectives"] > 0
        assert found["default_collectives"] == 0
