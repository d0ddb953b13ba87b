"""The build step: a ``RunConfig`` and the launch environment become the components of a run, before any step.

Each component gets its own sub-config and the runtime objects it needs (``DistInfo``, the run's device mesh, the
agreement function, the stop signals), never the whole config. The mesh (``clipforge.distributed.build_mesh``) is
built once, here, and every component that talks to the other ranks takes it: the data-parallel wrapper, the
objectives (``ObjectiveContext.mesh``), the ranks' agreement and the checkpointer. ``build_run`` checks what can
fail cheaply first (the suite file, the resume target, the data plan: shards, sample counts, enough shards for the
readers; ``clipforge.train.preflight`` makes the same checks without a run) and returns a ``Run``: the prepared
model, the step strategy, the loader, the restart state (``clipforge.train.state``), the checkpointer and the health
monitor.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.distributed.device_mesh import DeviceMesh

from clipforge.data.loader import TrainLoader, build_train_loader
from clipforge.data.pipeline import plan_data
from clipforge.distributed import DistInfo, build_mesh, make_agreement
from clipforge.evaluation import load_suite
from clipforge.losses import ObjectiveContext, Objectives, build_objectives
from clipforge.model_loading import load_init_weights
from clipforge.models import BuiltModel, build_model
from clipforge.models.outputs import needs_every_token
from clipforge.train.checkpoint import Checkpointer
from clipforge.train.config import RunConfig
from clipforge.train.health import CollapseMonitor, HealthProbe
from clipforge.train.optim import SampleClock, build_optimizer, build_scheduler
from clipforge.train.parallel import PreparedModel, attach_objectives, prepare_model, unwrap
from clipforge.train.state import Piece, TrainState, restart_state
from clipforge.train.step import PlainStep, autocast_for, build_step
from clipforge.train.teacher import build_teacher

log = logging.getLogger("clipforge.train")


@dataclass
class Run:
    """Everything a training run is made of, built once."""

    run_dir: Path
    mesh: DeviceMesh | None  # the run's one device mesh (None: one process), the one every component was given
    built: BuiltModel  # the plain model (weights, tokenizer, transforms)
    model: torch.nn.Module  # what the step calls: prepared, wrapped, compiled
    channels_last: bool
    dynamic_text: bool  # mark each batch's (trimmed) caption length dynamic for the compiled model
    loader: TrainLoader
    step_fn: PlainStep
    scheduler: Any
    state: TrainState
    pieces: dict[str, Piece]  # the restart state, iterated by the checkpointer
    checkpointer: Checkpointer
    resume_from: Path | None
    agree: Callable[..., Any]
    probe: HealthProbe | None
    monitor: CollapseMonitor


def build_run(cfg: RunConfig, dist_info: DistInfo, stop_requested: Callable[[], bool]) -> Run:
    run_dir = Path(cfg.train.output_dir)
    mesh = build_mesh(dist_info)
    if cfg.eval.suite is not None:
        load_suite(cfg.eval.suite)  # a bad suite file fails now, not after training
    checkpointer = Checkpointer(
        run_dir / "checkpoints",
        cfg.checkpoint.keep_last,
        dist_info.rank,
        asynchronous=cfg.checkpoint.async_save,
        mesh=mesh,
    )
    resume_from = resolve_resume(cfg.checkpoint.resume, checkpointer)
    plan = plan_data(cfg.data, dist_info.world_size)  # empty or too few shards fail now, not after the model is built
    built = build_model(cfg.model)
    load_init_weights(built.model, cfg.model.init_from)  # before objectives attach to the model and it is wrapped
    state = TrainState(clock=SampleClock(global_batch=cfg.data.batch_size * dist_info.world_size))
    objectives, prepared = objectives_and_model(cfg, built, dist_info, state, mesh)
    optimizer = build_optimizer(cfg.optim, built.model)
    scheduler = build_scheduler(cfg.optim, optimizer, cfg.train.steps, state.clock)
    agree = make_agreement(dist_info, mesh)
    on_gpu = dist_info.device.startswith("cuda")
    loader = build_train_loader(
        cfg.data,
        built.preprocess_cfg,
        built.tokenizer,
        dist_info.rank,
        dist_info.world_size,
        pin_memory=on_gpu,
        agree=agree,
        normalize_in_workers=not on_gpu,
        fields=objectives.batch_fields,
        trim_text=prepared.trim_text,
        stop_requested=stop_requested,
        plan=plan,
    )
    step_fn, pieces = step_and_restart_state(
        cfg, prepared.model, objectives, optimizer, scheduler, state, loader, dist_info
    )
    return Run(
        run_dir=run_dir,
        mesh=mesh,
        built=built,
        model=prepared.model,
        channels_last=prepared.channels_last,
        dynamic_text=cfg.speed.compile and prepared.trim_text,
        loader=loader,
        step_fn=step_fn,
        scheduler=scheduler,
        state=state,
        pieces=pieces,
        checkpointer=checkpointer,
        resume_from=resume_from,
        agree=agree,
        probe=health_probe(cfg, built, dist_info, agree),
        monitor=CollapseMonitor(cfg.health, cfg.loss.max_logit_scale, log_warnings=dist_info.is_main),
    )


def objectives_and_model(
    cfg: RunConfig, built: BuiltModel, dist_info: DistInfo, state: TrainState, mesh: DeviceMesh | None = None
) -> tuple[Objectives, PreparedModel]:
    """The run's objectives (``objectives_for_run``) and its model prepared for training around them (locks, speed
    switches, every token kept if an objective reads them, DDP or FSDP on ``mesh``), the objectives bound to it."""
    objectives = objectives_for_run(cfg, built, dist_info, state, mesh)
    prepared = prepare_model(
        built.model,
        model_cfg=cfg.model,
        speed=cfg.speed,
        parallel=cfg.parallel,
        precision=cfg.train.precision,
        learn_temperature=cfg.loss.learn_temperature,
        dist_info=dist_info,
        mesh=mesh,
        every_token=needs_every_token(objectives.model_outputs),
    )
    objectives.bind(unwrap(prepared.model))
    return objectives, prepared


def step_for_run(cfg: RunConfig, model, objectives, optimizer, scheduler, device: str) -> PlainStep:
    """The step strategy the run's config asks for (``build_step``)."""
    return build_step(
        model,
        objectives,
        optimizer,
        scheduler,
        device=device,
        precision=cfg.train.precision,
        grad_clip_norm=cfg.optim.grad_clip_norm,
        max_logit_scale=cfg.loss.max_logit_scale,
        accum_steps=cfg.train.accum_steps,
    )


