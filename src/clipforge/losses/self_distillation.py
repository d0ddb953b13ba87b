"""SigLIP 2's self-distillation and masked prediction (Tschannen et al. 2025) as one objective: SILC's
local-to-global consistency (Naeem et al. 2024) and TIPS's masked patch prediction (Maninis et al. 2025), both
against one EMA teacher of the image tower, switched on for the end of training:

```yaml
loss:
  kind: siglip
  terms:
    - {name: self_distillation, weight: 1.0, start: 0.8, options: {masked_weight: 0.25, local_crops: 8}}
```

It returns two terms. ``weight`` multiplies both; ``masked_weight`` is the masked term's weight relative to the
self-distillation term (the paper's weights, 1 and 0.25, are ``weight: 1.0`` with ``masked_weight: 0.25``).

- ``self_distillation``: the teacher sees the global view (the batch's ``images``), the student each of
  ``local_crops`` local crops (random resized crops of the training image covering ``local_scale`` of its area,
  resized to ``local_size``, flipped half the time; made in the data workers). Both pooled outputs go through a
  DINO head (an MLP, L2 normalisation, a weight-normalised linear map to ``prototypes`` logits); the term is the
  cross-entropy between the teacher's ``softmax((t - center) / teacher_temperature)`` and the student's
  ``log_softmax(s / student_temperature)``, averaged over the crops and the samples.
- ``masked_prediction``: the student sees the global view with ``mask_ratio`` of its patch embeddings replaced by a
  learned mask token; its output tokens at the masked positions go through a patch head, and the same cross-entropy
  is taken against the teacher's patch head output of its unmasked tokens at the same positions (iBOT's loss),
  averaged over the masked positions. Every sample masks the same number of patches, chosen by uniforms drawn for
  the global batch from a generator seeded by ``seed`` and the optimizer step, each rank taking its rows (as LocCa's
  draws): one process and N ranks mask the same patches.

Each centre is a buffer moved, after every step's loss, towards the global batch's mean teacher output (one
all-reduce), with ``center_momentum``; each rank's terms are means over its own samples, which the data-parallel
gradient average turns into the global batch's mean (the local batches are equal).

The teacher is a copy of the image tower and of both heads, made when the objective is built, so it is attached
under ``objectives.``, checkpointed and sharded by FSDP as the towers are, frozen (no gradient, not in the
optimizer) and left out of every export. At the first step the term is on it takes the student's weights (the buffer
``switched_on`` keeps that step, so a resume across the switch keeps the teacher it had); after each applied update
``θ_t ← m θ_t + (1 - m) θ_s``, with ``m`` rising from ``momentum`` to 1 on a cosine over the steps left after the
switch. Both copies run on the parameters as the optimizer holds them, between steps: under FSDP the shards, which
the teacher and the student lay out alike, so every rank updates its own shard.

The local crops are made in the data workers (``clipforge.data.views.LocalCrops``) from the training image (uint8,
after the training transform) and normalised here as the images are. Their randomness is seeded by a digest of the
training image's pixels: the training image is itself drawn from the sample's place in the stream, so the same
sample at the same place gives the same crops after a restart, and the crops differ wherever the training crop does.

The image tower is run by ``run_vision``: open_clip's ``VisionTransformer.forward`` at any size that is a multiple
of its patch (the positional embedding bicubically resized to the grid), with an optional patch mask, giving the
pooled output and the patch tokens. Patch dropout is a speed option of the contrastive forward and is not applied
to these views.
"""

from __future__ import annotations

import copy
import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from clipforge.data.views import LocalCrops
from clipforge.losses.objective import Objective, ObjectiveContext, SampleField, read_options


