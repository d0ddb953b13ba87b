"""The training loop: build → resume → for each step: batch → step → log / evaluate / checkpoint → final save.

Entry points: ``clipforge train configs/demo.yaml`` (one process) and
``torchrun --nproc-per-node N -m clipforge train CONFIG`` (data parallel; the loss all-gathers).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

from clipforge.data.pipeline import StopRequested
from clipforge.distributed import DistInfo, destroy_process_group, init_process_group
from clipforge.evaluation import OpenClipEncoder, load_suite, markdown_table, run_suite
from clipforge.evaluation.suite import headline
from clipforge.health import CollapseError, CollapseMonitor, HealthProbe
from clipforge.models import build_model
from clipforge.train.build import Run, build_run
from clipforge.train.metrics import MetricLogger, plot_curves
from clipforge.train.parallel import apply_training_options, unwrap
from clipforge.train.step import AUTOCAST_DTYPES

if TYPE_CHECKING:
    from clipforge.config import RunConfig

log = logging.getLogger("clipforge.train")


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
        if self.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"train.parallel: expected 'ddp' or 'fsdp', got {self.parallel!r}")
        if self.precision not in AUTOCAST_DTYPES:
            raise ValueError(f"train.precision: {self.precision!r} is not one of {tuple(AUTOCAST_DTYPES)}")


def apply_cuda_settings(cfg: TrainConfig, device: str) -> None:
    """train.tf32 and train.cudnn_benchmark, process-wide torch settings, on a CUDA device only."""
    if not device.startswith("cuda"):
        return
    if cfg.tf32 and cfg.precision == "fp32":
        torch.set_float32_matmul_precision("high")
    if cfg.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True


def prepare_batch(
    batch: dict[str, Any], transform, device: str, channels_last: bool, dynamic_text: bool
) -> dict[str, Any]:
    """A loader batch as the step takes it: images on the device, normalised (uint8 → float), in the model's memory
    format; with ``dynamic_text`` (compile with trimmed captions) the token length is marked dynamic, so the
    compiled model keeps one graph whatever the batch's longest caption."""
    batch["images"] = transform.normalize(batch["images"].to(device, non_blocking=True))
    if channels_last:
        batch["images"] = batch["images"].contiguous(memory_format=torch.channels_last)
    if dynamic_text:
        torch._dynamo.maybe_mark_dynamic(batch["texts"], 1)
    return batch


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _max_memory_mb(device: str) -> float:
    """Peak accelerator memory allocated by torch, or the process's peak resident memory on a CPU."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on a signal after checkpointing; run again with --resume auto


class StopSignals:
    """SIGUSR1 / SIGTERM request a stop after the current step (DataLoader workers ignore both)."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            log.warning("received %s: stopping after this step with a checkpoint", signal.Signals(signum).name)
        self.received = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _requeue(dist_info: DistInfo) -> None:
    """``scontrol requeue`` this job from rank 0: SLURM ends it now and starts it again (``--resume auto``)."""
    job = os.environ.get("SLURM_JOB_ID")
    if not dist_info.is_main:
        return
    if not job:
        log.warning("train.requeue is set but this is not a SLURM job (no SLURM_JOB_ID): not requeued")
        return
    # Logged before the command: SLURM starts ending the job while scontrol returns, so a line written after it
    # can be lost (it was, under torchrun, in CI).
    log.info("requeueing SLURM job %s (scontrol requeue); it resumes from the checkpoint above", job)
    done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if done.returncode:
        log.error("scontrol requeue %s failed (%d): %s", job, done.returncode, done.stderr.strip())


@contextlib.contextmanager
def _eval_mode(model, dist_info: DistInfo, cfg: RunConfig):
    """The model as an evaluation encoder, in eval mode (batch norm from its running statistics, left untouched;
    no dropout), as `clipforge eval` sees a checkpoint; back in train mode afterwards."""
    module = unwrap(model)
    module.eval()
    try:
        yield OpenClipEncoder(module, dist_info.device, AUTOCAST_DTYPES[cfg.train.precision])
    finally:
        module.train()


def _evaluate(model, built, cfg: RunConfig, dist_info: DistInfo, step: int, run_dir: Path) -> dict[str, float]:
    """Rank 0 runs the suite and writes eval/step_N.json and .md; returns the headline metrics."""
    import json

    if cfg.eval.suite is None or not dist_info.is_main:
        return {}
    with _eval_mode(model, dist_info, cfg) as encoder:
        results = run_suite(
            encoder,
            built.tokenizer,
            built.eval_transform,
            load_suite(cfg.eval.suite),
            cfg.eval.batch_size,
            cfg.eval.num_workers,
        )
    out = run_dir / "eval"
    out.mkdir(exist_ok=True)
    (out / f"step_{step:08d}.json").write_text(json.dumps(results, indent=1))
    (out / f"step_{step:08d}.md").write_text(markdown_table(results) + "\n")
    return {f"eval/{k}": v for k, v in headline(results).items()}


