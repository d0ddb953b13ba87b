"""Planned against measured: the peak memory per rank that ``clipforge plan`` predicts, against real steps.

    PYTHONPATH=src .venv/bin/python bench/plan_check.py                          # every CPU case
    PYTHONPATH=src .venv/bin/python bench/plan_check.py --cases tiny tiny-ddp2
    PYTHONPATH=src python3 bench/plan_check.py --device cuda                     # the GPU cases (bench/gpu_check.sh)

Planned: ``clipforge.train.memory.FakeRun(cfg, world_size).step(batch).peak``, the "total of the tensors" that
``clipforge plan`` prints, made on fake tensors in this process.

Measured: each case runs in fresh processes, one per rank (gloo on a CPU, NCCL on GPUs), that build the run as the
trainer does (``build_model``, ``objectives_for_run``, ``prepare_model``, ``build_optimizer``, ``build_step``) with
real weights and a batch of real tensors, and take three steps; the third is measured (the first makes AdamW's
state, the second lets DDP rebuild its buckets in the order the gradients arrive), as the plan's step is a step of a
run already going.

- On a CPU, torch's profiler records memory from before the model is built (``profile_memory=True``): every
  allocation and free of torch's CPU allocator, with its running total of the bytes allocated and not yet freed
  (``total_allocated`` of the profiler's allocation events). The measured peak is that total's largest value
  during the third step: the model, its gradients and AdamW's state included, and also what the fake step cannot
  see, the kernels' own workspaces and the buffers DDP's reducer allocates in C++. The gloo backend's own buffers
  (what it allocates inside its collectives: a copy of each reduce-scatter's input, kept as long as its work
  object, and a staging buffer for each all-gather) are not the step's: NCCL on GPUs makes neither, and the plan
  sets memory aside for NCCL's own. They are counted apart ("of it gloo"), and the plan is compared with the peak
  of the total less them ("planned/measured"; "with gloo" is against the whole total).
- On a GPU, ``torch.cuda.max_memory_allocated`` over the third step (after ``reset_peak_memory_stats``): the
  caching allocator's count of live tensor bytes (cuBLAS's and attention's workspaces come from it too).
  ``max_memory_reserved`` is printed beside it, and its ratio to the allocated peak, the slack the plan allows for.

Within 10% is the bar (``--tolerance``); the exit status is 1 when a case misses it.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.multiprocessing as mp

TINY = ["model.name=tiny-vit-64", "data.batch_size=64"]
VIT_B16 = ["train.precision=fp32"]
SIGLIP = ["loss.kind=siglip", "model.init_logit_bias=-10", "model.init_logit_scale=2.302585"]
LOCCA = "loss.terms=[{name: locca, options: {depth: 1, referring: 0.25, grounded: 0.25, parallel: 0.5}}]"
SIGLIP2 = (  # every SigLIP 2 term on from the first step, as the plan's heaviest step has them
    "loss.terms=[{name: locca, options: {depth: 1}}, {name: self_distillation, options: {local_crops: 4, "
    "masked_weight: 0.25}}]"
)
CASES: dict[str, tuple[str, list[str], int]] = {
    # name: (config, overrides, ranks)
    "tiny": ("configs/demo.yaml", TINY, 1),
    "tiny-ckpt": ("configs/demo.yaml", [*TINY, "model.grad_checkpointing=true"], 1),
    "tiny-bf16": ("configs/demo.yaml", [*TINY, "train.precision=bf16"], 1),
    "tiny-tiled": ("configs/demo.yaml", [*TINY, "loss.tile_size=16"], 1),
    "tiny-siglip-locca": ("configs/demo.yaml", [*TINY, *SIGLIP, LOCCA], 1),
    "tiny-siglip2": ("configs/demo.yaml", [*TINY, *SIGLIP, SIGLIP2], 1),
    "demo": ("configs/demo.yaml", [], 1),
    "demo-accum4": ("configs/demo.yaml", ["train.accum_steps=4"], 1),
    "vit-b-16": ("configs/vit-b-16.yaml", [*VIT_B16, "data.batch_size=8"], 1),
    "tiny-ddp2": ("configs/demo.yaml", TINY, 2),
    "tiny-fsdp2": ("configs/demo.yaml", [*TINY, "parallel.strategy=fsdp"], 2),
    "tiny-siglip-ring2": ("configs/demo.yaml", [*TINY, *SIGLIP, "loss.siglip_exchange=ring"], 2),
    "tiny-siglip2-fsdp2": ("configs/demo.yaml", [*TINY, *SIGLIP, SIGLIP2, "parallel.strategy=fsdp"], 2),
    "vit-b-16-ddp2": ("configs/vit-b-16.yaml", [*VIT_B16, "data.batch_size=4"], 2),
    "vit-b-16-fsdp2": ("configs/vit-b-16.yaml", [*VIT_B16, "data.batch_size=4", "parallel.strategy=fsdp"], 2),
}
GPU_CASES: dict[str, tuple[str, list[str], int]] = {
    "gpu-vit-b-16-bf16": ("configs/vit-b-16.yaml", ["data.batch_size=128"], 1),
    "gpu-vit-b-16-bf16-ckpt": ("configs/vit-b-16.yaml", ["data.batch_size=128", "model.grad_checkpointing=true"], 1),
    "gpu-vit-l-14-bf16": ("configs/vit-l-14.yaml", ["data.batch_size=64"], 1),
    "gpu-siglip-b-16-bf16": ("configs/siglip-vit-b-16.yaml", ["data.batch_size=128"], 1),
    "gpu-demo-fp32": ("configs/demo.yaml", ["data.batch_size=512"], 1),
}
MEASURED_STEP = "plan_check: measured step"


def planned_peak(config: str, overrides: list[str], world_size: int) -> int:
    from clipforge.train.config import load_config
    from clipforge.train.memory import FakeRun

    cfg = load_config(config, overrides)
    with FakeRun(cfg, world_size) as run:
        return run.step(cfg.data.batch_size).peak


def _build(cfg, info, mesh):
    """The run's model, objectives and step as ``clipforge.train.build.build_run`` makes them (no data, no
    checkpointer)."""
    from clipforge.models import build_model
    from clipforge.train.build import objectives_and_model, step_for_run
    from clipforge.train.optim import SampleClock, build_optimizer, build_scheduler
    from clipforge.train.state import TrainState

    built = build_model(cfg.model)
    state = TrainState(clock=SampleClock(global_batch=cfg.data.batch_size * info.world_size))
    objectives, prepared = objectives_and_model(cfg, built, info, state, mesh)
    optimizer = build_optimizer(cfg.optim, built.model)
    scheduler = build_scheduler(cfg.optim, optimizer, cfg.train.steps, state.clock)
    step_fn = step_for_run(cfg, prepared.model, objectives, optimizer, scheduler, info.device)
    return built, objectives, prepared, step_fn


def _in_backend(node) -> bool:
    """Whether an allocation was made inside a c10d operator: the process group backend's own buffers."""
    parent = node.parent
    while parent is not None:
        if parent.name.startswith("c10d::"):
            return True
        parent = parent.parent
    return False


