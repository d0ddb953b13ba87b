"""``clipforge plan``: a run's memory and time per GPU on N GPUs, from one training step on fake tensors, on any
machine (``clipforge.train.plan``). The config is read and checked before torch is imported."""

from __future__ import annotations

import argparse
import json

from clipforge.train.plan import DEFAULT_MFU, GPUS, RESERVE, SLACK


def _plan(args: argparse.Namespace) -> int:
    from clipforge.train.config import load_config

    cfg = load_config(args.config, args.set)  # a wrong key is refused before torch is imported
    from clipforge.train.plan import format_plan, plan_json, plan_run

    plan = plan_run(
        cfg,
        args.gpus,
        args.gpu,
        mfu=args.mfu,
        bandwidth=args.bandwidth * 1e9 if args.bandwidth else None,
        largest=not args.no_largest_batch,
        config_name=args.config,
    )
    print(json.dumps(plan_json(plan), indent=2) if args.json else format_plan(plan))
    return 0


def add_parser(commands: argparse._SubParsersAction) -> None:
    plan = commands.add_parser(
        "plan",
        help="plan a run's memory and time per GPU on N GPUs, without a GPU",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Plan CONFIG on --gpus N GPUs of one --gpu kind: one training step of the run (its model, "
        "parallel.strategy, train.precision, objectives, optimizer) on fake tensors, as rank 0 of N (torch's "
        "FakeTensorMode and a fake process group: no GPU, no weights, no data). Prints the peak memory per GPU by "
        "part, whether it fits, the largest batch per GPU that fits with and without gradient checkpointing, FLOPs "
        "and time per step and per run at an assumed MFU, and the bytes each GPU sends per step (the loss's "
        "embedding exchange, FSDP's all-gathers and reduce-scatters, DDP's all-reduce) with their time at an "
        "assumed bandwidth.\n\n"
        "  clipforge plan configs/vit-b-16.yaml --gpus 64 --gpu h100\n"
        "  clipforge plan configs/vit-l-14.yaml --gpus 256 --gpu a100 --set parallel.strategy=fsdp "
        "--set model.grad_checkpointing=true\n\n"
        f"Fits: the tensors plus {SLACK:.0%} (the allocator's rounding and fragmentation) plus "
        f"{RESERVE / 2**30:.0f} GiB (CUDA context, NCCL, library workspaces) within the GPU's memory. "
        "See docs/scaling.md.",
    )
    plan.add_argument("config", help="run config YAML, e.g. configs/vit-b-16.yaml")
    plan.add_argument("--gpus", type=int, required=True, metavar="N", help="number of GPUs (the world size)")
    plan.add_argument(
        "--gpu",
        default="h100",
        choices=tuple(GPUS),
        help="GPU kind: its memory, dense peak and assumed bandwidths (default: h100, the SXM 80GB)",
    )
    plan.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set data.batch_size=256 --set parallel.strategy=fsdp (repeatable)",
    )
    plan.add_argument(
        "--mfu",
        type=float,
        default=DEFAULT_MFU,
        help=f"model FLOPs utilisation the time is planned at (default: {DEFAULT_MFU}, an assumption)",
    )
    plan.add_argument(
        "--bandwidth",
        type=float,
        metavar="GB/s",
        help="bus bandwidth per GPU for the communication time (default: the GPU's NVLink figure within one node, "
        "its network figure across nodes)",
    )
    plan.add_argument(
        "--no-largest-batch",
        action="store_true",
        help="skip the search for the largest batch that fits (fewer fake steps, a faster plan)",
    )
    plan.add_argument("--json", action="store_true", help="print the plan as JSON (bytes, seconds, FLOPs)")
    plan.set_defaults(func=_plan)
