"""The training run's config: the sections the trainer owns, and the whole tree (``RunConfig``) assembled from the
sections beside their owners.

Sections and their owners: ``data`` (``data/config.py``), ``model`` (``models/config.py``), ``loss``
(``losses/config.py``), ``optim`` (``train/optim.py``), ``train``, ``checkpoint``, ``parallel``, ``speed`` and
``health`` (here), ``eval`` (``evaluation/config.py``), ``logging`` (``train/metrics.py``). Every one of those modules
imports no torch, so reading and validating a config (``clipforge train --help``, ``clipforge submit``) takes a
fraction of a second; tests/test_cli_startup.py keeps it so. The reading itself (YAML, ``--set``, errors naming the
key) is ``clipforge.config``'s, shared with the evaluation suites.

Keys that moved between sections (``MOVED``) stop a config in one line naming the new key, before any work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from clipforge.config import ConfigError, read_config
from clipforge.data.config import DataConfig
from clipforge.evaluation.config import EvalConfig
from clipforge.losses.config import LossConfig
from clipforge.models.config import ModelConfig
from clipforge.train.metrics import LoggingConfig
from clipforge.train.optim import OptimConfig

PRECISIONS = {"fp32": None, "bf16": "bfloat16", "fp16": "float16"}
"""train.precision → the torch dtype its autocast runs in, by name (``step.AUTOCAST_DTYPES``); None: no autocast."""

MOVED = {
    "train.checkpoint_every": "checkpoint.every",
    "train.keep_last": "checkpoint.keep_last",
    "train.async_checkpoint": "checkpoint.async_save",
    "train.resume": "checkpoint.resume",
    "train.parallel": "parallel.strategy",
    "train.reshard_after_forward": "parallel.reshard_after_forward",
    "train.compile": "speed.compile",
    "train.channels_last": "speed.channels_last",
    "train.trim_text_padding": "speed.trim_text_padding",
    "train.packed_attention": "speed.packed_attention",
    "train.pooled_last_block": "speed.pooled_last_block",
    "train.cudnn_benchmark": "speed.cudnn_benchmark",
    "train.peak_tflops": "logging.peak_tflops",
}
"""Keys of the one-section ``train`` layout → where they are now. A config that uses one stops with a line naming
the new key rather than being mapped silently: a mapped key would keep the old name alive in every saved config."""


@dataclass
class TrainConfig:
    """The training run: length, seed, numerics, output."""

    output_dir: str = "runs/default"
    """Run directory: resolved config, metrics, TensorBoard, checkpoints, eval results, curves.png."""
    steps: int = 1000
    """Optimizer steps to train for, at the global batch the run starts with (data.batch_size × world size). A run
    resumed with another global batch trains on the same number of samples: the length and the learning-rate
    schedule are counted in samples (see docs/training.md)."""
    seed: int = 0
    """Seed of model init and torch RNG (the rank is added)."""
    precision: str = "fp32"
    """fp32, bf16 autocast, or fp16 autocast with a dynamic gradient scaler (the loss is always fp32)."""
    tf32: bool = True
    """fp32 runs on a CUDA device: matrix multiplications in TF32 (torch.set_float32_matmul_precision('high'); fp32
    range and accumulation, 10-bit mantissa inputs; several times the fp32 throughput on Ampere and later), as
    open_clip_train does. Not applied under bf16/fp16 autocast, whose matmuls are already half precision and whose
    loss stays full fp32. false = full fp32 matmuls."""
    accum_steps: int = 1
    """Split each batch into k micro-batches with cached features (GradCache): the loss still sees all of
    data.batch_size as negatives, activation memory is one micro-batch's."""
    max_nonfinite_steps: int = 5
    """A non-finite loss or gradient skips the update; this many in a row abort the run (naming step and keys). The
    skips are counted at logging steps (logging.log_every), so the abort comes at the first logging step after."""
    requeue: bool = False
    """On SIGUSR1/SIGTERM under SLURM: after the pre-emption checkpoint, `scontrol requeue` the job (rank 0)."""

    def __post_init__(self) -> None:
        if self.steps <= 0:
            raise ValueError(f"train.steps: must be positive, got {self.steps}")
        if self.accum_steps < 1:
            raise ValueError(f"train.accum_steps: must be >= 1, got {self.accum_steps}")
        if self.max_nonfinite_steps < 1:
            raise ValueError(f"train.max_nonfinite_steps: must be >= 1, got {self.max_nonfinite_steps}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision: {self.precision!r} is not one of {tuple(PRECISIONS)}")


