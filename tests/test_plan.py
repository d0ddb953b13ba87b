"""``clipforge plan``: its arithmetic against hand counts on a tiny model, its memory against the peaks real steps
measure (bench/plan_check.py), and the command itself (torch-free --help and refusals, the plan as JSON)."""

import importlib
import json
import math
from pathlib import Path

import pytest

from clipforge.train.config import load_config

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.name=tiny-vit-64", "data.batch_size=8"]  # ViT: 64 px, 8 px patches, width 128; text context 32
BATCH, EMBED_DIM = 8, 128


def _plan_check(monkeypatch):
    """bench/plan_check.py as a module its spawned ranks can import too (they get this process's sys.path)."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    return importlib.import_module("plan_check")


@pytest.fixture(scope="module")
def tiny():
    """The tiny model built for real: the shapes the hand counts start from."""
    from clipforge.models import build_model

    model = build_model(load_config("configs/demo.yaml", TINY).model).model
    shapes = [parameter.shape for parameter in model.parameters()]
    buffers = sum(buffer.numel() * buffer.element_size() for buffer in model.buffers())
    return shapes, buffers


def _simulate(world_size: int, *overrides: str):
    from clipforge.train.memory import FakeRun

    cfg = load_config("configs/demo.yaml", [*TINY, *overrides])
    with FakeRun(cfg, world_size) as run:
        return run.step(BATCH), run.loss_step(BATCH)


def _sent(collectives, kind: str, phase: str | None = None) -> float:
    return sum(c.sent for c in collectives if c.kind == kind and (phase is None or c.phase == phase))


def test_ddp_parts_and_traffic_are_the_hand_counts(tiny):
    shapes, buffers = tiny
    numel = sum(math.prod(shape) for shape in shapes)
    world = 4
    step, loss = _simulate(world)
    assert step.peak == sum(step.parts.values())
    assert step.parts["parameters"] == 4 * numel + buffers  # fp32 weights and the buffers
    assert step.parts["optimizer_state"] == 8 * numel + 4 * len(shapes)  # two fp32 moments, a 0-dim step each
    assert step.parts["communication_buffers"] == 4 * numel  # DDP's gradient buckets: every parameter trains
    assert 0 < step.parts["gradients"] <= 4 * numel and step.parts["activations"] > 0
    # DDP's ring all-reduce sends 2 (N - 1)/N of the gradients
    assert _sent(step.collectives, "all_reduce") == pytest.approx(2 * 4 * numel * (world - 1) / world)
    # the loss gathers both towers' (B, D) fp32 features from every rank and reduce-scatters their gradients back
    gathered = 2 * world * BATCH * EMBED_DIM * 4
    assert _sent(loss.collectives, "all_gather", "loss") == gathered * (world - 1) / world
    assert _sent(loss.collectives, "reduce_scatter") == gathered * (world - 1) / world
    assert _sent(step.collectives, "all_gather", "loss") == gathered * (world - 1) / world


def test_fsdp_shards_parameters_state_and_traffic_by_hand(tiny):
    shapes, buffers = tiny
    world = 4
    # FSDP2 shards dim 0, padded to a multiple of the ranks; the 0-dim temperature stays whole on every rank
    shard = sum(math.ceil(shape[0] / world) * math.prod(shape[1:]) if len(shape) else 1 for shape in shapes)
    step, _ = _simulate(world, "parallel.strategy=fsdp")
    assert step.parts["parameters"] == 4 * shard + buffers
    assert step.parts["optimizer_state"] == 8 * shard + 4 * len(shapes)
    assert step.parts["communication_buffers"] > 0  # a block's gathered weights while it runs
    gathered = 4 * world * (shard - 1)  # fp32 (no mixed precision in an fp32 run); the scalar is not gathered
    expected = gathered * (world - 1) / world
    # gathered for the forward and again for the backward (parallel.reshard_after_forward), reduce-scattered once
    assert _sent(step.collectives, "all_gather", "forward") == pytest.approx(expected, rel=1e-3)
    assert _sent(step.collectives, "all_gather", "backward") == pytest.approx(expected, rel=1e-3)
    assert _sent(step.collectives, "reduce_scatter", "backward") == pytest.approx(expected, rel=2e-3)


def test_activations_grow_with_the_batch_and_checkpointing_keeps_fewer():
    from clipforge.train.memory import FakeRun

    cfg = load_config("configs/demo.yaml", TINY)
    with FakeRun(cfg, 1) as run:
        small, large = run.step(8), run.step(16)
        run.set_grad_checkpointing(True)
        checkpointed = run.step(16)
    # twice the samples, about twice the activations (the peak's moment moves a little with the batch)
    assert 1.8 < large.parts["activations"] / small.parts["activations"] < 2.2
    assert large.parts["parameters"] == small.parts["parameters"]
    assert checkpointed.parts["activations"] < large.parts["activations"] / 2


def test_largest_fitting_finds_the_largest_batch_under_the_budget():
    from clipforge.train.plan import largest_fitting

    calls = []

    def line(batch):
        calls.append(batch)
        return 1_000 + 10 * batch

    assert 396 <= largest_fitting(line, 5_000, {8: line(8)}, slope=10) <= 400  # 400 exactly fits
    assert len(calls) <= 3

    def parabola(batch):  # materialised logits: B_local × B_global grows with B_local²
        return 1_000 + 10 * batch + batch * batch

    found = largest_fitting(parabola, 50_000, {8: parabola(8)}, slope=10)
    exact = max(batch for batch in range(1, 1_000) if parabola(batch) <= 50_000)
    assert parabola(found) <= 50_000 and found >= 0.99 * exact
    assert largest_fitting(line, 500, {8: line(8)}, slope=10) == 0  # not one sample fits


def test_time_flops_and_bandwidth_arithmetic():
    from clipforge.train.flops import count_train_flops
    from clipforge.train.peak import GPU_PEAKS
    from clipforge.train.plan import GPUS, RESERVE, SLACK, plan_run, tensor_budget

    cfg = load_config("configs/demo.yaml", TINY)
    plan = plan_run(cfg, 4, "h100", mfu=0.5, largest=False)
    per_sample = count_train_flops(cfg.model, cfg.loss.learn_temperature, cfg.speed.pooled_last_block, loss=cfg.loss)
    assert plan.flops_per_step == BATCH * per_sample.train()
    peak = GPU_PEAKS["H100"]["tf32"]  # an fp32 run's matmuls in TF32 (train.tf32)
    assert plan.peak_tflops == peak
    assert plan.step_seconds == pytest.approx(BATCH * per_sample.train() / (0.5 * peak * 1e12))
    assert plan.run_seconds == pytest.approx(cfg.train.steps * plan.step_seconds)
    assert plan.bandwidth == GPUS["h100"].intra_node  # 4 GPUs: one node
    for transfer in plan.transfers:
        assert transfer.seconds == pytest.approx(transfer.sent / plan.bandwidth)
    assert {t.name.split(":")[0] for t in plan.transfers} >= {"loss", "DDP gradient all-reduce"}
    assert plan.budget == tensor_budget(GPUS["h100"].memory) == int((GPUS["h100"].memory - RESERVE) / (1 + SLACK))
    assert plan.fits and plan.largest_batch == {}
    assert plan_run(cfg, 16, "h100", largest=False).bandwidth == GPUS["h100"].inter_node  # two nodes
    # gradient checkpointing computes the towers' forward once more: the same MFU of more work takes longer
    forward = per_sample.image_forward + per_sample.text_forward
    checkpointed = plan_run(
        load_config("configs/demo.yaml", [*TINY, "model.grad_checkpointing=true"]), 4, mfu=0.5, largest=False
    )
    assert checkpointed.hardware_flops_per_step == pytest.approx(BATCH * (per_sample.train() + forward))
    assert checkpointed.step_seconds == pytest.approx(plan.step_seconds * (1 + forward / per_sample.train()))


@pytest.mark.parametrize(
    "case",
    ["tiny", pytest.param("tiny-ddp2", marks=pytest.mark.slow), pytest.param("tiny-fsdp2", marks=pytest.mark.slow)],
)
def test_planned_peak_is_within_10_percent_of_a_real_step(case, monkeypatch):
    """The real run: fresh processes (gloo ranks) build the run and take three steps, the third measured by torch's
    profiler (the CPU allocator's running total of live bytes; bench/plan_check.py's docstring)."""
    row = _plan_check(monkeypatch).check(case)
    assert abs(row["error"]) <= 0.10, row


def test_plan_help_and_a_bad_override_import_no_torch():
    from test_cli_startup import run_cli

    code, heavy, output = run_cli("plan", "--help")
    assert code == 0 and "usage: clipforge plan" in output and "--gpus" in output
    assert heavy == [], f"clipforge plan --help imported {heavy}"
    code, heavy, output = run_cli("plan", "configs/demo.yaml", "--gpus", "2", "--set", "optim.learning_rate=1")
    assert code == 2 and "clipforge plan: error: --set 'optim.learning_rate=1'" in output
    assert heavy == [], f"refusing an unknown key imported {heavy}"


def test_plan_command_prints_the_plan(capsys):
    from clipforge.cli import main

    arguments = ["plan", "configs/demo.yaml", "--gpus", "2", "--gpu", "a100-40gb", "--no-largest-batch"]
    assert main([*arguments, *(item for key in TINY for item in ("--set", key)), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["gpus"] == 2 and plan["gpu"]["name"] == "A100 SXM 40GB" and plan["strategy"] == "ddp"
    assert plan["peak"] == sum(plan["parts"].values()) and plan["fits"] is True
    assert plan["global_batch"] == 2 * BATCH
    assert main([*arguments, *(item for key in TINY for item in ("--set", key))]) == 0
    text = capsys.readouterr().out
    for line in ("memory per GPU at the step's peak", "total of the tensors", "DDP gradient all-reduce", "MFU"):
        assert line in text


def test_terms_that_read_the_towers_rule_out_gradcache_and_a_late_term_is_charged_from_its_start():
    from clipforge.train.plan import format_plan, plan_run

    late = "{name: self_distillation, start: 0.75, options: {local_crops: 2, head_dim: 16, prototypes: 48}}"
    common = [*TINY, "model.init_logit_bias=-10", "loss.kind=siglip", "train.steps=100"]
    plain = plan_run(load_config("configs/demo.yaml", common), 1, "h100", largest=False)
    staged = plan_run(load_config("configs/demo.yaml", [*common, f"loss.terms=[{late}]"]), 1, "h100", largest=False)
    assert plain.gradcache and not staged.gradcache
    # the heaviest step carries the teacher and the views; the run pays for them in its last quarter only
    assert staged.step_seconds > plain.step_seconds
    extra = staged.step_seconds - plain.step_seconds
    assert staged.run_seconds == pytest.approx(100 * (plain.step_seconds + 0.25 * extra), rel=1e-9)
    staged.largest_batch, staged.peaks = {False: 4}, {False: 2}  # as if batch 8 did not fit
    staged.peak, staged.budget = 2, 1
    assert "GradCache (train.accum_steps) cannot keep this batch" in format_plan(staged)
