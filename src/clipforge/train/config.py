"""The ``train`` section of the run config: length, checkpoints, precision, parallelism, output.

It lives apart from ``loop.py``, which imports torch and the whole library, so that reading and validating a config
(``clipforge train --help``, ``clipforge submit``) imports neither.
"""

from __future__ import annotations

from dataclasses import dataclass

PRECISIONS = {"fp32": None, "bf16": "bfloat16", "fp16": "float16"}
"""train.precision → the torch dtype its autocast runs in, by name (``step.AUTOCAST_DTYPES``); None: no autocast."""


@dataclass
class TrainConfig:
    """The training run: length, checkpoints, precision, output."""

    output_dir: str = "runs/default"
    """Run directory: resolved config, metrics, TensorBoard, checkpoints, eval results, curves.png."""
    steps: int = 1000
    """Optimizer steps to train for, at the global batch the run starts with (data.batch_size × world size). A run
    resumed with another global batch trains on the same number of samples: the length and the learning-rate
    schedule are counted in samples (see docs/training.md)."""
    checkpoint_every: int = 500
    """Write a checkpoint every N steps (and always at the end)."""
    keep_last: int = 3
    """Keep the newest K checkpoints."""
    async_checkpoint: bool = False
    """Write checkpoints in the background (torch.distributed.checkpoint async_save): the step pauses only to copy the
    model and optimizer in memory, and the files are written while training goes on; the checkpoint becomes
    `latest` once every rank's files are on disk (a failed write leaves the previous one as latest). The model and
    optimizer are then stored as DCP shards under DDP too. Costs one more copy of them in host memory."""
    seed: int = 0
    """Seed of model init and torch RNG (the rank is added)."""
    precision: str = "fp32"
    """fp32, bf16 autocast, or fp16 autocast with a dynamic gradient scaler (the loss is always fp32)."""
    accum_steps: int = 1
    """Split each batch into k micro-batches with cached features (GradCache): the loss still sees all of
    data.batch_size as negatives, activation memory is one micro-batch's."""
    resume: str | None = None
    """Resume from a checkpoint directory, or 'auto' (alias 'latest') for the newest intact one in this run (none
    yet = start fresh). Corrupt or truncated checkpoints are skipped with a warning."""
    max_nonfinite_steps: int = 5
    """A non-finite loss or gradient skips the update; this many in a row abort the run (naming step and keys). The
    skips are counted at logging steps (logging.log_every), so the abort comes at the first logging step after."""
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
    parallel: str = "ddp"
    """Data parallelism over the ranks: ddp (every rank holds the whole model, its gradients and AdamW state) or
    fsdp (FSDP2: each rank holds 1/N of them, gathered block by block as they run; for towers that outgrow a device
    under DDP; ViT towers; checkpoints become torch.distributed.checkpoint shards)."""
    reshard_after_forward: bool = True
    """fsdp: free each block's gathered weights after its forward and gather them again for the backward (less memory,
    one more all-gather per block); false keeps them from forward to backward."""
    requeue: bool = False
    """On SIGUSR1/SIGTERM under SLURM: after the pre-emption checkpoint, `scontrol requeue` the job (rank 0)."""
    tf32: bool = True
    """fp32 runs on a CUDA device: matrix multiplications in TF32 (torch.set_float32_matmul_precision('high'); fp32
    range and accumulation, 10-bit mantissa inputs; several times the fp32 throughput on Ampere and later), as
    open_clip_train does. Not applied under bf16/fp16 autocast, whose matmuls are already half precision and whose
    loss stays full fp32. false = full fp32 matmuls."""
    peak_tflops: float | None = None
    """The device's dense peak TFLOP/s at this precision, for perf/mfu. None: from the table of known GPUs
    (A100, H100, H200, L40S; TF32 for fp32 runs with train.tf32), or on a CPU a GEMM probe of this machine at the
    run's dtype, measured once and cached in ~/.cache/clipforge (clipforge.train.peak)."""
    cudnn_benchmark: bool = True
    """On a CUDA device: cuDNN times its convolution algorithms for each new input shape and keeps the fastest
    (torch.backends.cudnn.benchmark), as open_clip_train does; training shapes are fixed, so the first steps pay
    once. false = cuDNN's heuristic choice."""

    def __post_init__(self) -> None:
        if self.steps <= 0:
            raise ValueError(f"train.steps: must be positive, got {self.steps}")
        if self.checkpoint_every <= 0:
            raise ValueError(f"train.checkpoint_every: must be positive, got {self.checkpoint_every}")
        if self.keep_last < 1:
            raise ValueError(f"train.keep_last: must be >= 1, got {self.keep_last}")
        if self.accum_steps < 1:
            raise ValueError(f"train.accum_steps: must be >= 1, got {self.accum_steps}")
        if self.max_nonfinite_steps < 1:
            raise ValueError(f"train.max_nonfinite_steps: must be >= 1, got {self.max_nonfinite_steps}")
        if isinstance(self.channels_last, str) and self.channels_last != "auto":
            raise ValueError(f"train.channels_last: must be true, false or 'auto', got {self.channels_last!r}")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise ValueError(f"train.peak_tflops: must be positive, got {self.peak_tflops}")
        if self.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"train.parallel: expected 'ddp' or 'fsdp', got {self.parallel!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision: {self.precision!r} is not one of {tuple(PRECISIONS)}")
