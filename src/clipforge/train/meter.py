"""What the loop measures between logging steps: throughput, model TFLOP/s and MFU, data wait, memory, and the
step-time breakdown of profiled steps.

Model FLOPs come from ``clipforge.train.flops`` (the count ``--dry-run`` reports), charged per step at the
batch's own caption length; the peak from ``clipforge.train.peak``. Only rank 0 counts and probes: only it logs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import TYPE_CHECKING, Any

import torch

from clipforge.distributed import DistInfo
from clipforge.train.config import RunConfig
from clipforge.train.flops import TrainFlops, count_train_flops
from clipforge.train.peak import cache_file, peak_tflops
from clipforge.train.profile import OffRecorder, Setting, StepProfiler, StepRecorder, diagnose, median_image_side

if TYPE_CHECKING:
    from clipforge.train.build import Run

log = logging.getLogger("clipforge.train")


def max_memory_mb(device: str) -> float:
    """Peak accelerator memory allocated by torch, or the process's peak resident memory on a CPU."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


@contextlib.contextmanager
def _timed(record):
    started = time.perf_counter()
    try:
        yield
    finally:
        record(time.perf_counter() - started)


class StepMeter:
    """The throughput window between logging steps: samples/s, model TFLOP/s and MFU, step and data-wait time,
    memory; ``recorder(step)`` times a profiled step's parts (``logging.profile_every``, ``logging.trace_steps``).

    It takes the runtime objects it reads, by keyword: the scheduler (the logged learning rate), the loader (its
    epoch and skip counts), the FLOP count (None on ranks that do not log) and peak, the profiler and the setting
    its diagnosis reads. ``meter_for_run`` builds it from a run's config and parts."""

    def __init__(
        self,
        *,
        batch_size: int,
        dist_info: DistInfo,
        parameters: int,
        scheduler,
        loader,
        profiler: StepProfiler,
        setting: Setting,
        train_flops: TrainFlops | None = None,
        peak: float = 0.0,
    ) -> None:
        self.batch_size, self.dist_info, self.parameters = batch_size, dist_info, parameters
        self.scheduler, self.loader, self.profiler, self.setting = scheduler, loader, profiler, setting
        self.train_flops, self.peak, self.warned = train_flops, peak, False
        self.start, self.steps, self.data_wait, self.flops = time.perf_counter(), 0, 0.0, 0.0
        self.last: dict[str, Any] = {}

    def recorder(self, step: int) -> OffRecorder | StepRecorder:
        """The recorder of ``step``'s parts: a no-op (``profile.OFF``) unless the step is profiled or traced."""
        return self.profiler.recorder(step)

    def waiting(self):
        """Around the wait for a batch: its time is data wait, and one more step is in the window."""
        return _timed(self._waited)

    def paused(self):
        """Around health checks and evaluation: their time stays out of the throughput window."""
        return _timed(self._paused)

    def stepped(self, batch: dict[str, Any], recorder: OffRecorder | StepRecorder, step: int | None = None) -> None:
        """After the step that followed ``step`` optimizer steps: its model FLOPs (at the batch's caption length,
        trimmed or not; the loss terms on at that step); ends a profiled step."""
        if self.train_flops is not None:
            texts = batch["texts"]
            self.flops += texts.shape[0] * self.train_flops.train(texts.shape[1], step)
        recorder.finish()

    def close(self) -> None:
        """Writes a trace the run left before its last traced step."""
        self.profiler.close()

    def _waited(self, seconds: float) -> None:
        self.data_wait, self.steps = self.data_wait + seconds, self.steps + 1

    def _paused(self, seconds: float) -> None:
        self.start += seconds

    def metrics(self, out: dict[str, Any], nonfinite_total: int) -> dict[str, Any]:
        """The logging step's metrics (host syncs happen here, not every step); starts a new window."""
        elapsed = time.perf_counter() - self.start
        batch_size, world_size = self.batch_size, self.dist_info.world_size
        scale = out["logit_scale"].item()
        self.last = {
            "train/loss": out["loss"].item(),
            **{f"train/{name}": value.item() for name, value in out.get("terms", {}).items()},  # each objective's
            "train/lr": self.scheduler.get_last_lr()[0],
            "train/logit_scale": scale,
            "train/temperature": 1.0 / scale,
            "train/grad_norm": out["grad_norm"].item(),
            "train/epoch": self.loader.epoch,
            "perf/samples_per_s": self.steps * batch_size * world_size / elapsed,
            "perf/samples_per_s_per_device": self.steps * batch_size / elapsed,
            "perf/step_time_s": elapsed / self.steps,
            "perf/compute_time_s": (elapsed - self.data_wait) / self.steps,
            "perf/max_memory_mb": max_memory_mb(self.dist_info.device),
            "model/parameters": self.parameters,
            "perf/data_wait_fraction": self.data_wait / elapsed,
            "train/nonfinite_steps": nonfinite_total,
            **{f"data/skipped_{k}": v for k, v in self.loader.skipped.items()},
            **self._model_flops(elapsed),
            **self._breakdown(),
        }
        self.start, self.steps, self.data_wait, self.flops = time.perf_counter(), 0, 0.0, 0.0
        return self.last

    def _model_flops(self, elapsed: float) -> dict[str, float]:
        if self.train_flops is None:
            return {}
        tflops = self.flops / elapsed / 1e12
        if self.peak and tflops > self.peak and not self.dist_info.device.startswith("cuda") and not self.warned:
            self.warned = True
            log.warning(
                "perf/mfu above 1: the GEMM peak (%.3g TFLOP/s, the best probe seen in %s) was measured while the "
                "machine was busy; the next run's probe replaces it if the machine is quieter",
                self.peak,
                cache_file(),
            )
        return {"perf/model_tflops_per_device": tflops, **({"perf/mfu": tflops / self.peak} if self.peak else {})}

    def _breakdown(self) -> dict[str, float]:
        """``time/*`` of the latest profiled step, in seconds, and a one-line diagnosis when a part dominates."""
        breakdown = self.profiler.take()
        if breakdown is None:
            return {}
        diagnosis = diagnose(breakdown, self.setting)
        if diagnosis and self.dist_info.is_main:
            log.warning("where the time goes: %s", diagnosis)
        return {f"time/{name}_s": seconds for name, seconds in breakdown.items()}