def _check_health(
    model,
    probe: HealthProbe | None,
    monitor: CollapseMonitor,
    cfg: RunConfig,
    dist_info: DistInfo,
    agree,
    step: int,
    logger: MetricLogger,
) -> None:
    """Rank 0 measures the held-out batch in eval mode, logs health/*, and alarms; a stop is agreed by all ranks."""
    collapsed = None
    if probe is not None:
        with _eval_mode(model, dist_info, cfg) as encoder:
            metrics = probe.measure(encoder)
        logger.log(step, metrics)
        try:
            monitor.check_embeddings(step, metrics)
        except CollapseError as exc:
            collapsed = exc
    if dist_info.is_distributed and not agree(collapsed is None):
        raise collapsed or CollapseError(
            f"step {step}: rank 0 found the embeddings collapsing (its log says which metric); health.stop_on_collapse"
        )
    if collapsed is not None:
        raise collapsed


def dry_run(cfg: RunConfig, check_inputs: bool = True) -> dict[str, Any]:
    """What a run would train: parameter counts and FLOPs per sample; with ``check_inputs``, after every check the
    real run makes before its first step (the suite file, the resume target, the sources: shards found, sample
    counts, enough shards for world size × data.num_workers), reading no sample.

    FLOPs are counted by ``torch.utils.flop_counter`` on one forward pass of each tower (one image at the
    model's size, one full-length caption); a training step costs about 3× the forward (forward + backward).
    """
    from torch.utils.flop_counter import FlopCounterMode

    built = build_model(cfg.model)
    apply_training_options(built.model, cfg.model, cfg.loss.learn_temperature)  # locks change the trainable count
    model = built.model.train()  # in eval mode attention takes a fused fast path the flop counter cannot see
    counts = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "image_tower_parameters": sum(p.numel() for p in model.visual.parameters()),
    }
    counts["text_tower_parameters"] = counts["parameters"] - counts["image_tower_parameters"]
    size = built.preprocess_cfg["size"]
    height, width = (size, size) if isinstance(size, int) else size
    context = built.model_cfg["text_cfg"].get("context_length", 77)
    flops = {}
    with torch.no_grad():
        for tower, run in (
            ("image", lambda: model.encode_image(torch.zeros(1, 3, height, width))),
            ("text", lambda: model.encode_text(torch.zeros(1, context, dtype=torch.long))),
        ):
            with FlopCounterMode(display=False) as counter:
                run()
            flops[f"{tower}_forward_gflops_per_sample"] = counter.get_total_flops() / 1e9
    forward = sum(flops.values())
    dist_info = DistInfo.from_env(os.environ)
    global_batch = cfg.data.batch_size * dist_info.world_size
    inputs = _check_inputs(cfg, built, dist_info) if check_inputs else {}
    return {
        "architecture": built.architecture,
        "image_size": [height, width],
        "context_length": context,
        **counts,
        **flops,
        "train_gflops_per_sample": 3 * forward,
        "train_pflops_total": 3 * forward * 1e9 * global_batch * cfg.train.steps / 1e15,
        **inputs,
    }


def _check_inputs(cfg: RunConfig, built, dist_info: DistInfo) -> dict[str, Any]:
    """The run's own checks of its inputs, as ``build_run`` makes them (rank 0's view of the data)."""
    from clipforge.data.pipeline import build_train_loader
    from clipforge.train.build import resolve_resume
    from clipforge.train.checkpoint import Checkpointer

    if cfg.eval.suite is not None:
        load_suite(cfg.eval.suite)
    resume = resolve_resume(cfg.train.resume, Checkpointer(Path(cfg.train.output_dir) / "checkpoints"))
    loader = build_train_loader(cfg.data, built.preprocess_cfg, built.tokenizer, 0, dist_info.world_size)
    return {
        "shards": len(loader.dataset.shards),
        "data_mode": loader.dataset.mode,
        "steps_per_epoch": loader.steps_per_epoch if loader.steps_per_epoch is not None else "unknown",
        "resume_from": str(resume) if resume else "none (fresh start)",
    }


def train(cfg: RunConfig) -> dict[str, Any]:
    """Train as configured; returns the final step, last metrics and final eval results."""
    from clipforge.config import to_yaml

    dist_info = DistInfo.from_env(os.environ)
    init_process_group(dist_info, os.environ)
    try:
        with StopSignals() as stop, contextlib.ExitStack() as cleanup:
            result = _train(cfg, dist_info, to_yaml(cfg), stop, cleanup)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()  # gloo aborts if a rank tears down while a peer still talks
        result["is_main"] = dist_info.is_main
        if result["preempted"] and cfg.train.requeue:
            _requeue(dist_info)  # after the barrier: every rank has written its part of the checkpoint
        return result
    finally:
        destroy_process_group()