def _cpu_peaks(prof) -> tuple[int, int]:
    """The CPU allocator's largest running total during the measured step, from the profiler's allocation events;
    and the largest total less what the process group backend allocated inside its own operators and still holds
    (gloo copies a reduce-scatter's input and keeps the copy until the work object goes; NCCL copies nothing)."""
    from torch._C._profiler import _EventType

    window, events, nodes = None, [], list(prof.profiler.kineto_results.experimental_event_tree())
    while nodes:
        node = nodes.pop()
        nodes.extend(node.children)
        if node.name == MEASURED_STEP:
            window = (node.start_time_ns, node.end_time_ns)
        elif node.typed[0] == _EventType.Allocation and str(node.typed[1].device) == "cpu":
            fields = node.typed[1]
            events.append((node.start_time_ns, fields.ptr, fields.alloc_size, fields.total_allocated, node))
    assert window is not None, "the measured step was not recorded"
    events.sort(key=lambda event: event[0])
    backend: dict[int, int] = {}  # ptr -> bytes the backend allocated and still holds
    held, before, peak, peak_less_backend = 0, (0, 0), 0, 0
    for moment, ptr, size, total, node in events:
        if size > 0 and _in_backend(node):
            backend[ptr] = size
            held += size
        elif size < 0 and ptr in backend:
            held -= backend.pop(ptr)
        if moment > window[1]:
            break
        if moment < window[0]:
            before = (total, total - held)  # alive when the step starts
        else:
            peak, peak_less_backend = max(peak, total), max(peak_less_backend, total - held)
    return max(peak, before[0]), max(peak_less_backend, before[1])