@dataclass
class SelfDistillationOptions:
    """The objective's options (``loss.terms[].options``)."""

    masked_weight: float = 0.25  # the masked-prediction term's weight relative to the self-distillation term
    local_crops: int = 8  # local crops a sample
    local_size: int = 0  # their side in pixels, a multiple of the patch; 0: the image size / 2, rounded to the patch
    local_scale: tuple[float, float] = (0.05, 0.4)  # the area fraction of the training image a local crop covers
    momentum: float = 0.996  # the teacher's EMA momentum at the switch; it rises to 1 on a cosine
    head_hidden: int = 512  # the heads' MLP width
    head_dim: int = 128  # the heads' bottleneck, L2-normalised before the prototypes
    prototypes: int = 1024  # the heads' output logits
    student_temperature: float = 0.1
    teacher_temperature: float = 0.04
    center_momentum: float = 0.9
    mask_ratio: float = 0.5  # the share of the global view's patches the student sees masked
    seed: int = 0

    def __post_init__(self) -> None:
        self.local_scale = tuple(self.local_scale)
        for name in ("local_crops", "head_hidden", "head_dim", "prototypes"):
            if getattr(self, name) < 1:
                raise ValueError(f"option {name} must be at least 1, got {getattr(self, name)}")
        if self.local_size < 0:
            raise ValueError(f"option local_size must be >= 0 (0: half the image size), got {self.local_size}")
        if len(self.local_scale) != 2 or not 0 < self.local_scale[0] <= self.local_scale[1] <= 1:
            raise ValueError(f"option local_scale is (min, max) with 0 < min <= max <= 1, got {self.local_scale}")
        for name in ("momentum", "center_momentum"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"option {name} must be in [0, 1], got {getattr(self, name)}")
        if not 0 < self.mask_ratio < 1:
            raise ValueError(f"option mask_ratio must be in (0, 1), got {self.mask_ratio}")
        for name in ("student_temperature", "teacher_temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"option {name} must be positive, got {getattr(self, name)}")
        if not self.masked_weight >= 0:
            raise ValueError(f"option masked_weight must be >= 0, got {self.masked_weight}")


def is_vision_transformer(visual: nn.Module | None) -> bool:
    """Whether ``visual`` is an open_clip ``VisionTransformer`` ``run_vision`` can run (class-token or average
    pooling, no attentional pooler)."""
    return (
        visual is not None
        and hasattr(visual, "conv1")
        and hasattr(getattr(visual, "transformer", None), "resblocks")
        and getattr(visual, "attn_pool", None) is None
        and getattr(visual, "pool_type", None) in ("tok", "avg")
    )


def positional_embedding(visual: nn.Module, grid: tuple[int, int]) -> torch.Tensor:
    """The tower's positional embedding for a ``grid`` of patches: its own at its own grid, else the patch part
    resized as open_clip's ``resize_pos_embed`` resizes it for a new image size (bicubic, antialiased; the class
    token's kept)."""
    embedding = visual.positional_embedding
    native = tuple(visual.grid_size)
    if tuple(grid) == native:
        return embedding
    cls, patches = embedding[:1], embedding[1:]
    width = patches.shape[-1]
    patches = patches.reshape(1, native[0], native[1], width).permute(0, 3, 1, 2)
    resized = F.interpolate(patches.float(), size=grid, mode="bicubic", antialias=True, align_corners=False)
    return torch.cat([cls, resized.to(embedding.dtype).permute(0, 2, 3, 1).reshape(grid[0] * grid[1], width)])


def run_vision(
    visual: nn.Module,
    images: torch.Tensor,
    mask: torch.Tensor | None = None,
    mask_token: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip 3.3's ``VisionTransformer.forward`` on (B, 3, H, W) images of any size that is a multiple of the
    patch, without patch dropout: (pooled output after its pooling, ``ln_post`` and projection, (B, embed); patch
    tokens after ``ln_post``, (B, P, width)). ``mask`` (B, P) bool replaces those patch embeddings by
    ``mask_token`` (width,) before the positional embedding. The residual blocks are called one by one (as
    open_clip's ``Transformer.forward`` calls them, with its gradient checkpointing), so each FSDP-sharded block
    gathers its weights as in the model's forward, and the forward hooks on the transformer (the model's captured
    outputs) do not fire."""
    x = visual.conv1(images)  # (B, width, gh, gw)
    grid = (x.shape[2], x.shape[3])
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # (B, P, width)
    if mask is not None:
        x = torch.where(mask[..., None], mask_token.to(x.dtype), x)
    cls = visual.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
    x = torch.cat([cls, x], dim=1)
    x = x + positional_embedding(visual, grid).to(x.dtype)
    x = visual.ln_pre(x)
    transformer = visual.transformer
    if not transformer.batch_first:
        x = x.transpose(0, 1)
    for block in transformer.resblocks:
        if transformer.grad_checkpointing and not torch.jit.is_scripting():
            x = torch.utils.checkpoint.checkpoint(block, x, None, None, None, use_reentrant=False)
        else:
            x = block(x, attn_mask=None)
    if not transformer.batch_first:
        x = x.transpose(0, 1)
    pooled, tokens = visual._pool(x)
    if visual.proj is not None:
        pooled = pooled @ visual.proj
    return pooled, tokens


class Head(nn.Module):
    """DINO's head: MLP (in → hidden → hidden → dim), L2 normalisation, a weight-normalised linear map to the
    prototypes (its weight's rows normalised, the gain fixed at 1, as DINO's ``norm_last_layer``)."""

    def __init__(self, width: int, hidden: int, dim: int, prototypes: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, dim)
        )
        self.prototypes = nn.Parameter(torch.randn(prototypes, dim) * 0.02)
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(self.mlp(x), dim=-1), F.normalize(self.prototypes, dim=-1))


def _cross_entropy(teacher: torch.Tensor, center: torch.Tensor, student: torch.Tensor, options) -> torch.Tensor:
    """Per-row −Σ softmax((teacher − center) / τ_t) · log_softmax(student / τ_s), in fp32."""
    targets = F.softmax((teacher.float() - center) / options.teacher_temperature, dim=-1)
    return -(targets * F.log_softmax(student.float() / options.student_temperature, dim=-1)).sum(dim=-1)


class SelfDistillation(Objective):
    name = "self_distillation"
    term_names = ("self_distillation", "masked_prediction")
    runs_towers = True  # the student's views go through the image tower here, after the model's forward

    def __init__(self, options: SelfDistillationOptions, visual: nn.Module, context: ObjectiveContext) -> None:
        super().__init__()
        import open_clip

        self.options = options
        patch = tuple(visual.patch_size)
        image = tuple(visual.image_size)
        size = options.local_size or max(patch[0], round(image[0] / 2 / patch[0]) * patch[0])
        if size % patch[0] or size % patch[1]:
            raise ValueError(f"option local_size {size} is not a multiple of the {patch[0]} px patch")
        self.local_size = size
        self.batch_fields = (
            SampleField(
                "local_crops",
                LocalCrops(options.local_crops, size, options.local_scale),
                shape=(options.local_crops, 3, size, size),
            ),
        )
        self.patches = visual.grid_size[0] * visual.grid_size[1]
        self.masked = max(1, min(self.patches - 1, round(options.mask_ratio * self.patches)))  # per sample
        width = int(visual.transformer.width)
        embed = int(visual.proj.shape[1]) if visual.proj is not None else width
        hidden, dim, prototypes = options.head_hidden, options.head_dim, options.prototypes
        self.head, self.patch_head = Head(embed, hidden, dim, prototypes), Head(width, hidden, dim, prototypes)
        self.mask_token = nn.Parameter(torch.randn(width) * 0.02)
        self.teacher = nn.ModuleDict(
            {
                "visual": copy.deepcopy(visual),
                "head": copy.deepcopy(self.head),
                "patch_head": copy.deepcopy(self.patch_head),
            }
        )
        self.teacher.requires_grad_(False)
        self.register_buffer("center", torch.zeros(prototypes))
        self.register_buffer("patch_center", torch.zeros(prototypes))
        self.register_buffer("switched_on", torch.tensor(-1, dtype=torch.int64))  # the step the teacher was copied
        preprocess = open_clip.get_model_preprocess_cfg(context.model)
        self.mean, self.std = tuple(preprocess["mean"]), tuple(preprocess["std"])
        self.rank, self.world_size, self.group = context.rank, context.world_size, context.group
        self.step, self.autocast, self.total_steps = context.step, context.autocast, context.total_steps
        self.__dict__["visual"] = visual  # the student's tower: read, not owned (no submodule, no second copy)
        # switched_on as the host knows it: -1 as built; a loaded checkpoint's value is read from the buffer once,
        # at the next step (no read of a device value otherwise, and none on the planner's fake tensors)
        self._start: int | None = -1
        self.register_load_state_dict_post_hook(SelfDistillation._loaded)

    @staticmethod
    def _loaded(module: SelfDistillation, incompatible_keys) -> None:
        module._start = None

    def bind(self, model: nn.Module) -> None:
        self.__dict__["visual"] = model.visual
        self.__dict__["root"] = model

    def _gather_root(self) -> None:
        """Under FSDP the root unit (the tower's embeddings, final norm and projection) has resharded after the
        model's forward: gather it again for the student's views. It stays gathered until its backward, which
        reduce-scatters their gradients with the forward's and reshards it (gathering an unsharded unit is a no-op)."""
        from torch.distributed.fsdp import FSDPModule

        root = self.__dict__.get("root")
        if isinstance(root, FSDPModule):
            root.unshard()

    def _pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(teacher, student) parameters by name, as the optimizer holds them (local shards under FSDP)."""
        pairs = []
        for teacher, student in (
            (self.teacher["visual"], self.visual),
            (self.teacher["head"], self.head),
            (self.teacher["patch_head"], self.patch_head),
        ):
            own = dict(student.named_parameters())
            for name, parameter in teacher.named_parameters():
                if name not in own:
                    raise RuntimeError(f"self_distillation: the student's image tower has no parameter {name!r}")
                pairs.append((_local(parameter), _local(own[name])))
        return pairs

    def _current_step(self) -> int:
        return self.step() if self.step is not None else 0

    @torch.no_grad()
    def before_forward(self, batch) -> None:
        if self._start is None:
            self._start = int(self.switched_on)
        if self._start < 0:  # the first step this term is on: the teacher starts as the student
            for teacher, student in self._pairs():
                teacher.copy_(student)
            self._start = self._current_step()
            self.switched_on.fill_(self._start)

    def momentum(self) -> float:
        """The EMA momentum now: ``momentum`` at the switch, 1 at the last step, on a cosine between."""
        start = self._start if self._start is not None and self._start >= 0 else 0
        span = self.total_steps - start
        if span <= 0:
            return self.options.momentum
        progress = min(max((self._current_step() - start) / span, 0.0), 1.0)
        return 1 - (1 - self.options.momentum) * (1 + math.cos(math.pi * progress)) / 2

    @torch.no_grad()
    def after_update(self, applied: torch.Tensor) -> None:
        pairs = self._pairs()
        if not pairs:
            return
        weight = (1 - self.momentum()) * applied.to(device=pairs[0][0].device, dtype=torch.float32)
        for teacher, student in pairs:
            teacher.lerp_(student, weight.to(teacher.dtype))

    def _draw_masks(self, batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows of the global batch's masks: the masked patches' indices (B, masked) and the mask
        (B, P) bool."""
        generator = torch.Generator(device=device)
        generator.manual_seed((self.options.seed << 32) + self._current_step())
        every = torch.rand(self.world_size * batch_size, self.patches, generator=generator, device=device)
        uniforms = every[self.rank * batch_size : (self.rank + 1) * batch_size]
        return _masks(uniforms.argsort(dim=1)[:, : self.masked], self.patches)

    def _normalize(self, crops: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Local crops in 0-255 → the model's input, with the images' normalisation (``ImageTransform.normalize``)."""
        from clipforge.data.images import _normalize_constants

        mean, scale = _normalize_constants(self.mean, self.std, crops.device)
        return crops.to(torch.float32).sub(mean).mul(scale).to(like.dtype)

    @torch.no_grad()
    def _update_center(self, center: torch.Tensor, outputs: torch.Tensor, count: int) -> None:
        total = outputs.float().reshape(-1, outputs.shape[-1]).sum(dim=0)
        if self.world_size > 1:
            dist.all_reduce(total, group=self.group)
        momentum = self.options.center_momentum
        center.mul_(momentum).add_(total / (count * self.world_size), alpha=1 - momentum)

    def forward(self, outputs, batch):
        images = batch["images"]
        batch_size = images.shape[0]
        crops = batch["local_crops"]  # (B, N, 3, s, s)
        crops = self._normalize(crops.flatten(0, 1), images)
        chosen, masks = self._draw_masks(batch_size, images.device)
        self._gather_root()
        with self.autocast() if self.autocast is not None else nullcontext():
            with torch.no_grad():
                pooled, tokens = run_vision(self.teacher["visual"], images)
                teacher_global = self.teacher["head"](pooled).float()  # (B, K)
                teacher_patches = self.teacher["patch_head"](_take(tokens, chosen)).float()  # (B, masked, K)
            local_pooled, _ = run_vision(self.visual, crops)
            student_local = self.head(local_pooled).float().view(batch_size, self.options.local_crops, -1)
            _, masked_tokens = run_vision(self.visual, images, masks, self.mask_token)
            student_patches = self.patch_head(_take(masked_tokens, chosen)).float()
        distillation = _cross_entropy(teacher_global[:, None], self.center, student_local, self.options).mean()
        masked = _cross_entropy(teacher_patches, self.patch_center, student_patches, self.options).mean()
        self._update_center(self.center, teacher_global, batch_size)
        self._update_center(self.patch_center, teacher_patches, batch_size * self.masked)
        return {"self_distillation": distillation, "masked_prediction": self.options.masked_weight * masked}

    def train_flops(self, image_tokens: int, image_trainable: bool = True) -> float:
        """Model FLOPs per sample, counted on the modules as ``clipforge.train.flops`` counts the towers (zeros of
        the views' shapes through ``torch.utils.flop_counter``, attention as its matmuls): the teacher's forward of
        the global view and its heads, the student's forward and the backward autograd runs of the local crops, the
        masked view and their heads."""
        from torch.utils.flop_counter import FlopCounterMode

        from clipforge.models.flop_rules import ATTENTION_FLOPS

        parameter = next(self.visual.parameters())
        device, dtype = parameter.device, parameter.dtype
        height, width = self.visual.image_size
        images = torch.zeros(2, 3, height, width, device=device, dtype=dtype)
        crops = torch.zeros(2 * self.options.local_crops, 3, self.local_size, self.local_size, device=device)
        chosen, masks = _masks(torch.arange(self.masked, device=device).expand(2, -1), self.patches)
        with FlopCounterMode(display=False, custom_mapping=ATTENTION_FLOPS) as counter:
            with torch.no_grad():
                pooled, tokens = run_vision(self.teacher["visual"], images)
                self.teacher["head"](pooled)
                self.teacher["patch_head"](_take(tokens, chosen))
            local = self.head(run_vision(self.visual, crops.to(dtype))[0])
            _, masked = run_vision(self.visual, images, masks, self.mask_token)
            (local.sum() + self.patch_head(_take(masked, chosen)).sum()).backward()
        for parameter in self.parameters():
            parameter.grad = None
        for parameter in self.visual.parameters():
            parameter.grad = None
        return counter.get_total_flops() / 2


def _masks(chosen: torch.Tensor, patches: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked patch indices (B, k) → (them, the (B, P) bool mask)."""
    mask = torch.zeros(chosen.shape[0], patches, dtype=torch.bool, device=chosen.device)
    return chosen, mask.scatter(1, chosen, True)


def _take(tokens: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """(B, P, width) tokens at (B, k) indices → (B, k, width)."""
    return tokens.gather(1, chosen[..., None].expand(-1, -1, tokens.shape[-1]))


def _local(parameter: torch.Tensor) -> torch.Tensor:
    """A parameter's local values: its shard when FSDP made it a DTensor (a view: in-place changes reach it)."""
    return parameter.to_local() if hasattr(parameter, "to_local") else parameter.data


def build(options: dict, context: ObjectiveContext) -> SelfDistillation:
    parsed = read_options(SelfDistillationOptions, options, "self_distillation")
    if context.model is None:
        raise ValueError("self_distillation copies the model's image tower: the context has no model")
    visual = getattr(context.model, "visual", None)
    if not is_vision_transformer(visual):
        raise ValueError(
            f"self_distillation needs an open_clip ViT image tower with class-token or average pooling; this one is "
            f"a {type(visual).__name__}"
        )
    return SelfDistillation(parsed, visual, context)
