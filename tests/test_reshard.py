"""A checkpoint written at N ranks resumes at M ranks, under DDP and under FSDP2 (gloo): after the load every
weight and every AdamW moment (whole, gathered from the shards) equals the checkpoint's, read back here.

Each world size runs in one spawn (one rank: in this process) that loads the checkpoints the other sizes wrote,
then trains one step of its own (seeded by rank, so its weights differ from any checkpoint's) and writes its
checkpoint; at 2 ranks, DDP and FSDP also load each other's. 2 → 1 and 1 → 2 run by default; 2 → 4 and 4 → 2
are ``slow`` (four gloo processes).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from checkpointing import dcp_contents
from conftest import TINY_MODEL
from ranks import run_ranks
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
from torch.distributed.tensor import DTensor

from clipforge.checkpoints import has_dcp_weights
from clipforge.distributed import DistInfo
from clipforge.losses import LossConfig, build_loss
from clipforge.models import ModelConfig, build_model
from clipforge.train.checkpoint import Checkpointer
from clipforge.train.optim import OptimConfig, build_optimizer, build_scheduler
from clipforge.train.parallel import parallelize, unwrap
from clipforge.train.state import TrainState, restart_state
from clipforge.train.step import build_step

STRATEGIES = ("ddp", "fsdp")
GLOBAL_BATCH = 4
END_OF_TEXT = 49407


class Position:
    """Stands for the data position: every rank's own, loaded from whichever ranks wrote one."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dicts(self, states: list[dict]) -> None:
        pass


def build(rank: int, world_size: int, strategy: str, model_json: str):
    torch.manual_seed(1 + rank)
    info = DistInfo(rank=rank, world_size=world_size, local_world_size=world_size)
    model = parallelize(build_model(ModelConfig(name=model_json)).model, info, strategy)
    cfg = OptimConfig(lr=1e-3, warmup_steps=1)
    optimizer = build_optimizer(cfg, unwrap(model))
    scheduler = build_scheduler(cfg, optimizer, 10)
    pieces = restart_state(
        model,
        optimizer,
        scheduler,
        optim_cfg=cfg,
        total_steps=10,
        train=TrainState(),
        loader=Position(),
        device="cpu",
        rank=rank,
    )
    return model, optimizer, scheduler, pieces


