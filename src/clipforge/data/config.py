"""The ``data`` section of the run config: where training pairs come from and how they are batched.

It lives apart from ``pipeline.py``, which builds the stream it describes, so that reading and validating a config
(``clipforge train --help``, ``clipforge submit``) imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from clipforge.data.sources import SourceConfig

MODES = ("epoch", "resampled")


@dataclass
class DataConfig:
    """Where training pairs come from and how they are batched."""

    sources: list[SourceConfig] = field(default_factory=list)
    """Shard sets: [{urls: ..., weight: 1.0, num_samples: null}, ...]. See clipforge/data/sources.py."""
    train_urls: str | None = None
    """Shorthand for one source: sources=[{urls: TRAIN_URLS}] (OpenCLIP's --train-data, '::'-separated)."""
    mode: str = "epoch"
    """epoch: every sample once per epoch, shards split disjointly; resampled: shards drawn with replacement."""
    epoch_samples: int | None = None
    """Resampled mode: samples per epoch (None = the sources' total, from num_samples or sizes.json)."""
    shard_shortage: str = "error"
    """Epoch mode with fewer shards than ranks × workers: error, or resample (switch to resampled mode)."""
    batch_size: int = 256
    """Samples per rank per step (the global batch is batch_size × world size)."""
    num_workers: int = 2
    """DataLoader worker processes per rank; decoding, augmentation and tokenization happen there."""
    shuffle_buffer: int = 2000
    """Samples held by each worker's shuffle buffer."""
    shuffle_initial: int = 500
    """Samples buffered before the first one is yielded."""
    caption_key: str = "txt"
    """Caption member: txt (the whole text), txt:lines (one line at random), or json:FIELD (a string, or a list:
    one at random)."""
    max_image_pixels: int = 89_478_485
    """Images whose header declares more pixels are skipped as decompression bombs, whatever the format (the
    default is Pillow's default limit; this setting replaces Pillow's own check)."""
    strict: bool = False
    """Stop at the first bad input instead of skipping and counting it."""
    max_skips_in_a_row: int = 10_000
    """A worker that reads this many samples (or opens this many shards) in a row without keeping one stops the run
    on every rank with an error naming the sources and the skip counts by kind, instead of spinning forever."""
    max_wait_seconds: float = 900.0
    """Stop the run on every rank when a rank has waited this long for a batch (a stalled pipe: or network
    stream); 0 waits forever. The first batch counts too: raise it for a slow first shuffle-buffer fill."""
    seed: int = 0
    """Seed of shard order, resampling and shuffle buffers (epoch, rank and worker are mixed in)."""
    prefetch_factor: int = 4
    """Batches each worker prepares ahead."""
    teacher: str | None = None
    """A `clipforge prep score` output (or `prep reshard --embeddings` folder) holding teacher embeddings of these
    shards, for loss.distill_weight. Rows are found by (shard file name, sample key), so shuffling, skipped samples
    and resume keep them aligned; a sample without a row is skipped and counted as missing_teacher (an error with
    data.strict). Batches then carry teacher_image and teacher_text (B, D_teacher) float32."""

    def __post_init__(self) -> None:
        if self.max_wait_seconds < 0:
            raise ValueError(f"data.max_wait_seconds: must be >= 0 (0 = no limit), got {self.max_wait_seconds}")
        for name in ("batch_size", "shuffle_buffer", "max_image_pixels", "max_skips_in_a_row"):
            if getattr(self, name) <= 0:
                raise ValueError(f"data.{name}: must be positive, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers: must be >= 0, got {self.num_workers}")
        if self.mode not in MODES:
            raise ValueError(f"data.mode: expected one of {MODES}, got {self.mode!r}")
        if self.shard_shortage not in ("error", "resample"):
            raise ValueError(f"data.shard_shortage: expected 'error' or 'resample', got {self.shard_shortage!r}")
        if self.epoch_samples is not None and self.epoch_samples <= 0:
            raise ValueError(f"data.epoch_samples: must be positive, got {self.epoch_samples}")
        if not (self.caption_key in ("txt", "txt:lines") or self.caption_key.startswith("json:")):
            raise ValueError(f"data.caption_key: expected 'txt', 'txt:lines' or 'json:FIELD', got {self.caption_key!r}")
        if self.train_urls is not None and self.sources:
            raise ValueError("data.train_urls and data.sources are both set; give one of them")

    def source_configs(self) -> list[SourceConfig]:
        if self.train_urls is None and not self.sources:
            raise ValueError("data.sources: no training data given (set data.sources or data.train_urls)")
        return [SourceConfig(urls=self.train_urls)] if self.train_urls is not None else list(self.sources)
