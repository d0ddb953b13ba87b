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
from pathlib import Path
from typing import Any

import torch
import yaml

from clipforge.data.pipeline import StopRequested
from clipforge.distributed import DistInfo, destroy_process_group, init_process_group
from clipforge.evaluation import OpenClipEncoder, load_suite, markdown_table, run_suite
from clipforge.evaluation.report import segmentation_plots
from clipforge.evaluation.suite import check_model, headline
from clipforge.train.build import Run, build_run
from clipforge.train.config import RunConfig
from clipforge.train.health import CollapseError, CollapseMonitor, HealthProbe
from clipforge.train.lock import hold_run_dir
from clipforge.train.meter import StepMeter, meter_for_run
from clipforge.train.metrics import MetricLogger, plot_curves
from clipforge.train.parallel import unwrap
from clipforge.train.preflight import check_output_dir
from clipforge.train.step import AUTOCAST_DTYPES

log = logging.getLogger("clipforge.train")


def apply_cuda_settings(cfg: RunConfig, device: str) -> None:
    """train.tf32 and speed.cudnn_benchmark, process-wide torch settings, on a CUDA device only."""
    if not device.startswith("cuda"):
        return
    if cfg.train.tf32 and cfg.train.precision == "fp32":
        torch.set_float32_matmul_precision("high")
    if cfg.speed.cudnn_benchmark:
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


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on a signal after checkpointing; run again with --resume auto
EXIT_ABORTED = 130  # 128 + SIGINT: a second Ctrl-C stopped the run at once, without a checkpoint of its step


class StopSignals:
    """SIGINT (Ctrl-C), SIGUSR1 and SIGTERM request a stop after the current step, with a checkpoint (DataLoader
    workers ignore all three). A second SIGINT aborts at once: ``KeyboardInterrupt`` in the main thread, which
    ``train`` turns into exit code 130. A SIGINT within ``REPEAT_S`` of the first is not a second one: a terminal's
    Ctrl-C reaches a launcher and its ranks together, and torchrun forwards it to the ranks again."""

    SIGNALS = (signal.SIGINT, signal.SIGUSR1, signal.SIGTERM)
    REPEAT_S = 1.0

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict = {}
        self._interrupted_at: float | None = None
        self._pid = os.getpid()

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:  # a forked child (a DataLoader worker before it ignores signals) has no say
            return
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self._interrupted_at is not None and now - self._interrupted_at > self.REPEAT_S:
                raise KeyboardInterrupt
            self._interrupted_at = self._interrupted_at or now
        if self.received is None:
            more = "; Ctrl-C again to abort at once" if signum == signal.SIGINT else ""
            log.warning("received %s: stopping after this step with a checkpoint%s", signal.Signals(signum).name, more)
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
    # can be lost (under torchrun, whose agent is killed with the job step).
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
    """Rank 0 runs the suite and writes eval/step_N.json and .md, and with logging.plot each segmentation set's
    examples (eval/step_N_NAME_segmentation.png); returns the headline metrics."""
    import json

    if cfg.eval.suite is None or not dist_info.is_main:
        return {}
    examples = {} if cfg.logging.plot else None
    with _eval_mode(model, dist_info, cfg) as encoder:
        results = run_suite(
            encoder,
            built.tokenizer,
            built.eval_transform,
            load_suite(cfg.eval.suite),
            cfg.eval.batch_size,
            cfg.eval.num_workers,
            examples=examples,
        )
    out = run_dir / "eval"
    out.mkdir(exist_ok=True)
    (out / f"step_{step:08d}.json").write_text(json.dumps(results, indent=1))
    (out / f"step_{step:08d}.md").write_text(markdown_table(results) + "\n")
    segmentation_plots(results, examples, out, f"step_{step:08d}")
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


def train(cfg: RunConfig, take_over_lock: bool = False) -> dict[str, Any]:
    """Train as configured; returns the final step, last metrics and final eval results. Rank 0 holds the run
    directory's lock (``clipforge.train.lock``) throughout; ``take_over_lock`` takes it from a holder on another host
    that cannot be checked. A second Ctrl-C exits at once with ``EXIT_ABORTED`` (``SystemExit``)."""
    from clipforge.config import to_yaml

    dist_info = DistInfo.from_env(os.environ)
    check_output_dir(cfg.train.output_dir)  # before the process group and the run directory's lock
    init_process_group(dist_info, os.environ)
    try:
        with (
            StopSignals() as stop,
            hold_run_dir(cfg.train.output_dir, dist_info, os.environ, take_over_lock),
            contextlib.ExitStack() as cleanup,
        ):
            result = _train(cfg, dist_info, to_yaml(cfg), stop, cleanup)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()  # gloo aborts if a rank tears down while a peer still talks
        result["is_main"] = dist_info.is_main
        if result["preempted"] and cfg.train.requeue:
            _requeue(dist_info)  # after the barrier: every rank has written its part of the checkpoint
        return result
    except KeyboardInterrupt:  # the second Ctrl-C: what was being written was removed, `latest` is untouched
        log.error(
            "aborted on a second Ctrl-C: no checkpoint of this step; continue from the newest one with --resume auto"
        )
        raise SystemExit(EXIT_ABORTED) from None
    finally:
        destroy_process_group()


def _train(
    cfg: RunConfig, dist_info: DistInfo, config_yaml: str, stop: StopSignals, cleanup: contextlib.ExitStack
) -> dict[str, Any]:
    if dist_info.is_main:
        Path(cfg.train.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.train.output_dir) / "config.yaml").write_text(config_yaml)
    _seed_everything(cfg.train.seed + dist_info.rank)
    apply_cuda_settings(cfg, dist_info.device)
    run = build_run(cfg, dist_info, stop_requested=lambda: stop.received is not None)
    cleanup.callback(run.loader.close)  # on return or error: the DataLoader workers stop before the process exits
    if cfg.eval.suite is not None:  # a tower the suite's dense tasks cannot read fails now, not after training
        check_model(load_suite(cfg.eval.suite, check=False), OpenClipEncoder(unwrap(run.model)))
    if dist_info.is_main:  # this run holds the run directory's lock: a partial checkpoint left here is a dead run's
        for partial in run.checkpointer.discard_partial():
            log.info("removed %s, a checkpoint an earlier run did not finish", partial)
    if run.resume_from is not None:
        run.checkpointer.load(run.resume_from, run.pieces)
        log.info("resumed from %s at step %d (%d samples)", run.resume_from, run.state.step, run.state.samples)
    last_step = run.state.clock.last_step(cfg.train.steps)  # train.steps unless the global batch changed
    logger = MetricLogger(
        run.run_dir, cfg.logging, last_step, run.state.step, dist_info.is_main, config=yaml.safe_load(config_yaml)
    )
    meter, guard = meter_for_run(cfg, dist_info, run), NumericsGuard(cfg.train.max_nonfinite_steps, dist_info.rank)
    cleanup.callback(meter.close)  # a trace of steps the run did not reach is still written
    preempted = False
    while run.state.step < last_step:
        recorder = meter.recorder(run.state.step + 1)  # times the step's parts if it is profiled, else a no-op
        try:
            with meter.waiting(), recorder.part("data_wait"):
                batch = next(run.loader)
        except StopRequested:  # a signal while waiting for data: every rank stops here, before the step
            preempted = True
            break
        with recorder.part("copy"):
            batch = prepare_batch(batch, run.loader.transform, dist_info.device, run.channels_last, run.dynamic_text)
        out = run.step_fn(batch, recorder)
        meter.stepped(batch, recorder, run.state.step)
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
        if step % cfg.checkpoint.every == 0 and step < last_step:
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
