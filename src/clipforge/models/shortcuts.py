"""Exact shortcuts through open_clip's towers: the work on tokens whose outputs nothing reads is not done.

Both keep the parameters, the state dict, the features and every gradient (to float rounding: the same products
summed in another order); only the arithmetic on discarded tokens goes.

* **Text trimming** (``enable_text_trimming``; ``speed.trim_text_padding``). A causal text tower pooled at the
  end-of-text token never lets a position up to the EOT see the padding after it, so the loader may cut each batch's
  token columns after its longest caption and the tower runs on the rest.
* **The pooled last block** (``enable_pooled_last_block``; ``speed.pooled_last_block``). A tower pooled at one token
  (a ViT's class token, that text tower's EOT) reads its last block's output at that token only. Attention is the
  only part of a block that mixes tokens, and in the last block the other tokens' attention rows, output
  projections, residuals, norms and MLPs feed nothing that is kept. The last block computes its keys and values for
  every token and all the rest for the pooled token alone: 5/6 of that block's projections and MLP, about 1/(1.2 ×
  layers) of the tower (a fifth of the 4-block tiny ViT's image tower, 7% of ViT-B/16's).

A tower these conditions do not fit exactly (average or attentional pooling, tokens asked for, another block
class, cross-attention, attention dropout) is left as it is.
"""

from __future__ import annotations

import types

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, Transformer, VisionTransformer, text_global_pool
from torch import nn
from torch.utils.checkpoint import checkpoint

from clipforge.models.attention import packable


def trims_text_padding(model: nn.Module) -> bool:
    """Whether ``model`` encodes a caption the same with the padding after its end-of-text token cut off.

    True for open_clip's ``CLIP`` class with a causal text transformer pooled at the EOT token (``argmax``: the
    OpenAI tokenizer's EOT has the highest id): OpenAI CLIP, the LAION ViT-B/32 and B/16 recipes, the demo. The
    causal mask keeps every position up to the EOT from seeing the padding after it, so the features and every
    gradient are the same with or without those positions; only the work on them is saved.
    """
    return (
        isinstance(model, open_clip.CLIP)
        and getattr(model, "attn_mask", None) is not None
        and getattr(model, "text_pool_type", None) == "argmax"
        and hasattr(model, "positional_embedding")
    )


def enable_text_trimming(model: nn.Module) -> bool:
    """Let ``model`` take batches whose token columns after the batch's last EOT were dropped (the training
    loader's ``trim_text``); returns whether the model allows it exactly (``trims_text_padding``)."""
    if not trims_text_padding(model):
        return False
    if getattr(model.encode_text, "__func__", None) is not _encode_text_pooled:  # that one takes any length too
        model.encode_text = types.MethodType(_encode_text_any_length, model)
    return True


def enable_pooled_last_block(model: nn.Module) -> list[str]:
    """Compute the last block of ``model``'s towers at their pooled token only (see the module docstring); returns
    the towers changed, of ``["image", "text"]``."""
    changed = []
    visual = getattr(model, "visual", None)
    if (
        isinstance(visual, VisionTransformer)
        and visual.pool_type == "tok"
        and getattr(visual, "attn_pool", None) is None
        and not visual.output_tokens
        and _splittable(visual.transformer)
    ):
        _install_block(visual.transformer.resblocks[-1])
        visual.forward = types.MethodType(_encode_image_pooled, visual)
        changed.append("image")
    if trims_text_padding(model) and _splittable(model.transformer):
        _install_block(model.transformer.resblocks[-1])
        model.encode_text = types.MethodType(_encode_text_pooled, model)
        changed.append("text")
    return changed


