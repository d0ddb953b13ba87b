"""Training metrics: console, TensorBoard, a JSONL file, a progress bar, Weights & Biases (optional, through
accelerate's ``WandBTracker``), and the loss/temperature plot.

Only rank 0 writes. ``metrics.jsonl`` in the run directory holds one record per logged step and
is what ``plot_curves`` reads to draw ``curves.png`` (loss and temperature over steps). Each record is appended with
one ``write`` to a file opened ``O_APPEND``, so records never interleave mid-line; a resumed run keeps the records up
to its checkpoint's step (rewritten atomically), dropping with a warning a torn last line that a kill during an
append leaves.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

log = logging.getLogger("clipforge.train")


@dataclass
class LoggingConfig:
    """Where training metrics go, and what they are measured against."""

    log_every: int = 10
    """Log metrics every N steps."""
    profile_every: int = 0
    """Time the parts of one step every N steps (data wait, host→device copy, each tower's forward, loss, backward,
    optimizer): logged as time/* at the next logging step, with a one-line diagnosis when one part dominates. CUDA
    events on a GPU, the wall clock on a CPU; a synchronisation before and after the profiled step only. 0 = off
    (no cost)."""
    trace_steps: str | None = None
    """torch.profiler trace of these steps, 'FIRST-LAST' (e.g. '20-22') or 'STEP', written to RUN_DIR/traces for
    TensorBoard's profile plugin or ui.perfetto.dev. None = no trace."""
    tensorboard: bool = True
    """Write TensorBoard event files to RUN_DIR/tensorboard."""
    progress_bar: bool = True
    """Show a progress bar with ETA on rank 0 (when stderr is a terminal; in a log file each step line ends
    with the ETA instead)."""
    plot: bool = True
    """Write RUN_DIR/curves.png (loss and temperature over steps) at the end of training, and at each evaluation
    RUN_DIR/eval/step_N_DATASET_segmentation.png (input, true and predicted masks) for each segmentation set."""
    wandb: bool = False
    """Also log to Weights & Biases (needs `pip install wandb`; offline with WANDB_MODE=offline). A resumed run
    continues the same W&B run."""
    wandb_project: str = "clipforge"
    """W&B project."""
    wandb_run_name: str | None = None
    """W&B run name (None = the run directory's name)."""
    peak_tflops: float | None = None
    """The device's dense peak TFLOP/s at this precision, for perf/mfu. None: from the table of known GPUs
    (A100, H100, H200, L40S; TF32 for fp32 runs with train.tf32), or on a CPU a GEMM probe of this machine at the
    run's dtype, measured once and cached in ~/.cache/clipforge (clipforge.train.peak)."""

    def __post_init__(self) -> None:
        if self.log_every <= 0:
            raise ValueError(f"logging.log_every: must be positive, got {self.log_every}")
        if self.profile_every < 0:
            raise ValueError(f"logging.profile_every: must be >= 0 (0 = off), got {self.profile_every}")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise ValueError(f"logging.peak_tflops: must be positive, got {self.peak_tflops}")
        if self.trace_steps is not None:
            from clipforge.train.profile import parse_steps

            parse_steps(self.trace_steps)
        if self.wandb and importlib.util.find_spec("wandb") is None:
            raise ValueError("logging.wandb=true needs the wandb package: pip install wandb")


class MetricLogger:
    def __init__(
        self,
        run_dir: Path,
        cfg: LoggingConfig,
        total_steps: int,
        start_step: int,
        enabled: bool,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.enabled, self.cfg = enabled, cfg
        self.total_steps, self.start_step, self.started = total_steps, start_step, time.monotonic()
        self.writer = None
        self.bar = None
        self.jsonl = None
        self.wandb = None
        if not enabled:
            return
        if cfg.wandb:
            self.wandb = _start_wandb(run_dir, cfg, config or {})
        path = run_dir / "metrics.jsonl"
        kept = _records_until(path, start_step) if start_step > 0 and path.is_file() else []
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.write_text("".join(line + "\n" for line in kept))
        os.replace(temporary, path)  # resumed: what was logged after the checkpoint is dropped, atomically
        self.jsonl = open(path, "ab", buffering=0)  # O_APPEND, unbuffered: one write() per record
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        if cfg.progress_bar and sys.stderr.isatty():  # in a log file (SLURM) the step lines carry the ETA instead
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **metrics}
        self.jsonl.write((json.dumps(record) + "\n").encode())
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        if self.writer is not None:
            for key, value in numbers.items():
                self.writer.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(numbers, step=step)
        text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
        if self.bar is not None:
            self.bar.set_postfix(loss=metrics.get("train/loss"), refresh=False)
            self.bar.write(f"step {step}: {text}")
        else:
            log.info("step %d/%d%s: %s", step, self.total_steps, self._eta(step), text)

    def _eta(self, step: int) -> str:
        done = step - self.start_step
        if done <= 0:
            return ""
        remaining = (time.monotonic() - self.started) / done * (self.total_steps - step)
        return f" (eta {datetime.timedelta(seconds=round(remaining))})"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.wandb is not None:
            self.wandb.finish()


def _records_until(path: Path, step: int) -> list[str]:
    """The lines of ``path`` (metrics.jsonl) whose record is at or before ``step``. A line that is not a JSON record
    with a step (the torn last line of a run killed during an append) is dropped with a warning naming the file."""
    kept, dropped = [], []
    lines = path.read_text(errors="replace").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            record_step = int(record["step"])
        except (ValueError, TypeError, KeyError):
            dropped.append(number)
            continue
        if record_step <= step:
            kept.append(line)
    if dropped:
        torn = dropped == [len(lines)]
        log.warning(
            "%s: dropped %s (%s); the file is valid JSONL again",
            path,
            f"its torn last line {dropped[0]}" if torn else f"{len(dropped)} unreadable line(s) {dropped[:5]}",
            "a kill during an append leaves one" if torn else "two writers, or damage",
        )
    return kept


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (bool, int, float, str, type(None))) else str(value)
    return flat


def _start_wandb(run_dir: Path, cfg: LoggingConfig, config: dict[str, Any]):
    """accelerate's WandBTracker, resuming the run whose id is kept in RUN_DIR/wandb_id.txt."""
    from accelerate import PartialState
    from accelerate.tracking import WandBTracker

    PartialState()  # accelerate's trackers log through its state; it adopts our already-initialised process group

    id_file = run_dir / "wandb_id.txt"
    run_id = id_file.read_text().strip() if id_file.is_file() else None
    tracker = WandBTracker(
        cfg.wandb_project, name=cfg.wandb_run_name or run_dir.name, dir=str(run_dir), id=run_id, resume="allow"
    )
    tracker.start()
    id_file.write_text(tracker.run.id + "\n")
    tracker.store_init_configuration(_flatten(config))
    return tracker


def plot_curves(run_dir: Path) -> Path:
    """curves.png (1000 × 400 px; 1500 × 400 with health metrics): training loss and temperature (1/logit_scale)
    against step, and alignment / uniformity of the held-out batch when ``health.every_n_steps`` measured them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    all_records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    records = [r for r in all_records if "train/loss" in r]
    health = [r for r in all_records if "health/alignment" in r]
    steps = [r["step"] for r in records]
    figure, axes = plt.subplots(1, 3 if health else 2, figsize=(15 if health else 10, 4))
    loss_axis, temp_axis = axes[0], axes[1]
    loss_axis.plot(steps, [r["train/loss"] for r in records])
    loss_axis.set(xlabel="step", ylabel="contrastive loss", title="training loss")
    temp_axis.plot(steps, [r["train/temperature"] for r in records], color="tab:orange")
    temp_axis.set(xlabel="step", ylabel="temperature (1 / logit scale)", title="temperature")
    if health:
        health_steps = [r["step"] for r in health]
        axes[2].plot(
            health_steps, [r["health/alignment"] for r in health], marker="o", label="alignment (lower: pairs closer)"
        )
        for modality, style in (("image", "--"), ("text", ":")):
            axes[2].plot(
                health_steps,
                [r[f"health/uniformity_{modality}"] for r in health],
                style,
                marker="s",
                label=f"uniformity {modality} (lower: more spread)",
            )
        axes[2].set(xlabel="step", ylabel="Wang & Isola (2020)", title="held-out alignment / uniformity")
        axes[2].legend(fontsize=8)
    figure.tight_layout()
    out = run_dir / "curves.png"
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out
