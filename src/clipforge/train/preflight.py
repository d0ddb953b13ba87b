"""Pre-flight: every check a run makes before its first step, made without training, for a given world size.

Entry points: ``clipforge train CONFIG --dry-run`` (``dry_run``: the model's sizes and FLOPs, and ``check_run``) and
``clipforge submit CONFIG --nodes N --gpus-per-node G`` (``check_run`` for the N × G ranks the job asks for, before
anything is written or queued).

``check_run`` makes the run's own checks, in the run's order, reading no sample and leaving nothing behind:

1. the output directory (``check_output_dir``; ``train`` calls it first too): ``train.output_dir`` and its
   ``checkpoints`` are directories (or can be made) that this process can write, tried with a file created and
   removed at once, and no live trainer holds its lock (``clipforge.train.lock.check_unlocked``);
2. the eval suite file;
3. the resume target (``clipforge.train.build.resolve_resume``: a fresh start where checkpoints exist is refused);
4. the data (``clipforge.data.pipeline.plan_data``): the shards exist, enough of them for world size ×
   data.num_workers disjoint readers in epoch mode, and the sample counts (``num_samples``, or the sizes.json or
   ``*_stats.json`` beside the shards) leave no source empty and make at least one full global batch. Where the
   counts are unknown, shards that hold nothing are found only by reading them: the run stops after two empty
   epochs (``clipforge.data.loader``), and ``clipforge prep inspect`` finds them beforehand.

The world size is an argument (``submit`` passes the one it requests); it defaults to this process's launch
environment (``DistInfo.from_env``), as ``train`` reads it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

from clipforge.data.pipeline import plan_data
from clipforge.distributed import DistInfo
from clipforge.evaluation import load_suite
from clipforge.losses import ObjectiveContext, build_objectives
from clipforge.model_loading import load_init_weights
from clipforge.models import build_model
from clipforge.train.build import resolve_resume
from clipforge.train.checkpoint import Checkpointer
from clipforge.train.config import RunConfig
from clipforge.train.flops import count_train_flops
from clipforge.train.lock import check_unlocked
from clipforge.train.parallel import apply_training_options


def _not_a_directory(path: Path) -> str:
    return "a broken symbolic link" if path.is_symlink() and not path.exists() else "a file, not a directory"


def _try_writing(directory: Path) -> str | None:
    """Why no file can be created in ``directory`` (the OS's words), or None when one can (it is removed at once)."""
    try:
        handle, name = tempfile.mkstemp(prefix=".clipforge-write-check-", dir=directory)
    except OSError as exn:
        return exn.strerror or str(exn)
    os.close(handle)
    os.unlink(name)
    return None


def check_output_dir(output_dir: str | Path) -> None:
    """Raise ``ValueError`` naming the path and what is wrong unless the run can write ``output_dir`` and its
    ``checkpoints``: each is a directory or absent, and a file can be created in each that exists (or, for a run
    directory still to be made, in its nearest existing parent). Creates nothing that outlives the call."""
    run_dir = Path(output_dir)
    checkpoints = run_dir / "checkpoints"
    for path, role in ((run_dir, ""), (checkpoints, " (the run writes its checkpoints there)")):
        if os.path.lexists(path) and not path.is_dir():
            raise ValueError(f"train.output_dir: {path} is {_not_a_directory(path)}{role}")
    existing = [path for path in (run_dir, checkpoints) if path.is_dir()]
    for directory in existing:
        problem = _try_writing(directory)
        if problem is not None:
            raise ValueError(f"train.output_dir: {directory} is not writable ({problem})")
    if existing:
        return
    parent = next(path for path in Path(os.path.abspath(run_dir)).parents if os.path.lexists(path))
    if not parent.is_dir():
        raise ValueError(f"train.output_dir: {run_dir} cannot be created: {parent} is {_not_a_directory(parent)}")
    problem = _try_writing(parent)
    if problem is not None:
        raise ValueError(f"train.output_dir: {run_dir} cannot be created: {parent} is not writable ({problem})")


def launch_world_size() -> int:
    """The world size of this process's launch environment (1 outside torchrun, accelerate and srun)."""
    return DistInfo.from_env(os.environ, cuda_available=False, device_count=0).world_size


def check_run(cfg: RunConfig, world_size: int | None = None) -> dict[str, Any]:
    """The run's checks of its inputs (module docstring) for ``world_size`` ranks (default: this launch's); raises
    the run's own one-line error (``ValueError``, ``FileNotFoundError``, ...) at the first that fails. Returns what
    was found: world size, shards, samples, data mode, steps per epoch (an upper bound in epoch mode), resume
    target."""
    world_size = launch_world_size() if world_size is None else world_size
    check_output_dir(cfg.train.output_dir)
    check_unlocked(cfg.train.output_dir, os.environ)
    if cfg.eval.suite is not None:
        load_suite(cfg.eval.suite)
    resume = resolve_resume(cfg.checkpoint.resume, Checkpointer(Path(cfg.train.output_dir) / "checkpoints"))
    plan = plan_data(cfg.data, world_size)
    steps = plan.steps_per_epoch(cfg.data.batch_size, world_size, cfg.data.epoch_samples)
    return {
        "world_size": world_size,
        "shards": plan.num_shards,
        "samples": plan.num_samples if plan.num_samples is not None else "unknown",
        "data_mode": plan.mode,
        "steps_per_epoch": steps if steps is not None else "unknown",
        "resume_from": str(resume) if resume else "none (fresh start)",
    }


def dry_run(cfg: RunConfig, check_inputs: bool = True, world_size: int | None = None) -> dict[str, Any]:
    """What a run would train: parameter counts and model FLOPs per sample; with ``check_inputs``, after
    ``check_run``'s checks for ``world_size`` ranks (default: this launch's), which come first (before the model is
    built) and whose findings close the summary.

    FLOPs are ``clipforge.train.flops.count_train_flops``, the count the run's MFU uses: each tower's forward in
    train mode (patch dropout applied), and the backward autograd runs (none for a locked tower), at the full
    caption length (a trimmed batch costs less; the run charges each batch for its own length).
    """
    world_size = launch_world_size() if world_size is None else world_size
    inputs = check_run(cfg, world_size) if check_inputs else {}
    built = build_model(cfg.model)
    load_init_weights(built.model, cfg.model.init_from)  # a missing or unreadable init_from fails the dry run
    objectives = build_objectives(cfg.loss, ObjectiveContext(model=built.model, autocast=contextlib.nullcontext))
    apply_training_options(built.model, cfg.model, cfg.loss.learn_temperature)  # locks change the trainable count
    model = built.model
    counts = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "image_tower_parameters": sum(p.numel() for p in model.visual.parameters()),
    }
    counts["text_tower_parameters"] = counts["parameters"] - counts["image_tower_parameters"]
    size = built.preprocess_cfg["size"]
    height, width = (size, size) if isinstance(size, int) else size
    flops = count_train_flops(
        cfg.model, cfg.loss.learn_temperature, cfg.speed.pooled_last_block, loss=cfg.loss, total_steps=cfg.train.steps
    )
    global_batch = cfg.data.batch_size * world_size
    return {
        "architecture": built.architecture,
        "image_size": [height, width],
        "context_length": flops.context_length,
        **counts,
        "image_forward_gflops_per_sample": flops.image_forward / 1e9,
        "text_forward_gflops_per_sample": flops.text_forward / 1e9,
        "image_train_gflops_per_sample": flops.image_train / 1e9,
        "text_train_gflops_per_sample": flops.text_train() / 1e9,
        "train_gflops_per_sample": flops.train() / 1e9,
        "train_pflops_total": flops.run_mean(cfg.train.steps) * global_batch * cfg.train.steps / 1e15,
        "loss_terms": ", ".join(name for member in objectives.members for name in getattr(member, "term_names", ())),
        **inputs,
    }
