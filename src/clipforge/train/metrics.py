"""Training metrics: console, TensorBoard, a JSONL file, a progress bar, and the loss/temperature plot.

Only rank 0 writes. ``metrics.jsonl`` in the run directory holds one record per logged step and
is what ``plot_curves`` reads to draw ``curves.png`` (loss and temperature over steps).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

log = logging.getLogger("clipforge.train")


@dataclass
class LoggingConfig:
    """Where training metrics go."""

    log_every: int = 10
    """Log metrics every N steps."""
    tensorboard: bool = True
    """Write TensorBoard event files to RUN_DIR/tensorboard."""
    progress_bar: bool = True
    """Show a progress bar with ETA on rank 0."""
    plot: bool = True
    """Write RUN_DIR/curves.png (loss and temperature over steps) at the end of training."""

    def __post_init__(self) -> None:
        if self.log_every <= 0:
            raise ValueError(f"logging.log_every: must be positive, got {self.log_every}")


class MetricLogger:
    def __init__(self, run_dir: Path, cfg: LoggingConfig, total_steps: int, start_step: int, enabled: bool) -> None:
        self.enabled, self.cfg = enabled, cfg
        self.writer = None
        self.bar = None
        self.jsonl = None
        if not enabled:
            return
        path = run_dir / "metrics.jsonl"
        kept = []
        if start_step > 0 and path.is_file():  # resumed: drop what was logged after the checkpoint
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= start_step]
        self.jsonl = open(path, "w")
        self.jsonl.writelines(line + "\n" for line in kept)
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        if cfg.progress_bar:
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **metrics}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, step)
        text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
        if self.bar is not None:
            self.bar.set_postfix(loss=metrics.get("train/loss"), refresh=False)
            self.bar.write(f"step {step}: {text}")
        else:
            log.info("step %d: %s", step, text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()


def plot_curves(run_dir: Path) -> Path:
    """curves.png: training loss and temperature (1/logit_scale) against step, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    records = [r for r in records if "train/loss" in r]
    steps = [r["step"] for r in records]
    figure, (loss_axis, temp_axis) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axis.plot(steps, [r["train/loss"] for r in records])
    loss_axis.set(xlabel="step", ylabel="contrastive loss", title="training loss")
    temp_axis.plot(steps, [r["train/temperature"] for r in records], color="tab:orange")
    temp_axis.set(xlabel="step", ylabel="temperature (1 / logit scale)", title="temperature")
    figure.tight_layout()
    out = run_dir / "curves.png"
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out
