"""A shorter training path through ``nn.MultiheadAttention`` for open_clip's self-attention blocks.

open_clip's transformer blocks call ``nn.MultiheadAttention(x, x, x, need_weights=False, attn_mask=mask)`` with
``batch_first=True``. With autograd on (training), torch takes ``F.multi_head_attention_forward``: it transposes
the batch to sequence-first, splits the packed q/k/v projection through ``unflatten / unsqueeze / transpose /
squeeze / contiguous``, and transposes back; in the backward pass each of those views becomes a zero-filled
buffer, an add or a copy (on a 2-core CPU, for the tiny ViT: a third of the attention block's time, the
``copy_``/``fill_``/``add_`` rows of a profile). ``packed_self_attention`` computes the same thing with the same
parameters, one projection viewed as (B, L, 3, heads, head_dim), ``scaled_dot_product_attention`` and the output
projection: the same kernels on the same numbers (outputs and gradients equal to the float rounding of the same
matmuls), without the layout round trips. Anything else — another key or value tensor, attention weights wanted,
padding masks, dropout, a bias_k, no gradient (inference keeps torch's fused fast path) — goes to torch's own
forward. ``enable_packed_attention`` installs it on a model's modules; the state dict does not change.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn


def packable(module: nn.MultiheadAttention) -> bool:
    """Whether ``module``'s self-attention can be computed from its packed q/k/v projection (here and in
    ``clipforge.models.shortcuts``): batch-first, one projection, no bias_k/zero_attn, no dropout."""
    return (
        module.batch_first
        and module._qkv_same_embed_dim
        and module.in_proj_weight is not None
        and module.bias_k is None
        and not module.add_zero_attn
        and module.dropout == 0.0
    )


def packed_self_attention(
    module: nn.MultiheadAttention, x: torch.Tensor, attn_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``module(x, x, x, need_weights=False, attn_mask=attn_mask)[0]`` for ``x`` of shape (B, L, E) and a 2-D
    (L, L) additive float mask or none."""
    batch, length, width = x.shape
    heads = module.num_heads
    qkv = F.linear(x, module.in_proj_weight, module.in_proj_bias)  # (B, L, 3E)
    query, key, value = qkv.view(batch, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask)  # (B, heads, L, E / heads)
    return F.linear(out.transpose(1, 2).reshape(batch, length, width), module.out_proj.weight, module.out_proj.bias)


def _forward(
    self,
    query,
    key,
    value,
    key_padding_mask=None,
    need_weights=True,
    attn_mask=None,
    average_attn_weights=True,
    is_causal=False,
):
    if (
        query is key
        and key is value
        and not need_weights
        and key_padding_mask is None
        and not is_causal
        and torch.is_grad_enabled()
        and query.dim() == 3
        and (attn_mask is None or (attn_mask.dim() == 2 and attn_mask.is_floating_point()))
    ):
        return packed_self_attention(self, query, attn_mask), None
    return nn.MultiheadAttention.forward(
        self, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
    )


def enable_packed_attention(model: nn.Module) -> int:
    """Route ``model``'s batch-first self-attention modules through ``packed_self_attention`` when training;
    returns how many modules were changed."""
    changed = 0
    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention) and packable(module):
            module.forward = types.MethodType(_forward, module)
            changed += 1
    return changed