def block_at_token(
    block: ResidualAttentionBlock, x: torch.Tensor, at: int | torch.Tensor, attn_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``block(x, attn_mask=attn_mask)`` of shape (B, L, E), at one token of each sample only: (B, 1, E).

    ``at`` is that token's position, one for all (an int) or one per sample (a (B,) tensor); ``attn_mask`` is
    open_clip's additive (L, L) mask or none. The queries, attention rows, output projection, residual, norm and
    MLP run on that token; the keys and values, which it reads, on all of them."""
    attention = block.attn
    batch, length, width = x.shape
    heads = attention.num_heads
    normed = block.ln_1(x)
    if isinstance(at, int):
        x_at, normed_at = x[:, at : at + 1], normed[:, at : at + 1]
        mask = None if attn_mask is None else attn_mask[at : at + 1].to(x.dtype)
    else:
        rows = torch.arange(batch, device=x.device)
        x_at, normed_at = x[rows, at].unsqueeze(1), normed[rows, at].unsqueeze(1)
        mask = None if attn_mask is None else attn_mask.to(x.dtype)[at].view(batch, 1, 1, length)
    weight, bias = attention.in_proj_weight, attention.in_proj_bias
    query = F.linear(normed_at, weight[:width], None if bias is None else bias[:width])
    key_value = F.linear(normed, weight[width:], None if bias is None else bias[width:])
    query = query.view(batch, 1, heads, width // heads).transpose(1, 2)
    key, value = key_value.view(batch, length, 2, heads, width // heads).permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)  # (B, heads, 1, E / heads)
    out = F.linear(out.transpose(1, 2).reshape(batch, 1, width), attention.out_proj.weight, attention.out_proj.bias)
    x_at = x_at + block.ls_1(out)
    return x_at + block.ls_2(block.mlp(block.ln_2(x_at)))


def _splittable(transformer: nn.Module) -> bool:
    """open_clip's batch-first ``Transformer`` whose last block is the plain residual self-attention block: norms,
    layer scales and MLP per token, attention the packed path can take apart."""
    if not (isinstance(transformer, Transformer) and transformer.batch_first and len(transformer.resblocks)):
        return False
    last = transformer.resblocks[-1]
    return type(last) is ResidualAttentionBlock and not hasattr(last, "ln_1_kv") and packable(last.attn)


def _install_block(block: ResidualAttentionBlock) -> None:
    """The block's own call (so that FSDP's hooks gather its weights) takes ``at=``: ``block_at_token``."""
    block.forward = types.MethodType(_block_forward, block)


def _block_forward(self, q_x, k_x=None, v_x=None, attn_mask=None, at=None):
    if at is None:
        return ResidualAttentionBlock.forward(self, q_x, k_x, v_x, attn_mask)
    return block_at_token(self, q_x, at, attn_mask)


def _run_to_token(transformer: Transformer, x: torch.Tensor, at, attn_mask: torch.Tensor | None = None):
    """``transformer(x, attn_mask)[:, at]`` as (B, 1, E): every block but the last in full, the last at ``at``;
    gradient checkpointing as open_clip's ``Transformer.forward`` does it."""
    *blocks, last = transformer.resblocks
    for block in blocks:
        if transformer.grad_checkpointing:
            x = checkpoint(block, x, None, None, attn_mask, use_reentrant=False)
        else:
            x = block(x, attn_mask=attn_mask)
    if transformer.grad_checkpointing:
        return checkpoint(last, x, None, None, attn_mask, at, use_reentrant=False)
    return last(x, attn_mask=attn_mask, at=at)


def _encode_image_pooled(self, x: torch.Tensor) -> torch.Tensor:
    """open_clip's ``VisionTransformer.forward`` for class-token pooling, its last block at the class token."""
    x = _run_to_token(self.transformer, self._embeds(x), 0)
    pooled, _ = self._pool(x)  # the final norm, per token, before or after taking token 0: the same
    return pooled @ self.proj if self.proj is not None else pooled


def _text_embeds(self, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The token and positional embeddings and the causal mask, cut to the sequence's length (open_clip adds the
    full-length ones)."""
    length = text.shape[1]
    cast_dtype = self.transformer.get_cast_dtype()
    x = self.token_embedding(text).to(cast_dtype)
    return x + self.positional_embedding[:length].to(cast_dtype), self.attn_mask[:length, :length]


def _text_head(self, x: torch.Tensor, normalize: bool) -> torch.Tensor:
    if self.text_projection is not None:
        x = self.text_projection(x) if isinstance(self.text_projection, nn.Linear) else x @ self.text_projection
    return F.normalize(x, dim=-1) if normalize else x


def _encode_text_any_length(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """open_clip's ``CLIP.encode_text`` for token sequences of any length up to the context."""
    x, mask = _text_embeds(self, text)
    x = self.ln_final(self.transformer(x, attn_mask=mask))
    x = text_global_pool(x, text, self.text_pool_type, eos_token_id=getattr(self, "text_eos_id", None))
    return _text_head(self, x, normalize)


def _encode_text_pooled(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """``_encode_text_any_length`` with the last block at the end-of-text token (argmax pooling)."""
    x, mask = _text_embeds(self, text)
    x = self.ln_final(_run_to_token(self.transformer, x, text.argmax(dim=-1), mask))[:, 0]
    return _text_head(self, x, normalize)