def _train(
    cfg: RunConfig, dist_info: DistInfo, config_yaml: str, stop: StopSignals, cleanup: contextlib.ExitStack
) -> dict[str, Any]:
    if dist_info.is_main:
        Path(cfg.train.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.train.output_dir) / "config.yaml").write_text(config_yaml)
    _seed_everything(cfg.train.seed + dist_info.rank)
    apply_cuda_settings(cfg.train, dist_info.device)
    run = build_run(cfg, dist_info, stop_requested=lambda: stop.received is not None)
    cleanup.callback(run.loader.close)  # on return or error: the DataLoader workers stop before the process exits
    if run.resume_from is not None:
        run.checkpointer.load(run.resume_from, run.pieces)
        log.info("resumed from %s at step %d (%d samples)", run.resume_from, run.state.step, run.state.samples)
    last_step = run.state.clock.last_step(cfg.train.steps)  # train.steps unless the global batch changed
    logger = MetricLogger(
        run.run_dir, cfg.logging, last_step, run.state.step, dist_info.is_main, config=yaml.safe_load(config_yaml)
    )
    meter, guard = StepMeter(cfg, dist_info, run), NumericsGuard(cfg.train.max_nonfinite_steps, dist_info.rank)
    preempted = False
    while run.state.step < last_step:
        try:
            with meter.waiting():
                batch = next(run.loader)
        except StopRequested:  # a signal while waiting for data: every rank stops here, before the step
            preempted = True
            break
        batch = prepare_batch(batch, run.loader.transform, dist_info.device, run.channels_last, run.dynamic_text)
        out = run.step_fn(batch)
        run.state.step += 1
        step = run.state.step
        guard.record(step, out, batch)
        logger.advance()
        logging_step = step % cfg.logging.log_every == 0 or step == last_step
        abort = guard.check() if logging_step else None  # the window's one host sync for the skip flags
        if logging_step:
            logger.log(step, meter.metrics(out, guard.total))
        if cfg.health.max_clamped_steps:  # after the step's clamp; the same on every rank, so all stop together
            logit_scale = unwrap(run.model).logit_scale.detach().exp()
            run.monitor.count_clamped(logit_scale)  # on the device: no host sync in the step
            if logging_step:
                run.monitor.temperature_alarms(step, logit_scale)
        with meter.paused():  # health and evaluation time stays out of the throughput window
            if cfg.health.every_n_steps and step % cfg.health.every_n_steps == 0:
                _check_health(run.model, run.probe, run.monitor, cfg, dist_info, run.agree, step, logger)
            if cfg.eval.every_n_steps and step % cfg.eval.every_n_steps == 0 and step < last_step:
                logger.log(step, _evaluate(run.model, run.built, cfg, dist_info, step, run.run_dir))
        stop_now = stop.received is not None
        if dist_info.is_distributed:
            # one all-reduce per step: a signal or a numerics abort on any rank ends every rank at this same step
            go_on, healthy = run.agree(not stop_now, abort is None)
            stop_now = not go_on
            abort = abort or (None if healthy else guard.peer_abort(step))
        if abort is not None:
            raise abort
        if stop_now and step < last_step:
            preempted = True
            break
        if step % cfg.train.checkpoint_every == 0 and step < last_step:
            run.checkpointer.save(step, run.pieces, config_yaml)
    return _finish(cfg, dist_info, run, logger, meter, config_yaml, preempted)


def _finish(
    cfg: RunConfig,
    dist_info: DistInfo,
    run: Run,
    logger: MetricLogger,
    meter: StepMeter,
    config_yaml: str,
    preempted: bool,
) -> dict[str, Any]:
    """The final checkpoint, then (unless pre-empted) the final evaluation, curves and the result table."""
    step = run.state.step
    final = run.checkpointer.save(step, run.pieces, config_yaml)
    run.checkpointer.wait()  # the last checkpoint is on disk and `latest` before the run returns
    result = {
        "step": step,
        "checkpoint": str(final),
        "metrics": meter.last,
        "eval": {},
        "eval_table": None,
        "preempted": preempted,
    }
    if preempted:
        logger.close()
        log.warning("stopped at step %d on a signal; checkpoint %s; continue with --resume auto", step, final)
        return result
    results = _evaluate(run.model, run.built, cfg, dist_info, step, run.run_dir)
    if results:
        logger.log(step, results)
    logger.close()
    if dist_info.is_main and cfg.logging.plot:
        plot_curves(run.run_dir)
    table = run.run_dir / "eval" / f"step_{step:08d}.md"
    return {**result, "eval": results, "eval_table": table.read_text() if results and table.is_file() else None}