def train_one_step(model, optimizer, scheduler, rank: int, world_size: int) -> None:
    generator = torch.Generator().manual_seed(7)
    images = torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=generator)
    texts = torch.randint(
        1, END_OF_TEXT - 1, (GLOBAL_BATCH, TINY_MODEL["text_cfg"]["context_length"]), generator=generator
    )
    texts[:, -1] = END_OF_TEXT
    local = slice(rank * GLOBAL_BATCH // world_size, (rank + 1) * GLOBAL_BATCH // world_size)
    loss = build_loss(LossConfig(), rank, world_size)
    step = build_step(
        model,
        loss,
        optimizer,
        scheduler,
        device="cpu",
        precision="fp32",
        grad_clip_norm=1.0,
        max_logit_scale=100.0,
        accum_steps=1,
    )
    step({"images": images[local], "texts": texts[local]})


def whole(model, optimizer) -> dict[str, torch.Tensor]:
    """Weights and AdamW moments as whole tensors, keyed as in the checkpoint (``model.NAME``,
    ``optimizer.state.NAME.exp_avg``)."""
    out = {}
    for name, parameter in unwrap(model).named_parameters():
        value = parameter.full_tensor() if isinstance(parameter, DTensor) else parameter
        out[f"model.{name}"] = value.detach().clone()
    state = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
    for name, entry in state["state"].items():
        for key, value in entry.items():
            out[f"optimizer.state.{name}.{key}"] = value.detach().clone()
    return out


def phase(rank: int, world_size: int, root: str, written_at: list[int], save: bool, model_json: str) -> dict:
    """Load the checkpoints written at ``written_at`` ranks (each strategy); then, with ``save``, write this size's."""
    loaded = {}
    for strategy in STRATEGIES:
        for size in written_at:
            model, optimizer, _, pieces = build(rank, world_size, strategy, model_json)
            path = Path(root) / strategy / f"ranks{size}" / "step_00000001"
            Checkpointer(path.parent, rank=rank).load(path, pieces)
            loaded[(strategy, size)] = whole(model, optimizer)
        if save:
            model, optimizer, scheduler, pieces = build(rank, world_size, strategy, model_json)
            train_one_step(model, optimizer, scheduler, rank, world_size)
            Checkpointer(Path(root) / strategy / f"ranks{world_size}", rank=rank).save(1, pieces, "train: {}\n")
    if save and world_size > 1:  # ddp ↔ fsdp at this world size: each loads the checkpoint the other just wrote
        for strategy, other in zip(STRATEGIES, reversed(STRATEGIES)):
            model, optimizer, _, pieces = build(rank, world_size, strategy, model_json)
            path = Path(root) / other / f"ranks{world_size}" / "step_00000001"
            Checkpointer(path.parent, rank=rank).load(path, pieces)
            loaded[(f"{other}→{strategy}", world_size)] = whole(model, optimizer)
    return loaded if rank == 0 else {}


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's weights and moments, whole, read in this process by torch.distributed.checkpoint itself."""
    saved = dcp_contents(path)
    out = {f"model.{name}": tensor for name, tensor in saved["model"].items()}
    moments = saved["optimizer"]["state"].items()
    out.update({f"optimizer.state.{n}.{k}": v for n, entry in moments for k, v in entry.items()})
    return out


def assert_resumed_exactly(
    loaded: dict, root: Path, strategy: str, written_at: int, loaded_as: str = "", path: Path | None = None
) -> None:
    """The weights and moments ``loaded`` from ``strategy``'s checkpoint at ``written_at`` ranks (into the same
    strategy, or into ``loaded_as``) equal the checkpoint's (at ``path``, if not the usual place)."""
    expected = read_checkpoint(path or root / strategy / f"ranks{written_at}" / "step_00000001")
    got = loaded[(f"{strategy}→{loaded_as}" if loaded_as else strategy, written_at)]
    assert got.keys() == expected.keys(), sorted(set(got) ^ set(expected))[:5]
    assert any(".exp_avg_sq" in key for key in got)
    different = [key for key in got if not torch.equal(got[key].reshape(expected[key].shape), expected[key])]
    assert not different, f"{strategy} {written_at} ranks: {different[:5]}"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("reshard")


@pytest.fixture(scope="module")
def small_sizes(root, tiny_model_json) -> dict:
    """1 rank (this process: no process group, as in training) writes; 2 ranks load it and write theirs; 1 rank
    loads theirs."""
    phase(0, 1, str(root), [], True, tiny_model_json)
    from_one = run_ranks(phase, 2, root / "out2", str(root), [1], True, tiny_model_json, timeout=300)[0]
    from_two = phase(0, 1, str(root), [2], False, tiny_model_json)
    return {**from_one, **from_two}


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("written_at", [2, 1], ids=["2to1", "1to2"])
def test_model_and_optimizer_resume_on_another_world_size(small_sizes, root, strategy, written_at):
    assert_resumed_exactly(small_sizes, root, strategy, written_at)


@pytest.mark.parametrize("written_by, loaded_as", [("ddp", "fsdp"), ("fsdp", "ddp")], ids=["ddp2fsdp", "fsdp2ddp"])
def test_ddp_and_fsdp_load_each_others_checkpoint_at_the_same_world_size(small_sizes, root, written_by, loaded_as):
    """2 ranks: DDP's whole-tensor checkpoint into FSDP shards, FSDP's sharded one into DDP replicas."""
    assert_resumed_exactly(small_sizes, root, written_by, 2, loaded_as)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_to_four_and_four_to_two_ranks(small_sizes, root, strategy, tiny_model_json):
    from_two = run_ranks(phase, 4, root / "out4", str(root), [2], True, tiny_model_json, timeout=600)[0]
    from_four = run_ranks(phase, 2, root / "out2c", str(root), [4], False, tiny_model_json, timeout=600)[0]
    assert_resumed_exactly(from_two, root, strategy, 2)
    assert_resumed_exactly(from_four, root, strategy, 4)


def load_phase(rank: int, world_size: int, path: str, model_json: str) -> dict:
    """Load the checkpoint at ``path`` under each strategy; returns (rank 0) the whole state loaded, by strategy."""
    loaded = {}
    for strategy in STRATEGIES:
        model, optimizer, _, pieces = build(rank, world_size, strategy, model_json)
        Checkpointer(Path(path).parent, rank=rank).load(path, pieces)
        loaded[strategy] = whole(model, optimizer)
    return loaded if rank == 0 else {}


def test_a_single_file_checkpoint_resumes_under_ddp_and_fsdp(small_sizes, root, tiny_model_json):
    """The single-file layout (model.safetensors, the optimizer's whole tensors in state.pt), made from the one rank's
    DDP checkpoint, loads at 2 ranks into DDP replicas and into FSDP shards, equal to that checkpoint."""
    from checkpointing import as_older_layout

    single = root / "single-file" / "step_00000001"
    shutil.copytree(root / "ddp" / "ranks1" / "step_00000001", single)
    state = torch.load(single / "state.pt", weights_only=True)
    saved = dcp_contents(single)
    as_older_layout(single, saved["model"], {**state, "optimizer": saved["optimizer"]})
    loaded = run_ranks(load_phase, 2, root / "out-single", str(single), tiny_model_json, timeout=300)[0]
    for strategy in STRATEGIES:
        assert_resumed_exactly({("ddp", 1): loaded[strategy]}, root, "ddp", 1)


def async_phase(rank: int, world_size: int, root: str, model_json: str) -> dict:
    """FSDP at ``world_size`` ranks: one step, an asynchronous save, and the next step while the save is written;
    returns (rank 0) the weights and moments at the save and after the next step."""
    model, optimizer, scheduler, pieces = build(rank, world_size, "fsdp", model_json)
    train_one_step(model, optimizer, scheduler, rank, world_size)
    at_save = whole(model, optimizer)
    checkpointer = Checkpointer(Path(root), rank=rank, asynchronous=True)
    checkpointer.save(1, pieces, "train: {}\n")
    train_one_step(model, optimizer, scheduler, rank, world_size)
    after = whole(model, optimizer)
    checkpointer.wait()
    return {"at_save": at_save, "after": after} if rank == 0 else {}


def test_asynchronous_save_under_fsdp_writes_the_state_at_the_save(tmp_path, tiny_model_json):
    """checkpoint.async_save with FSDP at 2 ranks: the sharded checkpoint holds the weights and AdamW moments of the
    step it was taken at, although the next step changed them while the shards were being written."""
    states = run_ranks(async_phase, 2, tmp_path / "out", str(tmp_path / "run"), tiny_model_json, timeout=300)[0]
    final = tmp_path / "run" / "step_00000001"
    assert has_dcp_weights(final) and (tmp_path / "run" / "latest").resolve() == final
    assert_resumed_exactly({("fsdp", 2): states["at_save"]}, tmp_path, "fsdp", 2, path=final)
    changed = [key for key, value in states["after"].items() if not torch.equal(value, states["at_save"][key])]
    assert len(changed) > len(states["after"]) // 2  # the next step did move the state the checkpoint must not see
