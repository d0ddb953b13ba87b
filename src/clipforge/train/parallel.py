"""The one place that prepares the model for training: device placement, then DistributedDataParallel or FSDP2.

``parallelize(model, dist_info, strategy)`` is all the loop calls; ``unwrap`` gives back the module that holds
``logit_scale`` (DDP's ``.module``; FSDP2 changes the model in place, so the model itself).

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

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from clipforge.distributed import DistInfo

STRATEGIES = ("ddp", "fsdp")


def parallelize(model: nn.Module, dist_info: DistInfo, strategy: str = "ddp", reshard_after_forward: bool = True,
                mixed_precision: torch.dtype | None = None) -> nn.Module:
    """``model`` on ``dist_info.device``, wrapped in DDP (``strategy="ddp"``) or sharded in place with FSDP2
    (``"fsdp"``, see ``shard_model``); a single process only moves it. ``reshard_after_forward`` and
    ``mixed_precision`` apply to FSDP2 only."""
    if strategy not in STRATEGIES:
        raise ValueError(f"train.parallel: {strategy!r} is not one of {STRATEGIES}")
    model = model.to(dist_info.device)
    if not dist_info.is_distributed:
        return model
    if strategy == "fsdp":
        return shard_model(model, dist_info, reshard_after_forward, mixed_precision)
    device = torch.device(dist_info.device)
    device_ids = [device.index] if device.type == "cuda" else None  # from_env's choice: local rank % visible GPUs
    return DistributedDataParallel(model, device_ids=device_ids)


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


def shard_model(model: nn.Module, dist_info: DistInfo, reshard_after_forward: bool = True,
                mixed_precision: torch.dtype | None = None) -> nn.Module:
    """Shard ``model`` (on ``dist_info.device``, under an initialised process group) with FSDP2, in place.

    ``fully_shard`` on each of ``residual_blocks(model)``, then on the root; 0-dim parameters (``logit_scale``,
    ``logit_bias``) are left out and kept replicated, their gradients averaged over the ranks by a hook.
    ``reshard_after_forward``: free each block's gathered weights after its forward (gather them again for the
    backward) — less memory, one more all-gather per block. ``mixed_precision=torch.bfloat16``: blocks compute in
    bf16 and gradients are reduced in fp32, the sharded master weights and AdamW state stay fp32.
    Returns ``model`` itself, its class swapped for FSDP's subclass.
    """
    _broadcast_from_rank_zero(model)
    scalars = [parameter for parameter in model.parameters() if parameter.ndim == 0]
    for parameter in scalars:
        if parameter.requires_grad:
            parameter.register_hook(_averaged_over_ranks)
    mesh = init_device_mesh(torch.device(dist_info.device).type, (dist_info.world_size,))
    policy = MixedPrecisionPolicy() if mixed_precision is None else \
        MixedPrecisionPolicy(param_dtype=mixed_precision, reduce_dtype=torch.float32)
    options = dict(mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    for block in residual_blocks(model):
        fully_shard(block, **options)
    fully_shard(model, ignored_params=set(scalars), **options)
    return model


@torch.no_grad()
def _broadcast_from_rank_zero(model: nn.Module) -> None:
    """Every rank starts from rank 0's weights and buffers, as DDP's constructor makes it: ``fully_shard`` keeps each
    rank's own slice of its own copy, and the loop seeds every rank differently."""
    for tensor in [*model.parameters(), *model.buffers()]:
        dist.broadcast(tensor.data, src=0)


def _averaged_over_ranks(grad: torch.Tensor) -> torch.Tensor:
    """A replicated parameter's gradient (any shape), averaged over the ranks as DDP averages it (divide, then sum)."""
    grad = grad / dist.get_world_size()
    dist.all_reduce(grad)
    return grad
