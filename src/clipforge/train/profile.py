"""Where a step's time goes: a per-part breakdown of one step every ``logging.profile_every``, and
``torch.profiler`` traces of ``logging.trace_steps``.

The loop and the step strategies mark their parts with ``recorder.part(name)``; the recorder the loop gets for a
step is ``OFF`` (every call a no-op, no clock read, no synchronisation) unless that step is profiled or traced.
A profiled step is timed with CUDA events on a GPU (one synchronisation, at the end of the step, to read them; one
before it, so that earlier queued work is not charged to it) and with the wall clock on a CPU, whose kernels run
synchronously. The parts, in order:

* ``data_wait``: waiting for the loader's next batch; ``copy``: host → device and the on-device normalisation;
* ``image_forward``, ``text_forward``: each tower's forward (the image tower is timed by hooks on ``model.visual``,
  installed for the profiled step only; the text tower is the rest of the forward); a compiled model is one graph
  (hooks would recompile it), so its forward is one part, ``forward``;
* ``loss``: the objectives (the contrastive loss, including its all-gathers across ranks, and every extra term);
  within it each objective's forward is its own part, ``loss/NAME`` (``loss/contrastive``, ``loss/locca``,
  ``loss/self_distillation``), a share of ``loss`` rather than a part beside it (their backward is in ``backward``);
* ``backward``: the backward pass, including DDP's gradient all-reduces, which overlap it (not separable);
* ``optimizer``: gradient norm and clipping, AdamW, schedule, temperature clamp;
* ``other``: the rest of the step (bookkeeping, logging, the per-step agreement between ranks).

GradCache (``train.accum_steps``) times its feature pass as the forward and its re-forward + backward of each
micro-batch as the backward.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("clipforge.train")

PARTS = ("data_wait", "copy", "image_forward", "text_forward", "loss", "backward", "optimizer", "other")
UNSPLIT_PARTS = ("data_wait", "copy", "forward", "loss", "backward", "optimizer", "other")


class _NoPart:
    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> None:
        return None


_NO_PART = _NoPart()


class OffRecorder:
    """A step that is neither profiled nor traced: every method does nothing."""

    active = False

    def part(self, name: str) -> _NoPart:
        return _NO_PART

    def forward(self, model: torch.nn.Module) -> _NoPart:
        return _NO_PART

    def finish(self) -> None:
        return None


OFF = OffRecorder()


class _WallClock:
    """Marks in host seconds: a CPU's kernels have finished when the call returns."""

    def mark(self) -> float:
        return time.perf_counter()

    def seconds(self, start: float, end: float) -> float:
        return end - start

    def synchronize(self) -> None:
        return None


class _CudaEvents:
    """Marks as CUDA events on the current stream; read after one synchronisation at the end of the step."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def mark(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start: torch.cuda.Event, end: torch.cuda.Event) -> float:
        return start.elapsed_time(end) / 1000

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)


class StepRecorder:
    """Times the parts of one step; ``finish`` gives the breakdown in seconds (``PARTS``, ``other`` the rest)."""

    active = True

    def __init__(
        self, step: int, device: str, on_finish: Callable[[StepRecorder], None], split_towers: bool = True
    ) -> None:
        self.step, self.on_finish, self.split_towers = step, on_finish, split_towers
        self.clock = _CudaEvents(torch.device(device)) if device.startswith("cuda") else _WallClock()
        self.clock.synchronize()  # queued work of earlier steps is not this step's
        self.spans: list[tuple[str, Any, Any]] = []
        self.begin = self.clock.mark()
        self.breakdown: dict[str, float] = {}

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        start = self.clock.mark()
        try:
            yield
        finally:
            self.spans.append((name, start, self.clock.mark()))

    @contextlib.contextmanager
    def forward(self, model: torch.nn.Module) -> Iterator[None]:
        """The forward, split into the image tower's (hooks on ``model.visual``) and the rest (the text tower's)."""
        visual = getattr(getattr(model, "module", model), "visual", None)
        handles = []
        if visual is not None and self.split_towers:
            opened: list[Any] = []
            handles = [
                visual.register_forward_pre_hook(lambda *_: opened.append(self.clock.mark())),
                visual.register_forward_hook(
                    lambda *_: self.spans.append(("image_forward", opened.pop(), self.clock.mark()))
                ),
            ]
        try:
            with self.part("forward"):
                yield
        finally:
            for handle in handles:
                handle.remove()

    def finish(self) -> None:
        end = self.clock.mark()
        self.clock.synchronize()
        seconds = dict.fromkeys(PARTS if self.split_towers else UNSPLIT_PARTS, 0.0)
        for name, start, stop in self.spans:
            seconds[name] = seconds.get(name, 0.0) + self.clock.seconds(start, stop)
        if self.split_towers:  # the forward less the image tower's share is the text tower's
            seconds["text_forward"] = max(0.0, seconds.pop("forward", 0.0) - seconds["image_forward"])
        total = self.clock.seconds(self.begin, end)
        # an objective's loss/NAME lies inside loss: not counted twice
        counted = sum(value for name, value in seconds.items() if name != "other" and "/" not in name)
        seconds["other"] = max(0.0, total - counted)
        self.breakdown = {**seconds, "step": total}
        self.on_finish(self)


def parse_steps(steps: str | None) -> tuple[int, int] | None:
    """``logging.trace_steps``: "A-B" (steps A to B, both included) or "A"; None: no trace."""
    if steps is None:
        return None
    text = str(steps).strip()
    first, _, last = text.partition("-")
    try:
        span = int(first), int(last or first)
    except ValueError:
        raise ValueError(
            f"logging.trace_steps: expected 'FIRST-LAST' or 'STEP' (e.g. '20-22'), got {steps!r}"
        ) from None
    if not 1 <= span[0] <= span[1]:
        raise ValueError(f"logging.trace_steps: need 1 <= FIRST <= LAST, got {steps!r}")
    return span


class StepProfiler:
    """Chooses the recorder of each step: a ``StepRecorder`` every ``profile_every`` steps and on the traced steps
    (whose ``torch.profiler`` trace goes to ``trace_dir`` as TensorBoard / Perfetto JSON), else ``OFF``."""

    def __init__(
        self, profile_every: int, trace_steps: str | None, device: str, trace_dir: Path, split_towers: bool = True
    ) -> None:
        self.profile_every, self.trace, self.split_towers = profile_every, parse_steps(trace_steps), split_towers
        self.device, self.trace_dir = device, trace_dir
        self.last: dict[str, float] | None = None
        self._tracer = None

    def recorder(self, step: int) -> OffRecorder | StepRecorder:
        traced = self.trace is not None and self.trace[0] <= step <= self.trace[1]
        if traced and self._tracer is None:
            self._start_trace()
        if not traced and not (self.profile_every and step % self.profile_every == 0):
            return OFF
        return StepRecorder(step, self.device, self._finished, self.split_towers)

    def _finished(self, recorder: StepRecorder) -> None:
        self.last = recorder.breakdown
        if self._tracer is not None:
            self._tracer.step()
            if recorder.step >= self.trace[1]:
                self.close()

    def take(self) -> dict[str, float] | None:
        """The latest profiled step's breakdown since the last call (None: none)."""
        last, self.last = self.last, None
        return last

    def _start_trace(self) -> None:
        from torch.profiler import ProfilerActivity, profile, tensorboard_trace_handler

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.startswith("cuda") else [])
        self.trace_dir.mkdir(parents=True, exist_ok=True)
        self._tracer = profile(
            activities=activities,
            record_shapes=True,
            with_stack=False,
            on_trace_ready=tensorboard_trace_handler(str(self.trace_dir)),
        )
        self._tracer.__enter__()
        log.info("torch.profiler: tracing steps %d-%d into %s", *self.trace, self.trace_dir)

    def close(self) -> None:
        """Writes the trace of a traced range the run left early (or just finished)."""
        tracer, self._tracer = self._tracer, None
        if tracer is not None:
            tracer.__exit__(None, None, None)
            log.info(
                "torch.profiler trace written to %s (TensorBoard's profile plugin, or ui.perfetto.dev)", self.trace_dir
            )


