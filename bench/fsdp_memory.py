"""Per-rank parameter + gradient + optimizer memory under FSDP2 against DDP, on CPU gloo ranks.

    PYTHONPATH=src .venv/bin/python bench/fsdp_memory.py                        # ViT-B-16 at 2 and 4 ranks
    PYTHONPATH=src .venv/bin/python bench/fsdp_memory.py --models ViT-L-14 --world-sizes 2

Each (model, strategy, world size) runs in fresh spawned processes: random init, parallelize, fused AdamW,
``--steps`` real steps (clipforge.train.step) of ``--batch`` 224 px images per rank. After the last step (the
gradients still held, AdamW's moments made) every rank counts the bytes of its parameters, gradients and optimizer
state (a DTensor by its local shard, ``to_local()``), and reads its peak resident memory (ru_maxrss: libraries,
activations, the full model before sharding and DDP's gradient buckets included). The DESIGN.md targets are
FSDP / DDP ≤ 0.6 at 2 ranks and ≤ 0.35 at 4 on the counted bytes. On a 2-core CPU the ranks share the cores, so
only memory is measured, not speed.
"""

from __future__ import annotations

import argparse
import resource
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp


def local_bytes(tensors) -> int:
    from torch.distributed.tensor import DTensor

    total = 0
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor):
            tensor = tensor.to_local() if isinstance(tensor, DTensor) else tensor
            total += tensor.numel() * tensor.element_size()
    return total


def measure(
    rank: int, world_size: int, port: int, model_name: str, strategy: str, batch: int, steps: int, out_dir: str
) -> None:
    from clipforge.distributed import DistInfo, destroy_process_group, init_process_group
    from clipforge.losses import LossConfig, build_loss
    from clipforge.models import ModelConfig, build_model
    from clipforge.train.optim import OptimConfig, build_optimizer, build_scheduler
    from clipforge.train.parallel import parallelize, unwrap
    from clipforge.train.step import build_step

    torch.set_num_threads(1)  # the ranks share the cores
    info = DistInfo(rank=rank, world_size=world_size, local_world_size=world_size)
    init_process_group(info, {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    try:
        torch.manual_seed(rank)
        built = build_model(ModelConfig(name=model_name))
        model = parallelize(built.model, info, strategy=strategy)
        core = unwrap(model)
        optim_cfg = OptimConfig(lr=1e-4, warmup_steps=1)
        optimizer = build_optimizer(optim_cfg, core)
        step = build_step(
            model,
            build_loss(LossConfig(), rank, world_size),
            optimizer,
            build_scheduler(optim_cfg, optimizer, 10),
            device="cpu",
            precision="fp32",
            grad_clip_norm=optim_cfg.grad_clip_norm,
            max_logit_scale=100.0,
        )
        size = built.model_cfg["vision_cfg"]["image_size"]
        start = time.perf_counter()
        for _ in range(steps):
            step({"images": torch.randn(batch, 3, size, size), "texts": built.tokenizer(["a red circle"] * batch)})
        seconds = (time.perf_counter() - start) / steps
        parameters = list(core.parameters())
        counted = {
            "parameters": local_bytes(parameters),
            "gradients": local_bytes(p.grad for p in parameters),
            "optimizer": local_bytes(value for state in optimizer.state.values() for value in state.values()),
        }
        counted["rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
        counted["seconds_per_step"] = seconds
        torch.save(counted, Path(out_dir) / f"rank{rank}.pt")
        torch.distributed.barrier()
    finally:
        destroy_process_group()


def run(model_name: str, strategy: str, world_size: int, batch: int, steps: int) -> list[dict]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(
            measure,
            args=(world_size, port, model_name, strategy, batch, steps, out_dir),
            nprocs=world_size,
            start_method="spawn",
        )
        return [torch.load(Path(out_dir) / f"rank{rank}.pt") for rank in range(world_size)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["ViT-B-16"])
    parser.add_argument("--world-sizes", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--batch", type=int, default=2, help="images per rank")
    parser.add_argument("--steps", type=int, default=1)
    args = parser.parse_args()
    gib = 2**30
    print(
        f"{'model':10} {'ranks':>5} {'strategy':8} {'rank':>4} {'params':>8} {'grads':>8} {'optim':>8} "
        f"{'sum GiB':>8} {'peak RSS':>9} {'s/step':>7}",
        flush=True,
    )
    summary = []
    for model_name in args.models:
        for world_size in args.world_sizes:
            totals = {}
            for strategy in ("ddp", "fsdp"):
                start = time.perf_counter()
                results = run(model_name, strategy, world_size, args.batch, args.steps)
                for rank, counted in enumerate(results):
                    held = counted["parameters"] + counted["gradients"] + counted["optimizer"]
                    print(
                        f"{model_name:10} {world_size:5} {strategy:8} {rank:4} {counted['parameters'] / gib:8.3f} "
                        f"{counted['gradients'] / gib:8.3f} {counted['optimizer'] / gib:8.3f} {held / gib:8.3f} "
                        f"{counted['rss'] / gib:9.3f} {counted['seconds_per_step']:7.1f}",
                        flush=True,
                    )
                totals[strategy] = (
                    max(c["parameters"] + c["gradients"] + c["optimizer"] for c in results),
                    max(c["rss"] for c in results),
                    time.perf_counter() - start,
                )
            summary.append((model_name, world_size, totals))
    print(
        f"\n{'model':10} {'ranks':>5} {'ddp GiB':>8} {'fsdp GiB':>9} {'fsdp/ddp':>8} {'target':>6} "
        f"{'RSS ddp':>8} {'RSS fsdp':>8} {'RSS ratio':>9} {'wall s':>7}"
    )
    for model_name, world_size, totals in summary:
        (ddp_held, ddp_rss, ddp_wall), (fsdp_held, fsdp_rss, fsdp_wall) = totals["ddp"], totals["fsdp"]
        target = {2: "0.6", 4: "0.35"}.get(world_size, "-")
        print(
            f"{model_name:10} {world_size:5} {ddp_held / gib:8.3f} {fsdp_held / gib:9.3f} "
            f"{fsdp_held / ddp_held:8.3f} {target:>6} {ddp_rss / gib:8.2f} {fsdp_rss / gib:8.2f} "
            f"{fsdp_rss / ddp_rss:9.2f} {ddp_wall + fsdp_wall:7.0f}"
        )


if __name__ == "__main__":
    main()
