"""How long a checkpoint stops training: synchronous against ``checkpoint.async_save`` (DCP async_save), one process.

    PYTHONPATH=src .venv/bin/python bench/checkpoint_time.py                    # ViT-B-16, random init, CPU
    PYTHONPATH=src .venv/bin/python bench/checkpoint_time.py --model ViT-L-14 --out /scratch/ckpt --repeats 2

The model is built at random init with fused AdamW whose moments exist (one zero-rate step), wrapped in the
trainer's restart state, and saved by the trainer's ``Checkpointer`` into ``--out``: synchronously (the training
thread writes the DCP files, state.pt and the hashed manifest) and asynchronously (the training thread
blocks while the model and optimizer are copied in memory; the DCP files and manifest are written in the
background). Printed per mode: the blocking time (what a step waits) and the time until the checkpoint is
published as ``latest``. The pre-emption checkpoint must be published within SLURM's ``--signal`` lead time
(``clipforge submit --signal-seconds``, 300 by default), so that figure sets it, with the storage's speed:
write to the cluster's filesystem with ``--out`` to measure it there.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from clipforge.models import ModelConfig, build_model
from clipforge.train.checkpoint import Checkpointer
from clipforge.train.optim import OptimConfig, build_optimizer, build_scheduler
from clipforge.train.state import TrainState, restart_state


class NoData:
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def pieces_for(model_name: str):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=model_name)).model
    cfg = OptimConfig()
    optimizer = build_optimizer(cfg, model)
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    optimizer.step()  # AdamW's moments exist, as in a checkpoint during training
    scheduler = build_scheduler(cfg, optimizer, 100)
    parameters = sum(p.numel() for p in model.parameters())
    return restart_state(
        model, optimizer, scheduler, optim_cfg=cfg, total_steps=100, train=TrainState(1), loader=NoData(), device="cpu"
    ), parameters


def measure(model_name: str, out: Path, repeats: int) -> None:
    pieces, parameters = pieces_for(model_name)
    print(f"{model_name}: {parameters / 1e6:.1f} M parameters, fp32 weights + AdamW moments")
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads; out={out}")
    for asynchronous in (False, True):
        mode = "async" if asynchronous else "sync"
        for repeat in range(repeats):
            directory = out / f"{mode}{repeat}"
            checkpointer = Checkpointer(directory, keep_last=1, asynchronous=asynchronous)
            started = time.perf_counter()
            final = checkpointer.save(1, pieces, "train: {}\n")
            blocked = time.perf_counter() - started
            checkpointer.wait()
            published = time.perf_counter() - started
            size = sum(f.stat().st_size for f in final.iterdir()) / 2**20
            timing = f"blocks training {blocked:6.2f} s   published as latest after {published:6.2f} s"
            print(f"{mode:5s}  {timing}   {size:.0f} MiB")
            shutil.rmtree(directory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: a temporary directory)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        measure(args.model, args.out, args.repeats)
        return
    with tempfile.TemporaryDirectory() as directory:
        measure(args.model, Path(directory), args.repeats)


if __name__ == "__main__":
    main()
