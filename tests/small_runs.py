"""A short training run's config on the test shards, for the objectives' resume and training tests: the tiny model,
a small batch and shuffle buffer, a log line every step, no progress bar or TensorBoard; ``extra`` overrides."""

from __future__ import annotations

import json

from clipforge.train.config import load_config


def small_run_config(data, model_json: str, out, *extra: str, batch_size: int = 16, shuffle_buffer: int = 50):
    return load_config(
        None,
        [
            f"data.train_urls={data}/train/{{00000..00005}}.tar",
            f"data.batch_size={batch_size}",
            "data.num_workers=2",
            f"data.shuffle_buffer={shuffle_buffer}",
            f"model.name={model_json}",
            "optim.lr=2e-3",
            "optim.warmup_steps=2",
            f"train.output_dir={out}",
            "logging.log_every=1",
            "logging.progress_bar=false",
            "logging.tensorboard=false",
            *extra,
        ],
    )


def records(run_dir) -> list[dict]:
    """The run's metrics.jsonl lines."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def prepared_with_terms(model_cfg, loss_cfg, rank: int, world_size: int, strategy: str | None):
    """A model built with ``loss_cfg``'s objectives attached and prepared as the trainer does (DDP or FSDP for
    ``strategy``, one process for None), every token kept: the gloo gradient tests' setup. Returns (built,
    objectives, prepared); the caller binds the objectives where its test needs them."""
    from clipforge.distributed import DistInfo
    from clipforge.losses import ObjectiveContext, build_objectives
    from clipforge.models import build_model
    from clipforge.train.config import ParallelConfig, SpeedConfig
    from clipforge.train.parallel import attach_objectives, prepare_model

    built = build_model(model_cfg)
    objectives = build_objectives(loss_cfg, ObjectiveContext(rank=rank, world_size=world_size, model=built.model))
    attach_objectives(built.model, objectives)
    info = DistInfo(rank=rank, world_size=world_size, local_world_size=world_size) if strategy else DistInfo()
    prepared = prepare_model(
        built.model,
        model_cfg=model_cfg,
        speed=SpeedConfig(),
        parallel=ParallelConfig(strategy=strategy or "ddp"),
        precision="fp32",
        learn_temperature=True,
        dist_info=info,
        every_token=True,
    )
    return built, objectives, prepared