class NumericsGuard:
    """Counts steps whose update was skipped for a non-finite loss or gradient; too many in a row is an abort.

    The step leaves its skip flag on the device; ``record`` keeps it (with the batch's keys) and ``check``, at
    logging steps, reads the window's flags in one host sync: warnings name each skipped step, and an abort names
    the step where the run of skips reached ``train.max_nonfinite_steps`` and that batch's first keys."""

    def __init__(self, max_in_a_row: int, rank: int) -> None:
        self.max_in_a_row, self.rank = max_in_a_row, rank
        self.in_a_row, self.total = 0, 0
        self.pending: list[tuple[int, Any, Any, list[str]]] = []

    def record(self, step: int, out: dict[str, Any], batch: dict[str, Any]) -> None:
        self.pending.append((step, out["nonfinite"], out["loss"], batch.get("keys", [])[:8]))

    def check(self) -> NonFiniteError | None:
        pending, self.pending = self.pending, []
        if not pending:
            return None
        flags = torch.stack([torch.as_tensor(flag).reshape(()) for _, flag, _, _ in pending]).tolist()
        for (step, _, loss, keys), nonfinite in zip(pending, flags, strict=True):
            if not nonfinite:
                self.in_a_row = 0
                continue
            self.in_a_row, self.total = self.in_a_row + 1, self.total + 1
            log.warning(
                "step %d: non-finite loss or gradient (loss %s); update skipped (%d in a row)",
                step,
                float(loss),
                self.in_a_row,
            )
            if self.in_a_row >= self.max_in_a_row:
                return NonFiniteError(
                    f"{self.in_a_row} steps in a row with a non-finite loss or gradient, the last "
                    f"at step {step} on rank {self.rank}; its batch's first keys: {keys} "
                    "(train.max_nonfinite_steps)"
                )
        return None

    @staticmethod
    def peer_abort(step: int) -> NonFiniteError:
        return NonFiniteError(
            f"step {step}: another rank reached train.max_nonfinite_steps non-finite steps in a row "
            "(its log names the step and the batch keys); every rank stops"
        )


@contextlib.contextmanager
def _timed(record):
    started = time.perf_counter()
    try:
        yield
    finally:
        record(time.perf_counter() - started)


class StepMeter:
    """The throughput window between logging steps: samples/s, step and data-wait time, memory."""

    def __init__(self, cfg: RunConfig, dist_info: DistInfo, run: Run) -> None:
        self.cfg, self.dist_info, self.run = cfg, dist_info, run
        self.parameters = sum(p.numel() for p in run.built.model.parameters())
        self.start, self.steps, self.data_wait = time.perf_counter(), 0, 0.0
        self.last: dict[str, Any] = {}

    def waiting(self):
        """Around the wait for a batch: its time is data wait, and one more step is in the window."""
        return _timed(self._waited)

    def paused(self):
        """Around health checks and evaluation: their time stays out of the throughput window."""
        return _timed(self._paused)

    def _waited(self, seconds: float) -> None:
        self.data_wait, self.steps = self.data_wait + seconds, self.steps + 1

    def _paused(self, seconds: float) -> None:
        self.start += seconds

    def metrics(self, out: dict[str, Any], nonfinite_total: int) -> dict[str, Any]:
        """The logging step's metrics (host syncs happen here, not every step); starts a new window."""
        elapsed = time.perf_counter() - self.start
        batch_size, world_size = self.cfg.data.batch_size, self.dist_info.world_size
        scale = out["logit_scale"].item()
        self.last = {
            "train/loss": out["loss"].item(),
            "train/lr": self.run.scheduler.get_last_lr()[0],
            "train/logit_scale": scale,
            "train/temperature": 1.0 / scale,
            "train/grad_norm": out["grad_norm"].item(),
            "train/epoch": self.run.loader.epoch,
            "perf/samples_per_s": self.steps * batch_size * world_size / elapsed,
            "perf/samples_per_s_per_device": self.steps * batch_size / elapsed,
            "perf/step_time_s": elapsed / self.steps,
            "perf/compute_time_s": (elapsed - self.data_wait) / self.steps,
            "perf/max_memory_mb": _max_memory_mb(self.dist_info.device),
            "model/parameters": self.parameters,
            "perf/data_wait_fraction": self.data_wait / elapsed,
            "train/nonfinite_steps": nonfinite_total,
            **{f"data/skipped_{k}": v for k, v in self.run.loader.skipped.items()},
        }
        self.start, self.steps, self.data_wait = time.perf_counter(), 0, 0.0
        return self.last
