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