@dataclass
class Setting:
    """What a diagnosis may suggest changing, as the run has it."""

    num_workers: int
    cpu_count: int
    image_size: int
    world_size: int
    fused_optimizer: bool
    median_image_side: str | None = None  # the median's bin of `clipforge prep inspect`'s shorter-side histogram


# a part past its share of the step is named, with what to try; compute (forward, backward) is what a step is for
THRESHOLDS = {"data_wait": 0.2, "copy": 0.15, "loss": 0.3, "optimizer": 0.25, "other": 0.2}
LABELS = {
    "data_wait": "data wait",
    "copy": "host→device copy",
    "loss": "loss",
    "optimizer": "optimizer",
    "other": "time outside the step's parts",
}


def diagnose(breakdown: dict[str, float], setting: Setting) -> str | None:
    """One line naming the part that most exceeds its share of the step (``THRESHOLDS``) and what to try; None
    when none does."""
    total = breakdown.get("step", 0.0)
    if total <= 0:
        return None
    over = [
        (breakdown[name] / total / limit, name)
        for name, limit in THRESHOLDS.items()
        if breakdown.get(name, 0.0) / total >= limit
    ]
    if not over:
        return None
    name = max(over)[1]
    return f"{LABELS[name]} {breakdown[name] / total:.0%} of step: {_advice(name, setting)}"


def _advice(name: str, setting: Setting) -> str:
    if name == "data_wait":
        workers = f"raise data.num_workers (have {setting.num_workers}, {setting.cpu_count} cores)"
        side = setting.median_image_side
        if side is None:
            return f"{workers}; `clipforge prep inspect` shows whether the images are larger than the training size"
        smallest = int(side.lstrip("<>=").split("-")[0])
        if smallest >= 2 * setting.image_size:
            return (
                f"{workers} or pre-resize shards (median image {side} px on its shorter side for "
                f"{setting.image_size} px training)"
            )
        return f"{workers} (the images are already near the training size: median {side} px shorter side)"
    if name == "copy":
        return "batches should arrive in pinned memory as uint8 and be normalised on the device (the loader's GPU path)"
    if name == "loss":
        gathers = f"its all-gathers over {setting.world_size} ranks, " if setting.world_size > 1 else ""
        return f"{gathers}or a batch large against the model: loss.tile_size trades memory for this time"
    if name == "optimizer":
        kernel = "fused AdamW" if setting.fused_optimizer else "foreach AdamW: set optim.fused=true"
        return f"{kernel}; a small model for its batch: a larger data.batch_size spreads the update over more samples"
    return "logging, checkpoints, health checks or host syncs between steps (a trace shows which: logging.trace_steps)"


def median_image_side(shards: list[str]) -> str | None:
    """The median bin of the shorter-side histogram that `clipforge prep inspect` wrote beside the first local shard
    (``_stats.json``, key ``inspect``); None where there is none."""
    import json

    if not shards or "://" in shards[0] or shards[0].startswith("pipe:"):
        return None
    stats = Path(shards[0]).parent / "_stats.json"
    try:
        histogram = json.loads(stats.read_text())["inspect"]["image_shorter_side"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    counts = list(histogram.items())
    half, seen = sum(count for _, count in counts) / 2, 0
    for label, count in counts:
        seen += count
        if seen >= half and seen > 0:
            return label
    return None