@dataclass
class CheckpointConfig:
    """When checkpoints are written, how many are kept, and which one a run resumes from."""

    every: int = 500
    """Write a checkpoint every N steps (and always at the end)."""
    keep_last: int = 3
    """Keep the newest K checkpoints."""
    async_save: bool = False
    """Write checkpoints in the background (torch.distributed.checkpoint async_save): the step pauses only to copy the
    model and optimizer in memory, and the files are written while training goes on; the checkpoint becomes
    `latest` once every rank's files are on disk (a failed write leaves the previous one as latest). Costs one more
    copy of the model and optimizer in host memory."""
    resume: str | None = None
    """Resume from a checkpoint directory, or 'auto' (alias 'latest') for the newest intact one in this run (none
    yet = start fresh). Corrupt or truncated checkpoints are skipped with a warning."""

    def __post_init__(self) -> None:
        if self.every <= 0:
            raise ValueError(f"checkpoint.every: must be positive, got {self.every}")
        if self.keep_last < 1:
            raise ValueError(f"checkpoint.keep_last: must be >= 1, got {self.keep_last}")


@dataclass
class ParallelConfig:
    """How the model is spread over the ranks."""

    strategy: str = "ddp"
    """Data parallelism over the ranks: ddp (every rank holds the whole model, its gradients and AdamW state) or
    fsdp (FSDP2: each rank holds 1/N of them, gathered block by block as they run; for towers that outgrow a device
    under DDP; ViT towers; each rank writes its own shards of the checkpoint)."""
    reshard_after_forward: bool = True
    """fsdp: free each block's gathered weights after its forward and gather them again for the backward (less memory,
    one more all-gather per block); false keeps them from forward to backward."""

    def __post_init__(self) -> None:
        if self.strategy not in ("ddp", "fsdp"):
            raise ValueError(f"parallel.strategy: expected 'ddp' or 'fsdp', got {self.strategy!r}")


@dataclass
class SpeedConfig:
    """Switches that change how fast a step runs, never what it computes (each is exact, or off by default)."""

    compile: bool = False
    """torch.compile the model (in place, so checkpoints keep plain parameter names). It is compiled after DDP wraps
    it: dynamo then splits the graph at DDP's gradient-bucket boundaries so the bucket all-reduces overlap the
    backward (compiled first, AOTAutograd makes the backward one node and DDP can only all-reduce after it). With
    trim_text_padding the caption length is marked dynamic: one graph for every length, not one per length."""
    channels_last: bool | str = "auto"
    """channels-last memory format for the model and images: true, false, or 'auto' = on for a convolutional
    image tower (ResNet, ConvNeXt: +20-28% end-to-end samples/s for the demo's on a 2-core CPU), off for a ViT (its one
    convolution is the patch embedding)."""
    trim_text_padding: bool = True
    """Cut each batch's token columns after its longest caption (and the text tower's work on them) where that is
    exact: a causal text tower pooled at the end-of-text token (open_clip's CLIP class). Same features and
    gradients; the text tower's cost follows the captions' length instead of the context length."""
    packed_attention: bool = True
    """In training, compute open_clip's batch-first self-attention (nn.MultiheadAttention) from its packed q/k/v
    projection straight into scaled_dot_product_attention (clipforge.models.attention): the same parameters and
    kernels, without torch's sequence-first transposes and the copies and zero-fills their backward costs (~1.35x
    on the attention block of the tiny ViT, CPU time on a 2-core CPU). false = torch's own path."""
    pooled_last_block: bool = True
    """Run the last block of a tower pooled at one token (a ViT's class token; the causal text tower's end-of-text
    token) on that token alone, keys and values excepted (clipforge.models.shortcuts): nothing reads the block's
    other outputs, so the features and gradients are the same and 5/6 of that block's projections and MLP are not
    computed (a fifth of the tiny ViT's image tower; 7% of ViT-B/16's). false = every token, as open_clip does."""
    cudnn_benchmark: bool = True
    """On a CUDA device: cuDNN times its convolution algorithms for each new input shape and keeps the fastest
    (torch.backends.cudnn.benchmark), as open_clip_train does; training shapes are fixed, so the first steps pay
    once. false = cuDNN's heuristic choice."""

    def __post_init__(self) -> None:
        if isinstance(self.channels_last, str) and self.channels_last != "auto":
            raise ValueError(f"speed.channels_last: must be true, false or 'auto', got {self.channels_last!r}")