def step_and_restart_state(cfg: RunConfig, model, objectives, optimizer, scheduler, state, loader, dist_info: DistInfo):
    """The step strategy of the run's config, and every piece of restart state the checkpointer iterates."""
    step_fn = step_for_run(cfg, model, objectives, optimizer, scheduler, dist_info.device)
    pieces = restart_state(
        model,
        optimizer,
        scheduler,
        optim_cfg=cfg.optim,
        total_steps=cfg.train.steps,
        train=state,
        loader=loader,
        device=dist_info.device,
        scaler=step_fn.scaler,
        objective_pieces=objectives.restart_pieces(),
        rank=dist_info.rank,
    )
    return step_fn, pieces


def objectives_for_run(
    cfg: RunConfig, built: BuiltModel, dist_info: DistInfo, state: TrainState, mesh: DeviceMesh | None = None
) -> Objectives:
    """The configured objectives with the runtime objects they need (their collectives on ``mesh``, the run's);
    those that hold parameters are attached to the model (``attach_objectives``), the others put on the device.
    They are bound once the model is prepared."""
    teacher, teacher_temperature = build_teacher(cfg.loss, cfg.data.teacher, built, dist_info.device)
    context = ObjectiveContext(
        rank=dist_info.rank,
        world_size=dist_info.world_size,
        mesh=mesh,
        device=dist_info.device,
        model=built.model,
        autocast=autocast_for(dist_info.device, cfg.train.precision),
        step=lambda: state.step,
        total_steps=cfg.train.steps,
        teacher=teacher,
        teacher_temperature=teacher_temperature,
    )
    objectives = build_objectives(cfg.loss, context, cfg.train.steps)
    if not attach_objectives(built.model, objectives):
        objectives.to(dist_info.device)
    return objectives


def resolve_resume(resume: str | None, checkpointer: Checkpointer) -> Path | None:
    """The checkpoint to resume from: checkpoint.resume as a directory, or 'auto'/'latest' = the newest intact one here
    (None: start fresh). A fresh start in a directory that already holds checkpoints is refused."""
    found = None
    if resume in ("auto", "latest"):
        found = checkpointer.latest_intact()
        if found is None:
            log.info("resume=%s: no intact checkpoint in %s yet, starting fresh", resume, checkpointer.directory)
    elif resume:
        found = Path(resume)
        if not found.is_dir():
            raise FileNotFoundError(f"checkpoint.resume: checkpoint {found} does not exist")
    if found is None and checkpointer.latest() is not None:
        raise ValueError(
            f"{checkpointer.directory.parent} already holds checkpoints (newest: "
            f"{checkpointer.latest().name}); continue it with --resume latest, or set another "
            "train.output_dir"
        )
    return found


def health_probe(cfg: RunConfig, built: BuiltModel, dist_info: DistInfo, agree) -> HealthProbe | None:
    """Rank 0's held-out batch for health.every_n_steps; a failure to load it stops every rank at once."""
    if not cfg.health.every_n_steps:
        return None
    probe, problem = None, None
    if dist_info.is_main:
        try:
            probe = HealthProbe.from_config(
                cfg.health, cfg.eval.suite, built.eval_transform, built.tokenizer, cfg.eval.batch_size
            )
            log.info("health diagnostics every %d steps on %s", cfg.health.every_n_steps, probe.source)
        except (OSError, ValueError) as exc:
            problem = exc
    if dist_info.is_distributed and not agree(problem is None):
        raise problem or ValueError("rank 0 could not load the health.dataset batch (see its log)")
    if problem is not None:
        raise problem
    return probe