def meter_for_run(cfg: RunConfig, dist_info: DistInfo, run: Run) -> StepMeter:
    """The run's meter: the FLOP count and the peak (rank 0 only: only it logs), the profiler and the setting."""
    train_flops, peak = None, 0.0
    if dist_info.is_main:
        train_flops = count_train_flops(
            cfg.model,
            cfg.loss.learn_temperature,
            cfg.speed.pooled_last_block,
            loss=cfg.loss,
            total_steps=cfg.train.steps,
        )
        peak, source = peak_tflops(dist_info.device, cfg.train.precision, cfg.train.tf32, cfg.logging.peak_tflops)
        log.info(
            "model FLOPs per sample (forward + backward): %.3g G at full caption length; MFU peak: %s",
            train_flops.train() / 1e9,
            f"{peak:.4g} TFLOP/s per device ({source})" if peak else source,
        )
    profiler = StepProfiler(
        cfg.logging.profile_every,
        cfg.logging.trace_steps,
        dist_info.device,
        run.run_dir / "traces",
        split_towers=not cfg.speed.compile,  # hooks on a compiled model's tower would recompile it
    )
    optimizer = getattr(run.step_fn, "optimizer", None)
    setting = Setting(
        num_workers=cfg.data.num_workers,
        cpu_count=os.cpu_count() or 1,
        image_size=max(_as_pair(run.built.preprocess_cfg["size"])),
        world_size=dist_info.world_size,
        fused_optimizer=bool(optimizer and optimizer.defaults.get("fused")),
        median_image_side=median_image_side(list(run.loader.dataset.shards)) if cfg.logging.profile_every else None,
    )
    return StepMeter(
        batch_size=cfg.data.batch_size,
        dist_info=dist_info,
        parameters=sum(p.numel() for p in run.built.model.parameters()),
        scheduler=run.scheduler,
        loader=run.loader,
        profiler=profiler,
        setting=setting,
        train_flops=train_flops,
        peak=peak,
    )


def _as_pair(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
