"""``clipforge train``: read and validate the run config before torch is imported, then train or make the dry run
(``clipforge.train``)."""

from __future__ import annotations

import argparse
import json
import logging
import os


def _train(args: argparse.Namespace) -> int:
    from clipforge.train.config import load_config

    overrides = list(args.set)
    if args.resume:
        overrides.append(f"checkpoint.resume={args.resume}")
    cfg = load_config(args.config, overrides)  # before torch is imported: a wrong key is refused at once
    _log_rank()
    if args.dry_run:
        return _dry_run(cfg, args.print_config)
    from clipforge.train.loop import EXIT_PREEMPTED, train

    result = train(cfg, take_over_lock=args.take_over_lock)
    if result.get("eval_table"):
        print(f"\nzero-shot results at step {result['step']} ({cfg.eval.suite}):\n\n{result['eval_table']}")
    if result["is_main"]:
        print(
            json.dumps({"step": result["step"], "checkpoint": result["checkpoint"], "preempted": result["preempted"]})
        )
    return EXIT_PREEMPTED if result["preempted"] else 0


def _dry_run(cfg, print_config: bool) -> int:
    """The checks and the summary first (a problem is the one line the user sees), the resolved config on request."""
    from clipforge.config import to_yaml
    from clipforge.train.preflight import dry_run

    summary = dry_run(cfg)
    width = max(map(len, summary))
    for key, value in summary.items():
        shown = f"{value:,.3f}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int) else value
        print(f"{key:<{width}}  {shown}")
    if print_config:
        print(f"\n{to_yaml(cfg)}", end="")
    else:
        print(
            f"{'config':<{width}}  not shown (--print-config); the run writes it to {cfg.train.output_dir}/config.yaml"
        )
    return 0


def _log_rank() -> None:
    """Prefix log lines with the rank when there are several: they write to one SLURM log."""
    from clipforge.distributed import DistInfo

    info = DistInfo.from_env(os.environ, cuda_available=False)
    if info.is_distributed:
        for handler in logging.getLogger().handlers:
            handler.setFormatter(logging.Formatter(f"%(asctime)s rank {info.rank} %(levelname)s %(name)s: %(message)s"))


def _config_keys() -> str:
    from clipforge.config import describe_fields
    from clipforge.train.config import RunConfig

    return describe_fields(RunConfig)


def add_parser(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser(
        "train",
        help="train a dual encoder from a YAML config",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train from CONFIG (YAML), with --set overrides. Every config key:\n\n",
        more_help=_config_keys,
    )
    train.add_argument("config", help="run config YAML, e.g. configs/demo.yaml")
    train.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set optim.lr=5e-4 (repeatable)",
    )
    train.add_argument(
        "--resume",
        metavar="auto|DIR",
        help="continue from the newest intact checkpoint of this run (auto; 'latest' is an alias) or a "
        "checkpoint directory. Exit code 75: stopped by Ctrl-C (SIGINT), SIGUSR1 or SIGTERM after a checkpoint; "
        "130: a second Ctrl-C aborted at once, without one",
    )
    train.add_argument(
        "--take-over-lock",
        action="store_true",
        help="take the run directory's lock (RUN/train.lock) from a trainer that holds it on another host and is "
        "known to be dead; on this host, or for an earlier attempt of the same SLURM job, a dead holder's lock is "
        "taken over by itself",
    )
    train.add_argument(
        "--dry-run",
        action="store_true",
        help="make the checks the run makes before its first step (the eval suite, the resume target, the "
        "sources: shards found, sample counts, enough shards for world size × data.num_workers), then print "
        "parameter counts and FLOPs per sample and exit; writes nothing",
    )
    train.add_argument(
        "--print-config", action="store_true", help="with --dry-run: also print the resolved config (YAML)"
    )
    train.set_defaults(func=_train)
