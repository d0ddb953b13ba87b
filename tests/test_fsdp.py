"""FSDP2 (``parallel.strategy`` fsdp) trains exactly as DDP does, on 2 and 4 gloo processes.

Every rank builds the tiny ViT from its own seed (as the loop seeds ranks differently), takes its slice of a fixed
global batch and runs the real step strategy (build_step, build_loss, build_optimizer, build_scheduler) for three
optimizer steps, once under DDP and once under FSDP2, in the same process group. The loss of every rank at every
step, every parameter's full gradient after the last step (DTensor.full_tensor()) and every weight after it are
compared, to 1e-5 relative. All cases of one world size run in one spawn (starting gloo processes costs more than
training the tiny model); the tests read their results.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import pytest
import torch
from conftest import TINY_MODEL
from ranks import run_ranks
from torch.distributed.tensor import DTensor, Shard, distribute_tensor, init_device_mesh

from clipforge.distributed import DistInfo
from clipforge.losses import LossConfig, build_loss, clamp_logit_scale
from clipforge.models import ModelConfig, build_model
from clipforge.train.optim import OptimConfig, build_optimizer, build_scheduler
from clipforge.train.parallel import apply_training_options, parallelize, residual_blocks, unwrap
from clipforge.train.step import build_step

GLOBAL_BATCH = 8
NUM_STEPS = 3
END_OF_TEXT = 49407
SIGLIP_MODEL = {"init_logit_scale": math.log(10.0), "init_logit_bias": -10.0}


@dataclass
class Case:
    model: dict = field(default_factory=dict)
    loss: dict = field(default_factory=dict)
    optim: dict = field(default_factory=dict)
    accum_steps: int = 1
    nan_at_step: int | None = None  # this step's batch has a NaN image


CASES_2 = {
    "clip": Case(),
    "siglip": Case(model=SIGLIP_MODEL, loss={"kind": "siglip"}),
    "grad_clip": Case(optim={"grad_clip_norm": 0.05}),
    "lock_image": Case(model={"lock_image": True}),
    "grad_checkpointing": Case(model={"grad_checkpointing": True}),
    "gradcache": Case(accum_steps=2),
    "tiled": Case(loss={"tile_size": 2}),
    "siglip_ring": Case(model=SIGLIP_MODEL, loss={"kind": "siglip", "siglip_exchange": "ring"}),
    "patch_dropout": Case(model={"patch_dropout": 0.5}),
    "nonfinite": Case(nan_at_step=1),
}
CASES_4 = {"clip": Case(), "siglip": Case(model=SIGLIP_MODEL, loss={"kind": "siglip"})}


def global_batch(step: int) -> dict[str, torch.Tensor]:
    """Images (GLOBAL_BATCH, 3, 32, 32) and tokens (GLOBAL_BATCH, 24) ending in end-of-text, fixed per step."""
    generator = torch.Generator().manual_seed(100 + step)
    images = torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=generator)
    length = TINY_MODEL["text_cfg"]["context_length"]
    texts = torch.randint(1, END_OF_TEXT - 1, (GLOBAL_BATCH, length), generator=generator)
    texts[:, -1] = END_OF_TEXT
    return {"images": images, "texts": texts}


def full(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().clone()


def train(rank: int, world_size: int, case: Case, strategy: str, model_path: str) -> dict:
    """NUM_STEPS steps of the real step strategy under ``strategy``; per-step metrics of this rank, and (full) the
    gradients after the last step and the weights before and after training."""
    torch.manual_seed(rank)  # ranks start different, as in the loop; both strategies take rank 0's weights
    model_cfg = ModelConfig(name=model_path, **case.model)
    model = build_model(model_cfg).model
    apply_training_options(model, model_cfg)  # the locks and checkpointing, as the trainer's preparation does
    info = DistInfo(rank=rank, world_size=world_size, local_world_size=world_size)
    model = parallelize(model, info, strategy=strategy)
    core = unwrap(model)
    optim_cfg = OptimConfig(**{"lr": 1e-3, "warmup_steps": 1, "grad_clip_norm": None, **case.optim})
    optimizer = build_optimizer(optim_cfg, core)
    loss_cfg = LossConfig(**case.loss)
    step = build_step(
        model,
        build_loss(loss_cfg, rank, world_size),
        optimizer,
        build_scheduler(optim_cfg, optimizer, 10),
        device="cpu",
        precision="fp32",
        grad_clip_norm=optim_cfg.grad_clip_norm,
        max_logit_scale=loss_cfg.max_logit_scale,
        accum_steps=case.accum_steps,
    )
    initial = {name: full(p) for name, p in core.named_parameters()}
    local = slice(rank * GLOBAL_BATCH // world_size, (rank + 1) * GLOBAL_BATCH // world_size)
    metrics = {"loss": [], "grad_norm": [], "nonfinite": [], "unchanged": []}
    for index in range(NUM_STEPS):
        batch = {key: value[local] for key, value in global_batch(index).items()}
        if index == case.nan_at_step:
            batch["images"][0, 0, 0, 0] = float("nan")
        before = {name: full(p) for name, p in core.named_parameters()}
        torch.manual_seed(1000 * index + rank)  # the same draws (patch dropout) in both runs
        out = step(batch)
        metrics["loss"].append(out["loss"].item())
        metrics["grad_norm"].append(out["grad_norm"].item())
        metrics["nonfinite"].append(out["nonfinite"])
        metrics["unchanged"].append(all(torch.equal(full(p), before[n]) for n, p in core.named_parameters()))
    grads = {name: full(p.grad) for name, p in core.named_parameters() if p.grad is not None}
    weights = {name: full(p) for name, p in core.named_parameters()}
    types = {name: type(p).__name__ for name, p in core.named_parameters()}
    return {**metrics, "grads": grads, "weights": weights, "initial": initial, "types": types}


def worker(rank: int, world_size: int, cases: dict[str, Case], model_path: str) -> dict:
    return {
        name: {strategy: train(rank, world_size, case, strategy, model_path) for strategy in ("ddp", "fsdp")}
        for name, case in cases.items()
    }


def run_cases(world_size: int, cases: dict[str, Case], tmp_path_factory) -> list[dict]:
    path = tmp_path_factory.mktemp("fsdp-model") / "fsdp-tiny.json"
    path.write_text(json.dumps(TINY_MODEL))
    return run_ranks(worker, world_size, tmp_path_factory.mktemp(f"fsdp{world_size}"), cases, str(path), timeout=600)


@pytest.fixture(scope="module")
def results_2(tmp_path_factory) -> list[dict]:
    return run_cases(2, CASES_2, tmp_path_factory)


@pytest.fixture(scope="module")
def results_4(tmp_path_factory) -> list[dict]:
    return run_cases(4, CASES_4, tmp_path_factory)


def relative_difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def largest_difference(actual: dict, expected: dict) -> float:
    """The largest norm-wise relative difference over the tensors, for the record."""
    return max(relative_difference(actual[name], reference) for name, reference in expected.items())


def largest_elementwise(actual: dict, expected: dict) -> float:
    return max((actual[name] - reference).abs().max().item() for name, reference in expected.items())


def assert_same(actual: dict, expected: dict, what: str, atol: float | None = None) -> None:
    """Tensor by tensor to 1e-5 relative, with ``atol`` (default: 1e-5 of the tensor's largest entry)."""
    assert actual.keys() == expected.keys(), what
    for name, reference in expected.items():
        tolerance = 1e-5 * reference.abs().max().item() + 1e-12 if atol is None else atol
        torch.testing.assert_close(
            actual[name],
            reference,
            rtol=1e-5,
            atol=tolerance,
            msg=lambda message, name=name: f"{what} {name}: {message}",
        )


def without_key_bias(result: dict, reference: dict) -> dict[str, torch.Tensor]:
    """``result``'s weights with the attention key biases taken from ``reference``, after checking that their
    gradients are rounding noise in both: softmax ignores a shift shared by all keys, so the key bias has zero
    gradient in exact arithmetic, and AdamW (noise / (|noise| + eps)) turns whatever the reduction order leaves
    into an update of its own; at 4 ranks the reduce-scatter and the all-reduce sum in different orders."""
    weights = dict(result["weights"])
    for name in weights:
        if name.endswith("attn.in_proj_bias") and name in result["grads"]:  # a frozen one stays as it was
            width = weights[name].shape[0] // 3  # (3 · width,): query, key, value biases
            for run in (result, reference):
                key_grad, grad = run["grads"][name][width : 2 * width], run["grads"][name]
                assert key_grad.abs().max() <= 1e-5 * grad.abs().max(), f"{name}: key bias with a real gradient"
            weights[name] = torch.cat(
                [weights[name][:width], reference["weights"][name][width : 2 * width], weights[name][2 * width :]]
            )
    return weights


def assert_fsdp_equals_ddp(results: list[dict], name: str) -> None:
    for rank_results in results:
        ddp, fsdp = rank_results[name]["ddp"], rank_results[name]["fsdp"]
        torch.testing.assert_close(
            torch.tensor(fsdp["loss"]), torch.tensor(ddp["loss"]), rtol=1e-5, atol=1e-7, equal_nan=True
        )
        torch.testing.assert_close(
            torch.tensor(fsdp["grad_norm"]), torch.tensor(ddp["grad_norm"]), rtol=1e-5, atol=1e-7, equal_nan=True
        )
        assert fsdp["nonfinite"] == ddp["nonfinite"]
        # replicated (the 0-dim scalars) and sharded tensors alike: every rank holds the same weights
        assert_same(fsdp["weights"], results[0][name]["fsdp"]["weights"], f"{name} weights across ranks")
    ddp, fsdp = results[0][name]["ddp"], results[0][name]["fsdp"]
    assert_same(fsdp["initial"], ddp["initial"], f"{name} initial weights")
    weights = without_key_bias(fsdp, ddp)
    grad_difference, weight_difference = (
        largest_difference(fsdp["grads"], ddp["grads"]),
        largest_difference(weights, ddp["weights"]),
    )
    print(
        f"{name}: largest relative difference gradients {grad_difference:.2e}, weights {weight_difference:.2e}, "
        f"weights elementwise {largest_elementwise(weights, ddp['weights']):.2e}"
    )
    assert_same(fsdp["grads"], ddp["grads"], f"{name} gradients")
    assert weight_difference <= 1e-5, f"{name} weights"
    # element by element: AdamW divides by sqrt(v) + eps, so an entry whose gradients are near eps (a rare token's
    # embedding, a clipped gradient) turns the last bits of a differently ordered sum into a visible share of its
    # update; 1e-4 is a tenth of one step at lr 1e-3 (a lost, doubled or sign-flipped update is ten times that)
    assert_same(weights, ddp["weights"], f"{name} weights", atol=1e-4)


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_fsdp_equals_ddp_on_2_ranks(results_2, name):
    assert_fsdp_equals_ddp(results_2, name)
    fsdp = results_2[0][name]["fsdp"]
    assert fsdp["types"]["visual.transformer.resblocks.0.attn.in_proj_weight"] == "DTensor"  # really sharded
    assert fsdp["types"]["logit_scale"] == "Parameter"  # replicated, outside FSDP
    assert all(not unchanged for unchanged in fsdp["unchanged"])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_fsdp_equals_ddp_on_4_ranks(results_4, name):
    assert_fsdp_equals_ddp(results_4, name)


@pytest.mark.parametrize(
    "name",
    [
        "grad_clip",
        "lock_image",
        "grad_checkpointing",
        "gradcache",
        "tiled",
        "siglip_ring",
        "patch_dropout",
        "nonfinite",
    ],
)
def test_fsdp_option_equals_ddp(results_2, name):
    assert_fsdp_equals_ddp(results_2, name)


def test_clipping_clips_to_the_full_gradient_norm(results_2):
    """The clip norm is below every step's norm, so every step was clipped; the norm compared with DDP's above is
    the whole gradient's, not one shard's."""
    fsdp = results_2[0]["grad_clip"]["fsdp"]
    assert min(fsdp["grad_norm"]) > 0.05
    clipped = torch.linalg.vector_norm(torch.cat([grad.flatten() for grad in fsdp["grads"].values()]))
    torch.testing.assert_close(clipped, torch.tensor(0.05), rtol=1e-4, atol=0)


def test_locked_tower_stays_frozen(results_2):
    fsdp = results_2[0]["lock_image"]["fsdp"]
    frozen = [name for name in fsdp["weights"] if name.startswith("visual.")]
    assert frozen and not any(name in fsdp["grads"] for name in frozen)
    for name in frozen:
        assert torch.equal(fsdp["weights"][name], fsdp["initial"][name]), name


def test_nonfinite_batch_changes_no_weight(results_2):
    for strategy in ("ddp", "fsdp"):
        result = results_2[0]["nonfinite"][strategy]
        assert result["nonfinite"] == [False, True, False]
        assert result["unchanged"] == [False, True, False]


def test_residual_blocks_of_each_tower_kind(tiny_model_json, tiny_resnet_json):
    vit = build_model(ModelConfig(name=tiny_model_json)).model
    assert residual_blocks(vit) == [*vit.visual.transformer.resblocks, *vit.transformer.resblocks]
    resnet = build_model(ModelConfig(name=tiny_resnet_json)).model
    stages = [resnet.visual.layer1, resnet.visual.layer2, resnet.visual.layer3, resnet.visual.layer4]
    assert residual_blocks(resnet) == [*stages, *resnet.transformer.resblocks]


def test_single_process_fsdp_only_moves_the_model(tiny_model_json):
    model = build_model(ModelConfig(name=tiny_model_json)).model
    assert parallelize(model, DistInfo(), strategy="fsdp") is model
    with pytest.raises(ValueError, match="parallel.strategy"):
        parallelize(model, DistInfo(), strategy="zero3")


def clamp_dtensor(rank: int, world_size: int) -> torch.Tensor:
    mesh = init_device_mesh("cpu", (world_size,))
    log_scale = torch.nn.Parameter(distribute_tensor(torch.tensor([5.0, -1.0, 1.0, 6.0]), mesh, [Shard(0)]))
    clamp_logit_scale(log_scale, 100.0)
    return log_scale.full_tensor()


def test_clamp_logit_scale_on_a_sharded_parameter(tmp_path):
    """clamp_logit_scale works in place on a DTensor parameter too (were the temperature ever sharded)."""
    for clamped in run_ranks(clamp_dtensor, 2, tmp_path):
        torch.testing.assert_close(clamped, torch.tensor([math.log(100.0), 0.0, 1.0, math.log(100.0)]))


def _mixed_precision_dtypes(rank, world_size, model_path):
    model = build_model(ModelConfig(name=model_path)).model
    info = DistInfo(rank=rank, world_size=world_size, local_world_size=world_size)
    model = parallelize(model, info, strategy="fsdp", mixed_precision=torch.bfloat16)
    block = model.visual.transformer.resblocks[0]
    seen = []
    block.register_forward_pre_hook(lambda module, args: seen.append(next(module.parameters()).dtype))
    images, texts = torch.randn(2, 3, 32, 32), torch.randint(1, 1000, (2, 24))
    texts[:, -1] = 49407
    out = model(images, texts)
    (out["image_features"].float().sum() + out["text_features"].float().sum()).backward()
    parameter = next(block.parameters())
    return {"in_forward": seen[0], "at_rest": parameter.to_local().dtype, "gradient": parameter.grad.to_local().dtype}


def test_bf16_runs_keep_bf16_parameters_in_compute_and_fp32_shards_and_reductions(tmp_path, tiny_model_json):
    """train.precision=bf16 under fsdp: MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)."""
    for dtypes in run_ranks(_mixed_precision_dtypes, 2, tmp_path / "ranks", tiny_model_json):
        assert dtypes == {"in_forward": torch.bfloat16, "at_rest": torch.float32, "gradient": torch.float32}, dtypes
