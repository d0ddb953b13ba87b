"""How each tower trains (``model.image_adapt`` / ``model.text_adapt``), and the towers' layering that those modes and
layer-wise learning-rate decay (``optim.layer_decay``, ``clipforge.train.optim``) share.

A tower's parameters fall in layers, in the order its input meets them:

* layer 0, the embeddings: a ViT's patch embedding (``conv1``), class and positional embeddings and ``ln_pre``; a
  CLIP-ResNet's stem (``conv1``..``bn3``); the text tower's token and positional embeddings (and ``cls_emb``);
* layer i + 1, residual block i: a ViT's or text transformer's ``transformer.resblocks[i]`` (its adapters too), a
  CLIP-ResNet's stage ``layer{i+1}``;
* layer L + 1, the head: what comes after the last block (a ViT's ``ln_post``, ``proj`` and attention pooler; a
  CLIP-ResNet's ``attnpool``; the text tower's ``ln_final`` and ``text_projection``).

The image tower is ``model.visual``; the text tower is ``model.text`` (open_clip's ``CustomTextCLIP``, SigLIP) or,
on ``CLIP``, its ``token_embedding``, ``positional_embedding``, ``transformer``, ``ln_final`` and
``text_projection``. ``logit_scale``, ``logit_bias`` and objectives' parameters belong to no tower. Towers of other
kinds (timm or Hugging Face) have no blocks here: modes that need blocks (``last_k``, ``lora``) and layer decay
refuse them in one line.

The modes (``apply_adaptation``, called by ``clipforge.train.parallel.apply_training_options``): ``full`` trains
every parameter; ``frozen`` none; ``last_k`` the last ``model.adapt_last_k`` blocks and the head; ``lora`` freezes
the tower and adds LoRA adapters (``clipforge.models.lora``) to every block's ``model.lora_targets``. BatchNorm
statistics of a frozen CLIP-ResNet still update in training mode (``lock_image`` with ``lock_image_freeze_bn_stats``
freezes them).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from clipforge.models.config import ModelConfig
from clipforge.models.lora import adapt_block

EMBEDDING_PARTS = (
    "conv1",
    "bn1",
    "conv2",
    "bn2",
    "conv3",
    "bn3",
    "class_embedding",
    "positional_embedding",
    "ln_pre",
    "token_embedding",
    "cls_emb",
)
CLIP_TEXT_PARTS = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")


@dataclass
class Tower:
    """One tower's parameters (by their names in the model) and residual blocks (name, module), input to output."""

    name: str  # "image" or "text"
    kind: str  # the tower's class, for messages
    prefix: str  # its parameters' names start with this ("" for CLIP's text tower, which lives on the model)
    parameters: dict[str, nn.Parameter]
    blocks: list[tuple[str, nn.Module]]
    transformer: bool  # its blocks are transformer blocks (attention and MLP), which LoRA adapts

    def layer(self, name: str) -> int:
        """The layer of parameter ``name``: 0 the embeddings, i + 1 block i, ``len(blocks) + 1`` the head."""
        for index, (block, _) in enumerate(self.blocks):
            if name.startswith(f"{block}."):
                return index + 1
        return 0 if name[len(self.prefix) :].split(".")[0] in EMBEDDING_PARTS else len(self.blocks) + 1


def towers(model: nn.Module) -> list[Tower]:
    """The image and text towers of an open_clip model (those it has)."""
    names = {id(module): name for name, module in model.named_modules()}
    found = []
    visual = getattr(model, "visual", None)
    if isinstance(visual, nn.Module):
        found.append(_tower("image", visual, "visual.", model, names))
    text = getattr(model, "text", None)
    if isinstance(text, nn.Module):
        found.append(_tower("text", text, "text.", model, names))
    elif isinstance(getattr(model, "transformer", None), nn.Module):
        found.append(_tower("text", model, "", model, names))
    return found


def _tower(name: str, module: nn.Module, prefix: str, model: nn.Module, names: dict[int, str]) -> Tower:
    if prefix:
        parameters = {n: p for n, p in model.named_parameters() if n.startswith(prefix)}
        kind = type(module).__name__
    else:  # CLIP's text tower: its parts on the model itself
        parameters = {n: p for n, p in model.named_parameters() if n.split(".")[0] in CLIP_TEXT_PARTS}
        kind = f"{type(model).__name__} text"
    resblocks = getattr(getattr(module, "transformer", None), "resblocks", None)
    if isinstance(resblocks, nn.ModuleList):
        blocks, transformer = list(resblocks), True
    elif all(isinstance(getattr(module, f"layer{index}", None), nn.Module) for index in range(1, 5)):
        blocks, transformer = [getattr(module, f"layer{index}") for index in range(1, 5)], False  # CLIP-ResNet
    else:
        blocks, transformer = [], False
    return Tower(name, kind, prefix, parameters, [(names[id(b)], b) for b in blocks], transformer)


def layer_depths(model: nn.Module) -> dict[str, int]:
    """For every parameter name of ``model``: how many layers of its tower lie above it (0 for the head, L + 1 for
    the embeddings of a tower of L blocks); 0 for parameters of no tower (``logit_scale``, objectives). Raises
    ValueError naming a tower whose blocks are unknown (timm, Hugging Face)."""
    depths = {name: 0 for name, _ in model.named_parameters()}
    for tower in towers(model):
        if not tower.blocks:
            raise ValueError(f"the {tower.name} tower ({tower.kind}) has no residual blocks clipforge knows")
        top = len(tower.blocks) + 1
        depths.update({name: top - tower.layer(name) for name in tower.parameters})
    return depths


def apply_adaptation(model: nn.Module, cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """Apply ``cfg.image_adapt`` and ``cfg.text_adapt`` to ``model`` (see the module docstring); returns, for each
    tower, (trainable parameter elements, all of its base parameter elements). A tower a mode cannot adapt is
    refused in one line naming the key."""
    counts = {}
    for tower in towers(model):
        mode = cfg.image_adapt if tower.name == "image" else cfg.text_adapt
        key = f"model.{tower.name}_adapt"
        if mode != "full":
            for parameter in tower.parameters.values():
                parameter.requires_grad_(False)
        if mode == "last_k":
            if not tower.blocks:
                raise ValueError(f"{key}: last_k needs residual blocks; {tower.kind} towers have none clipforge knows")
            if cfg.adapt_last_k > len(tower.blocks):
                raise ValueError(
                    f"model.adapt_last_k: {cfg.adapt_last_k} is more than the {tower.name} tower's "
                    f"{len(tower.blocks)} blocks"
                )
            first = len(tower.blocks) + 1 - cfg.adapt_last_k  # the first trained layer
            for name, parameter in tower.parameters.items():
                parameter.requires_grad_(tower.layer(name) >= first)
        elif mode == "lora":
            if not tower.transformer:
                raise ValueError(f"{key}: lora adapts transformer blocks; {tower.kind} towers have none")
            for name, block in tower.blocks:
                try:
                    adapt_block(block, cfg.lora_targets, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout)
                except ValueError as exn:
                    raise ValueError(f"model.lora_targets: {name}: {exn}") from None
        trainable = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and _in(tower, n))
        counts[tower.name] = (trainable, sum(parameter.numel() for parameter in tower.parameters.values()))
    return counts


def _in(tower: Tower, name: str) -> bool:
    if tower.prefix:
        return name.startswith(tower.prefix)
    return name.split(".")[0] in CLIP_TEXT_PARTS