@dataclass
class HealthConfig:
    """Representation-health diagnostics on a held-out batch, and collapse alarms."""

    every_n_steps: int = 0
    """Measure the embedding diagnostics (health/* metrics) of a held-out batch every N steps; 0 = off."""
    num_samples: int = 512
    """Size of the held-out batch the diagnostics are measured on (the same samples every time)."""
    min_effective_rank: float = 0.0
    """Alarm when health/effective_rank_image or _text falls below this (dimensional collapse); 0 = no alarm."""
    min_std: float = 0.0
    """Alarm when health/std_mean_image or _text (mean per-dimension std; healthy ≈ 1/sqrt(D)) falls below
    this (complete collapse); 0 = no alarm."""
    max_clamped_steps: int = 0
    """Alarm when the temperature sits at loss.max_logit_scale for this many consecutive steps (and every as many
    steps after, while it stays there); 0 = off. Counted every step on the device, without the held-out batch, and
    read at logging steps (logging.log_every), so the alarm comes at the first logging step that sees the count."""
    stop_on_collapse: bool = False
    """Stop the run with a CollapseError at the first alarm instead of only logging a warning."""
    dataset: str | None = None
    """The held-out image–caption pairs: a retrieval benchmark folder as `clipforge eval` reads it (CLIP_benchmark
    WebDataset, or a saved HF dataset with image and caption columns); each image with its first caption.
    Default: the first zeroshot_retrieval dataset of eval.suite."""

    def __post_init__(self) -> None:
        if self.every_n_steps < 0:
            raise ValueError(f"health.every_n_steps: must be >= 0 (0 = off), got {self.every_n_steps}")
        if self.num_samples < 2:
            raise ValueError(f"health.num_samples: must be >= 2, got {self.num_samples}")
        for name in ("min_effective_rank", "min_std", "max_clamped_steps"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"health.{name}: must be >= 0 (0 = no alarm), got {getattr(self, name)}")
        for name in ("min_effective_rank", "min_std"):
            if getattr(self, name) > 0 and self.every_n_steps == 0:
                raise ValueError(
                    f"health.{name} is set but health.every_n_steps=0 never measures the embeddings: "
                    "set health.every_n_steps"
                )
        if self.stop_on_collapse and not (self.min_effective_rank or self.min_std or self.max_clamped_steps):
            raise ValueError(
                "health.stop_on_collapse is set but no alarm is: set health.min_effective_rank, "
                "health.min_std or health.max_clamped_steps"
            )


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    health: HealthConfig = field(default_factory=HealthConfig)

    def __post_init__(self) -> None:
        """Contradictions between sections."""
        if self.loss.kind == "siglip" and self.model.init_logit_bias is None:
            raise ValueError(
                "loss.kind=siglip needs a learnable bias: set model.init_logit_bias (SigLIP: -10) and "
                "model.init_logit_scale (SigLIP: 2.302585, i.e. log 10)"
            )
        if self.loss.kind == "clip" and self.model.init_logit_bias is not None:
            raise ValueError("model.init_logit_bias is set but loss.kind=clip ignores the bias; unset it")
        if self.health.every_n_steps and self.health.dataset is None and self.eval.suite is None:
            raise ValueError(
                "health.every_n_steps needs held-out image–caption pairs: set health.dataset or "
                "eval.suite (its first zeroshot_retrieval dataset is used)"
            )
        if self.loss.queue_size and self.train.accum_steps > 1:
            raise ValueError("loss.queue_size cannot be combined with train.accum_steps > 1 (GradCache)")
        if self.loss.queue_size and self.parallel.strategy == "fsdp":
            raise ValueError(
                "loss.queue_size (a momentum encoder copied from the model) is not supported with "
                "parallel.strategy=fsdp; use ddp"
            )
        if self.loss.distill_weight and (self.data.teacher is None) == (self.loss.distill_model is None):
            raise ValueError(
                "loss.distill_weight needs one teacher: data.teacher (stored embeddings) or loss.distill_model "
                f"(online), got data.teacher={self.data.teacher}, loss.distill_model={self.loss.distill_model}"
            )
        if self.data.teacher is not None and not self.loss.distill_weight:
            raise ValueError(f"data.teacher={self.data.teacher} is set but loss.distill_weight=0 would not use it")
        if self.data.batch_size % self.train.accum_steps:
            raise ValueError(
                f"data.batch_size={self.data.batch_size} is not divisible by train.accum_steps={self.train.accum_steps}"
            )


def _check_sources(merged, source: str) -> None:
    if merged.data.train_urls is None and not merged.data.sources:
        raise ConfigError(
            f"{source}: data.sources: no training data given (set data.sources, or data.train_urls for a single source)"
        )


def load_config(path: str | Path | None = None, overrides: tuple[str, ...] | list[str] = ()) -> RunConfig:
    """Defaults, then the YAML at ``path``, then ``a.b=value`` overrides; validated completely."""
    return read_config(RunConfig, path, overrides, moved=MOVED, check=_check_sources)