def measure_rank(rank: int, world_size: int, port: int, config: str, overrides: list[str], device: str, out: str):
    """One rank of a real run: three steps, the third measured (module docstring); writes ``rank{rank}.json``."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from clipforge.distributed import DistInfo, build_mesh, destroy_process_group, init_process_group
    from clipforge.train.config import load_config
    from clipforge.train.memory import make_batch

    if world_size > 1:
        torch.set_num_threads(max(1, torch.get_num_threads() // world_size))
    cfg = load_config(config, overrides)
    on_gpu = device == "cuda"
    info = DistInfo(
        rank=rank,
        local_rank=rank,
        world_size=world_size,
        local_world_size=world_size,
        device=f"cuda:{rank}" if on_gpu else "cpu",
        backend="nccl" if on_gpu else "gloo",
    )
    init_process_group(info, {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    profiler = nullcontext() if on_gpu else profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    try:
        with profiler as prof:
            mesh = build_mesh(info)
            torch.manual_seed(rank)
            built, objectives, prepared, step_fn = _build(cfg, info, mesh)
            with torch.device(info.device):
                batch = make_batch(built, objectives, cfg.data.batch_size, prepared.channels_last)
            for index in range(3):
                if index == 2 and on_gpu:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                with record_function(MEASURED_STEP) if index == 2 else nullcontext():
                    step_fn(batch)
                if on_gpu:
                    torch.cuda.synchronize()
        if on_gpu:
            result = {
                "measured": torch.cuda.max_memory_allocated(),
                "reserved": torch.cuda.max_memory_reserved(),
                "total_memory": torch.cuda.get_device_properties(info.device).total_memory,
                "gpu": torch.cuda.get_device_name(info.device),
            }
        else:
            measured, less_backend = _cpu_peaks(prof)
            result = {"measured": measured, "measured_less_backend": less_backend}
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
        if world_size > 1:
            torch.distributed.barrier()
    finally:
        destroy_process_group()


def measured_peaks(config: str, overrides: list[str], world_size: int, device: str = "cpu") -> list[dict]:
    """Each rank's measurement of a real run of the case (``measure_rank``), in fresh spawned processes."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(
            measure_rank,
            args=(world_size, port, config, overrides, device, out),
            nprocs=world_size,
            start_method="spawn",
        )
        return [json.loads(Path(out, f"rank{rank}.json").read_text()) for rank in range(world_size)]


def check(name: str, device: str = "cpu") -> dict:
    config, overrides, world_size = {**CASES, **GPU_CASES}[name]
    start = time.perf_counter()
    planned = planned_peak(config, overrides, world_size)
    plan_seconds = time.perf_counter() - start
    ranks = measured_peaks(config, overrides, world_size, device)
    measured = max(rank["measured"] for rank in ranks)
    step = max(rank.get("measured_less_backend", rank["measured"]) for rank in ranks)
    return {
        "case": name,
        "config": config,
        "overrides": overrides,
        "ranks": world_size,
        "planned": planned,
        "measured": measured,
        "measured_less_backend": step,
        "error": planned / step - 1,
        "error_with_backend": planned / measured - 1,
        "plan_seconds": plan_seconds,
        "measure_seconds": time.perf_counter() - start - plan_seconds,
        **{key: ranks[0][key] for key in ("reserved", "total_memory", "gpu") if key in ranks[0]},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", help=f"default: every CPU case ({', '.join(CASES)}), or GPU_CASES")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--tolerance", type=float, default=0.10)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    names = args.cases or list(GPU_CASES if args.device == "cuda" else CASES)
    mib = 2**20
    print(
        f"{'case':<20} {'ranks':>5} {'planned MiB':>12} {'measured MiB':>13} {'of it gloo':>11} "
        f"{'planned/measured':>17} {'with gloo':>10}"
        + ("  reserved MiB  reserved/allocated" if args.device == "cuda" else ""),
        flush=True,
    )
    rows, failed = [], []
    for name in names:
        row = check(name, args.device)
        rows.append(row)
        backend = row["measured"] - row["measured_less_backend"]
        line = (
            f"{name:<20} {row['ranks']:>5} {row['planned'] / mib:>12,.1f} {row['measured'] / mib:>13,.1f} "
            f"{backend / mib:>11,.1f} {row['error'] + 1:>17.3f} {row['error_with_backend'] + 1:>10.3f}"
        )
        if "reserved" in row:
            line += f"  {row['reserved'] / mib:>12,.1f}  {row['reserved'] / row['measured']:>18.3f}"
        print(line, flush=True)
        if abs(row["error"]) > args.tolerance:
            failed.append(name)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    if failed:
        print(f"outside ±{args.tolerance:.0%}: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
