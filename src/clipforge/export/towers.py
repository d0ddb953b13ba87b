"""Reading an open_clip model's towers: what each computes, and why transformers could not compute the same.

The converters decide from the modules themselves, not from the JSON config: ``force_quick_gelu``
or a checkpoint's overrides change the modules without appearing in the architecture's config,
and an activation read from the wrong place costs accuracy silently (QuickGELU weights run with
GELU lose almost 3 ImageNet points on OpenCLIP's ViT-B/32).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from open_clip.transformer import QuickGELU, ResidualAttentionBlock, TextTransformer
from torch import nn


class CannotConvert(ValueError):
    """The architecture has no exact counterpart in the requested format; the message says why."""


def activation_name(module: nn.Module) -> str | None:
    """transformers' ``hidden_act`` computing exactly what ``module`` computes, or None."""
    from timm.layers import activations as timm_activations  # timm towers use timm's own modules

    if isinstance(module, (QuickGELU, timm_activations.QuickGELU)):
        return "quick_gelu"
    if type(module) is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_pytorch_tanh"}.get(module.approximate)
    return {timm_activations.GELU: "gelu", timm_activations.GELUTanh: "gelu_pytorch_tanh"}.get(type(module))


@dataclass
class Tower:
    """Sizes of a pre-norm transformer tower and the reasons it does not map, if any."""

    prefix: str
    width: int = 0
    layers: int = 0
    heads: int = 0
    intermediate: int = 0
    activation: str | None = None
    eps: float = 1e-5
    problems: list[str] = field(default_factory=list)

    def hf_sizes(self) -> dict:
        """The fields of a transformers tower config (CLIP or SigLIP, text or vision) that this tower's sizes set."""
        return dict(
            hidden_size=self.width,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            hidden_act=self.activation,
            layer_norm_eps=self.eps,
        )


def norm_eps(norms: list[nn.Module], tower: Tower, what: str) -> None:
    kinds = {type(norm) for norm in norms}
    if not all(issubclass(kind, nn.LayerNorm) for kind in kinds):
        tower.problems.append(f"{what} uses {sorted(kind.__name__ for kind in kinds)} where a LayerNorm is expected")
        return
    eps = {norm.eps for norm in norms}
    if len(eps) > 1:
        tower.problems.append(f"{what} mixes LayerNorm eps values {sorted(eps)}; transformers has one per tower")
    tower.eps = norms[0].eps


def open_clip_blocks(blocks: nn.ModuleList, tower: Tower, extra_norms: list[nn.Module], what: str) -> None:
    """Fill ``tower`` from open_clip ``ResidualAttentionBlock``s (nn.MultiheadAttention, 2-layer MLP)."""
    tower.layers = len(blocks)
    first = blocks[0]
    if any(type(block) is not ResidualAttentionBlock for block in blocks):
        tower.problems.append(
            f"{what} uses open_clip's custom attention block (qk-norm, scaled cosine attention or "
            "extra norms), which transformers' encoder layer does not have"
        )
        return
    if any(not isinstance(block.ls_1, nn.Identity) or not isinstance(block.ls_2, nn.Identity) for block in blocks):
        tower.problems.append(f"{what} has layer scale (ls_init_value), which transformers' encoder layers lack")
    if any(block.attn.in_proj_bias is None or block.attn.out_proj.bias is None for block in blocks):
        tower.problems.append(f"{what} has attention projections without bias")
    tower.width, tower.heads = first.attn.embed_dim, first.attn.num_heads
    tower.intermediate = first.mlp.c_fc.out_features
    activations = {activation_name(block.mlp.gelu) for block in blocks}
    if None in activations or len(activations) > 1:
        kinds = sorted({type(block.mlp.gelu).__name__ for block in blocks})
        tower.problems.append(f"{what} activation {kinds} has no single transformers equivalent")
    tower.activation = next(iter(activations))
    norms = [norm for block in blocks for norm in (block.ln_1, block.ln_2)] + extra_norms
    norm_eps(norms, tower, what)


def text_tower(model: nn.Module) -> tuple[nn.Module, str]:
    """The module holding the text transformer and its state-dict prefix ("" for CLIP, "text." otherwise)."""
    text = getattr(model, "text", None)
    if text is None:
        return model, ""
    if not isinstance(text, TextTransformer):
        raise CannotConvert(
            f"the text tower is {type(text).__name__} (a Hugging Face text model inside open_clip), "
            "not a CLIP text transformer"
        )
    return text, "text."


def text_tower_summary(model: nn.Module) -> tuple[Tower, dict]:
    """The text transformer's sizes plus how it attends, pools and projects."""
    text, prefix = text_tower(model)
    tower = Tower(prefix)
    open_clip_blocks(text.transformer.resblocks, tower, [text.ln_final], "the text tower")
    projection = text.text_projection
    details = {
        "vocab_size": text.token_embedding.num_embeddings,
        "context_length": text.positional_embedding.shape[0],
        "causal": getattr(model, "attn_mask", getattr(text, "attn_mask", None)) is not None,
        "pool_type": getattr(model, "text_pool_type", getattr(text, "pool_type", None)),
        "eos_id": getattr(model, "text_eos_id", getattr(text, "eos_id", None)),
        "projection": (
            "none"
            if projection is None
            else "linear_bias"
            if isinstance(projection, nn.Linear) and projection.bias is not None
            else "linear"
            if isinstance(projection, nn.Linear)
            else "matrix"
        ),
        "embed_dim": (
            None
            if projection is None
            else projection.out_features
            if isinstance(projection, nn.Linear)
            else projection.shape[1]
        ),
        "cls_emb": getattr(text, "cls_emb", None) is not None,
        "pad_mask": bool(getattr(text, "use_pad_mask", False)),
    }
    return tower, details


def logit_parameters(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    return model.logit_scale, getattr(model, "logit_bias", None)
