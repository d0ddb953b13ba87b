"""The one place that prepares the model for training: every option applied from outside the model code.

``prepare_model`` takes the model ``build_model`` made and, in this order: freezes the temperature (and bias)
unless ``loss.learn_temperature``, locks towers (LiT: ``model.lock_image`` / ``model.lock_text``), adapts them
(``model.image_adapt`` / ``model.text_adapt``: frozen, the last k blocks, or LoRA adapters that every attention path
below computes with, ``clipforge.models.adapt``), turns on
gradient checkpointing, lets the text tower take trimmed token batches (``speed.trim_text_padding``), runs each
tower's last block at its pooled token only (``speed.pooled_last_block``), routes self-attention through one
packed projection in training (``speed.packed_attention``), switches to
channels-last (``speed.channels_last``), places it on the device and makes it data-parallel (``parallelize``:
DDP, or FSDP2 with ``parallel.strategy: fsdp``), then compiles it (``speed.compile``; after wrapping, see
``TrainConfig.compile``). Model code knows none of this. ``unwrap`` gives back the module that holds
``logit_scale`` (DDP's ``.module``; FSDP2 changes the model in place, so the model itself). Both wrappers run on
the run's device mesh (``clipforge.distributed.build_mesh``), the one the losses, the ranks' agreement and the
checkpointer are given too, so every collective of a run goes through one process group.
FSDP2 (``strategy="fsdp"``, ``shard_model``): ``torch.distributed.fsdp.fully_shard`` on every residual block of
both towers, then on the root, which takes the rest (embeddings, final norms, projections). Each parameter becomes
a DTensor sharded on dim 0 across the ranks, and so do its gradient and its AdamW moments: per rank about 1/N of
DDP's parameter + gradient + optimizer memory (bench/fsdp_memory.py). A block's full weights exist only while it
runs (all-gathered before its forward and its backward); gradients are reduce-scattered, averaged as DDP averages.

The temperature and the SigLIP bias are 0-dim parameters, which ``fully_shard`` refuses ("doesn't support scalar
parameters"; a 0-dim tensor has no dim to shard, pytorch#130810). Making them 1-D would change the model's
state-dict shapes and every loss that takes them, so they stay out of FSDP (``ignored_params``) as plain
replicated tensors, and a gradient hook does for them what DDP does for every parameter: it averages their gradient
over the ranks in the backward pass. Every rank then applies the same update to the same value, so they stay equal,
and the clamp after the optimizer step is an ordinary in-place clamp. ``clip_grad_norm_`` over the mixed
DTensor / plain gradients returns the norm of the whole gradient (a replicated DTensor; the step reads its value).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from clipforge.distributed import DistInfo, build_mesh
from clipforge.models import (
    ModelConfig,
    apply_adaptation,
    enable_packed_attention,
    enable_pooled_last_block,
    enable_text_trimming,
)
from clipforge.train.config import ParallelConfig, SpeedConfig

STRATEGIES = ("ddp", "fsdp")
log = logging.getLogger("clipforge.train")


@dataclass
class PreparedModel:
    model: torch.nn.Module  # what the step calls: wrapped and compiled as configured
    trim_text: bool  # the loader may cut token columns after each batch's last end-of-text token
    channels_last: bool  # batches' images go channels-last too


def prepare_model(
    model: torch.nn.Module,
    *,
    model_cfg: ModelConfig,
    speed: SpeedConfig,
    parallel: ParallelConfig,
    precision: str,
    learn_temperature: bool,
    dist_info: DistInfo,
    mesh: DeviceMesh | None = None,
    every_token: bool = False,
) -> PreparedModel:
    """``model`` (open_clip, as ``build_model`` made it) ready to train: the ``speed`` switches applied, wrapped for
    the ``parallel`` strategy on ``mesh`` (the run's, see ``parallelize``; FSDP's parameters in bf16 under
    ``precision`` bf16) and compiled if asked.
    ``every_token``: an objective reads the towers' unpooled tokens, so the last block runs at every token (the
    pooled-last-block shortcut stays off)."""
    apply_training_options(model, model_cfg, learn_temperature)
    trim_text = speed.trim_text_padding and enable_text_trimming(model)
    if speed.pooled_last_block and not every_token:
        enable_pooled_last_block(model)
    if speed.packed_attention:
        enable_packed_attention(model)
    channels_last = use_channels_last(speed.channels_last, model)
    if channels_last:
        model.to(memory_format=torch.channels_last)
        log.info("channels-last memory format (speed.channels_last: %s)", speed.channels_last)
    wrapped = parallelize(
        model,
        dist_info,
        parallel.strategy,
        parallel.reshard_after_forward,
        torch.bfloat16 if precision == "bf16" else None,
        mesh=mesh,
    )
    if speed.compile:
        wrapped.compile()
    return PreparedModel(wrapped, trim_text, channels_last)


def attach_objectives(model: nn.Module, objectives: nn.Module) -> bool:
    """Objectives that hold parameters (a head, a decoder) become the submodule ``objectives`` of the model before it
    is wrapped, so that DDP reduces their gradients, FSDP shards them (as one unit, ``shard_model``), the optimizer
    updates them and the checkpoint keeps them with the model's weights; exports leave the ``objectives.`` keys out
    (``clipforge.checkpoints``). Objectives without parameters stay apart: the model is then exactly as built.
    Returns whether they were attached."""
    if not any(True for _ in objectives.parameters()):
        return False
    if hasattr(model, "objectives"):
        raise ValueError("the model already has an attribute named 'objectives'")
    model.add_module("objectives", objectives)
    return True


def apply_training_options(model: torch.nn.Module, cfg: ModelConfig, learn_temperature: bool = True) -> None:
    """Temperature freezing, gradient checkpointing, tower locking (open_clip's own implementations) and the towers'
    adaptation modes (``clipforge.models.apply_adaptation``: frozen, last_k, LoRA)."""
    if not learn_temperature:
        for name in ("logit_scale", "logit_bias"):
            if getattr(model, name, None) is not None:
                getattr(model, name).requires_grad_(False)
    if cfg.grad_checkpointing:
        try:
            model.set_grad_checkpointing(True)
        except AssertionError as exn:  # open_clip's ModifiedResNet: "not supported"
            raise ValueError(
                f"model.grad_checkpointing: not supported by {type(model.visual).__name__} image towers"
            ) from exn
    if cfg.lock_image:
        model.lock_image_tower(
            unlocked_groups=cfg.lock_image_unlocked_groups, freeze_bn_stats=cfg.lock_image_freeze_bn_stats
        )
    if cfg.lock_text:
        model.lock_text_tower(
            unlocked_layers=cfg.lock_text_unlocked_layers, freeze_layer_norm=cfg.lock_text_freeze_layer_norm
        )
    apply_adaptation(model, cfg)


def use_channels_last(setting: bool | str, model: torch.nn.Module) -> bool:
    """speed.channels_last resolved: 'auto' is on when the image tower is convolutional (more than one Conv2d)."""
    if setting != "auto":
        return bool(setting)
    visual = getattr(model, "visual", None)
    return visual is not None and sum(isinstance(m, torch.nn.Conv2d) for m in visual.modules()) > 1


def parallelize(
    model: nn.Module,
    dist_info: DistInfo,
    strategy: str = "ddp",
    reshard_after_forward: bool = True,
    mixed_precision: torch.dtype | None = None,
    *,
    mesh: DeviceMesh | None = None,
) -> nn.Module:
    """``model`` on ``dist_info.device``, wrapped in DDP (``strategy="ddp"``) or sharded in place with FSDP2
    (``"fsdp"``, see ``shard_model``) over ``mesh``; a single process only moves it. ``mesh`` is the run's
    (``build_run`` passes the one it built); without one, ``build_mesh(dist_info)`` makes the same mesh, for a model
    wrapped outside a run. ``reshard_after_forward`` and ``mixed_precision`` apply to FSDP2 only."""
    if strategy not in STRATEGIES:
        raise ValueError(f"parallel.strategy: {strategy!r} is not one of {STRATEGIES}")
    model = model.to(dist_info.device)
    if not dist_info.is_distributed:
        return model
    mesh = mesh if mesh is not None else build_mesh(dist_info)
    if strategy == "fsdp":
        return shard_model(model, mesh, reshard_after_forward, mixed_precision)
    device = torch.device(dist_info.device)
    device_ids = [device.index] if device.type == "cuda" else None  # from_env's choice: local rank % visible GPUs
    return DistributedDataParallel(model, device_ids=device_ids, device_mesh=mesh)


def unwrap(model: nn.Module) -> nn.Module:
    """The module that holds ``logit_scale``: DDP's ``.module``; an FSDP2 model is its own (sharded in place)."""
    return getattr(model, "module", model)


def no_gradient_sync(model: nn.Module) -> AbstractContextManager:
    """Backward passes inside accumulate this rank's gradients without reducing them; the first backward after it
    reduces the sum (GradCache's micro-batches: one reduction per step, the same sums in the same order as DDP's
    ``no_sync``). Under FSDP2 the unsharded gradients of every block are held until then: DDP's gradient memory
    for the accumulation, in exchange for one reduce-scatter per step instead of one per micro-batch. A model that
    is not data-parallel: nothing to hold back."""
    if hasattr(model, "no_sync"):
        return model.no_sync()
    if isinstance(model, FSDPModule):
        return _fsdp_no_sync(model)
    return nullcontext()


@contextmanager
def _fsdp_no_sync(model: FSDPModule) -> Iterator[None]:
    model.set_requires_gradient_sync(False)  # recursive: every sharded block of the model
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def residual_blocks(model: nn.Module) -> list[nn.Module]:
    """The units FSDP2 shards one by one: the ViT image tower's transformer blocks, or a CLIP-ResNet's four stages
    (``layer1``..``layer4``); the text transformer's blocks (``CLIP``: ``model.transformer``, ``CustomTextCLIP``:
    ``model.text.transformer``). A tower of another kind (timm, Hugging Face) contributes none: the root covers it."""
    blocks: list[nn.Module] = []
    visual = getattr(model, "visual", None)
    if isinstance(getattr(getattr(visual, "transformer", None), "resblocks", None), nn.ModuleList):
        blocks += list(visual.transformer.resblocks)
    elif all(isinstance(getattr(visual, f"layer{index}", None), nn.Module) for index in range(1, 5)):
        blocks += [getattr(visual, f"layer{index}") for index in range(1, 5)]
    text = getattr(model, "text", model)  # CustomTextCLIP keeps its text tower in .text, CLIP on itself
    if isinstance(getattr(getattr(text, "transformer", None), "resblocks", None), nn.ModuleList):
        blocks += list(text.transformer.resblocks)
    return blocks


def shard_model(
    model: nn.Module,
    mesh: DeviceMesh,
    reshard_after_forward: bool = True,
    mixed_precision: torch.dtype | None = None,
) -> nn.Module:
    """Shard ``model`` (on the device of ``mesh``, the run's 1-D data-parallel mesh) with FSDP2, in place.

    ``fully_shard`` on each of ``residual_blocks(model)``, then on the root, every one over ``mesh``; 0-dim
    parameters (``logit_scale``, ``logit_bias``) are left out and kept replicated, their gradients averaged over the
    mesh's ranks by a hook. Every rank starts from the weights of the mesh's first rank.
    ``reshard_after_forward``: free each block's gathered weights after its forward (gather them again for the
    backward) — less memory, one more all-gather per block. ``mixed_precision=torch.bfloat16``: blocks compute in
    bf16 and gradients are reduced in fp32, the sharded master weights and AdamW state stay fp32.
    Returns ``model`` itself, its class swapped for FSDP's subclass.
    """
    if any(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in model.modules()):
        raise ValueError(
            "parallel.strategy=fsdp: this model has BatchNorm layers (a CLIP-ResNet tower), whose running "
            "statistics FSDP does not keep equal across ranks as DDP does; use parallel.strategy=ddp"
        )
    group = mesh.get_group()
    _broadcast_from_rank_zero(model, group)
    scalars = [parameter for parameter in model.parameters() if parameter.ndim == 0]
    for parameter in scalars:
        if parameter.requires_grad:
            parameter.register_hook(partial(_averaged_over_ranks, group=group))
    policy = (
        MixedPrecisionPolicy()
        if mixed_precision is None
        else MixedPrecisionPolicy(param_dtype=mixed_precision, reduce_dtype=torch.float32)
    )
    options = dict(mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    for block in residual_blocks(model):
        fully_shard(block, **options)
    if isinstance(getattr(model, "objectives", None), nn.Module):  # called on its own, after the model's forward
        fully_shard(model.objectives, **options)
    fully_shard(model, ignored_params=set(scalars), **options)
    return model


@torch.no_grad()
def _broadcast_from_rank_zero(model: nn.Module, group: dist.ProcessGroup) -> None:
    """Every rank starts from the weights and buffers of ``group``'s rank 0, as DDP's constructor makes it:
    ``fully_shard`` keeps each rank's own slice of its own copy, and the loop seeds every rank differently."""
    for tensor in [*model.parameters(), *model.buffers()]:
        dist.broadcast(tensor.data, group=group, group_src=0)


def _averaged_over_ranks(grad: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """A replicated parameter's gradient (any shape), averaged over ``group``'s ranks as DDP averages it (divide,
    then sum)."""
    grad = grad / dist.get_world_size(group)
    dist.all_reduce(grad, group=group)
    return grad


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model``'s parameters are FSDP shards (DTensors) rather than whole replicas."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(parameter, DTensor) for parameter in unwrap(model).parameters())
