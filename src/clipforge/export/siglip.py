"""open_clip SigLIP (timm ViT with a MAP head, bidirectional text tower) ⇄ transformers ``SiglipModel``.

open_clip builds SigLIP as a ``CustomTextCLIP``: the image tower is a timm ``VisionTransformer``
without class token, pooled by timm's ``AttentionPoolLatent`` (one latent query: SigLIP's
multihead-attention-pooling head) and used without projection; the text tower is open_clip's
``TextTransformer`` without causal mask, pooled at the last position, projected by a Linear
with bias. ``SiglipModel`` computes exactly that. The MAP head's separate q and fused kv
projections are transformers' ``nn.MultiheadAttention`` ``in_proj`` stacked (q, k, v).

Activations are carried as they are: open_clip's SigLIP (v1) configs use exact GELU in both
towers, SigLIP 2 configs the tanh approximation; ``hidden_act`` says which.
The text tower attends to padding (no attention mask in open_clip), so SigLIP text must be
padded to the context length with the tokenizer's pad id and fed without an attention mask, as
transformers' ``SiglipTokenizer`` and the zero-shot pipeline do.
"""

from __future__ import annotations

from torch import nn
from transformers import SiglipConfig

from clipforge.export.mapping import Pair, open_clip_block, rename, timm_block
from clipforge.export.towers import (
    CannotConvert,
    Tower,
    activation_name,
    logit_parameters,
    norm_eps,
    text_tower_summary,
)


def _vision(model: nn.Module) -> tuple[Tower, dict]:
    from timm.layers import AttentionPoolLatent
    from timm.models.vision_transformer import Block, VisionTransformer

    tower = Tower("visual.trunk.")
    trunk = getattr(model.visual, "trunk", None)
    if not isinstance(trunk, VisionTransformer):
        tower.problems.append(f"SiglipModel's image tower is a ViT, this is {type(trunk or model.visual).__name__}")
        return tower, {}
    if trunk.num_prefix_tokens or trunk.cls_token is not None:
        tower.problems.append("the timm ViT has class or register tokens, SigLIP has none")
    pool = trunk.attn_pool
    if trunk.global_pool != "map" or not isinstance(pool, AttentionPoolLatent):
        tower.problems.append(f"the timm ViT pools by {trunk.global_pool!r}; SigLIP uses a MAP head ('map')")
    elif pool.latent.shape[1] != 1 or pool.pos_embed is not None or not isinstance(pool.q_norm, nn.Identity):
        tower.problems.append("the MAP head has several latents, a position embedding or qk-norm")
    if len(model.visual.head):
        tower.problems.append("the image tower adds a projection after the trunk (timm_proj); SigLIP has none")
    for name in ("norm_pre", "fc_norm", "head"):
        if not isinstance(getattr(trunk, name), nn.Identity):
            tower.problems.append(f"the timm ViT has a {name} layer that SigLIP does not")
    if not isinstance(trunk.patch_embed.norm, nn.Identity) or trunk.patch_embed.proj.bias is None:
        tower.problems.append("the patch embedding has a norm or no bias")
    if trunk.pos_embed is None or getattr(trunk, "dynamic_img_size", False):
        tower.problems.append("the timm ViT has no learned position embedding or resizes it dynamically")
    blocks = trunk.blocks
    if any(type(block) is not Block for block in blocks):
        tower.problems.append("the timm ViT uses a block type other than the plain pre-norm Block")
        return tower, {}
    for block in blocks:
        extras = (block.ls1, block.ls2, block.attn.q_norm, block.attn.k_norm, block.attn.norm, block.mlp.norm)
        if not all(isinstance(module, nn.Identity) for module in extras) or block.attn.qkv.bias is None:
            tower.problems.append("a block has layer scale, qk-norm, extra norms or no qkv bias")
            break
    first = blocks[0]
    tower.layers, tower.width, tower.heads = len(blocks), first.attn.qkv.in_features, first.attn.num_heads
    tower.intermediate = first.mlp.fc1.out_features
    modules = [block.mlp.act for block in blocks]
    if isinstance(pool, AttentionPoolLatent):
        modules.append(pool.mlp.act)
        if pool.num_heads != tower.heads or pool.mlp.fc1.out_features != tower.intermediate:
            tower.problems.append("the MAP head's heads or MLP width differ from the blocks'")
    activations = {activation_name(module) for module in modules}
    if None in activations or len(activations) > 1:
        kinds = sorted({type(module).__name__ for module in modules})
        tower.problems.append(f"image activations {kinds} have no single transformers equivalent")
    tower.activation = next(iter(activations))
    norms = [norm for block in blocks for norm in (block.norm1, block.norm2)] + [trunk.norm]
    norm_eps(norms + ([pool.norm] if isinstance(pool, AttentionPoolLatent) else []), tower, "the image tower")
    image_size, patch_size = trunk.patch_embed.img_size, trunk.patch_embed.patch_size
    if image_size[0] != image_size[1] or patch_size[0] != patch_size[1]:
        tower.problems.append(f"non-square image {image_size} or patch {patch_size}")
    return tower, {"image_size": image_size[0], "patch_size": patch_size[0]}


def describe(model: nn.Module, token_ids: dict[str, int]) -> tuple[SiglipConfig, list[Pair], list[str]]:
    """``SiglipConfig`` equivalent to ``model``; ``token_ids`` gives pad/bos/eos ids of its tokenizer."""
    vision, vision_details = _vision(model)
    text, details = text_tower_summary(model)
    problems = vision.problems + text.problems
    if details["causal"]:
        problems.append("the text tower is causal; SigLIP's is bidirectional")
    if details["pool_type"] != "last":
        problems.append(f"the text tower pools by {details['pool_type']!r}; SigLIP takes the last position")
    if details["projection"] != "linear_bias":
        problems.append(f"the text projection is {details['projection']!r}; SigLIP's is a Linear with bias")
    if details["cls_emb"] or details["pad_mask"]:
        problems.append("the text tower has a class token or a padding mask, which SigLIP lacks")
    if not problems and details["embed_dim"] != vision.width:
        problems.append(
            f"text embeddings ({details['embed_dim']}) differ in size from the image tower's "
            f"({vision.width}), which SigLIP uses unprojected"
        )
    if problems:
        raise CannotConvert("; ".join(problems))
    _, logit_bias = logit_parameters(model)
    config = SiglipConfig(
        vision_config=dict(
            **vision.hf_sizes(),
            image_size=vision_details["image_size"],
            patch_size=vision_details["patch_size"],
            vision_use_head=True,
        ),
        text_config=dict(
            **text.hf_sizes(),
            vocab_size=details["vocab_size"],
            max_position_embeddings=details["context_length"],
            projection_size=details["embed_dim"],
            **token_ids,
        ),
    )
    notes = [] if logit_bias is not None else ["the model has no logit_bias; SiglipModel's is set to 0"]
    return config, pairs(vision.layers, text.layers, with_bias=logit_bias is not None), notes


def pairs(vision_layers: int, text_layers: int, with_bias: bool = True) -> list[Pair]:
    trunk, head = "visual.trunk", "vision_model.head"
    result = [
        rename(f"{trunk}.pos_embed", "vision_model.embeddings.position_embedding.weight", "unbatch"),
        rename(f"{trunk}.attn_pool.latent", f"{head}.probe"),
        rename("text.token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
        rename("text.positional_embedding", "text_model.embeddings.position_embedding.weight"),
        rename("logit_scale", "logit_scale", "vector"),
    ]
    if with_bias:
        result.append(rename("logit_bias", "logit_bias", "vector"))
    for name in ("weight", "bias"):
        result += [
            rename(f"{trunk}.patch_embed.proj.{name}", f"vision_model.embeddings.patch_embedding.{name}"),
            rename(f"{trunk}.norm.{name}", f"vision_model.post_layernorm.{name}"),
            Pair(
                (f"{trunk}.attn_pool.q.{name}", f"{trunk}.attn_pool.kv.{name}"),
                (f"{head}.attention.in_proj_{name}",),
                open_clip_parts=(1, 2),
            ),
            rename(f"{trunk}.attn_pool.proj.{name}", f"{head}.attention.out_proj.{name}"),
            rename(f"{trunk}.attn_pool.norm.{name}", f"{head}.layernorm.{name}"),
            rename(f"{trunk}.attn_pool.mlp.fc1.{name}", f"{head}.mlp.fc1.{name}"),
            rename(f"{trunk}.attn_pool.mlp.fc2.{name}", f"{head}.mlp.fc2.{name}"),
            rename(f"text.ln_final.{name}", f"text_model.final_layer_norm.{name}"),
            rename(f"text.text_projection.{name}", f"text_model.head.{name}"),
        ]
    for index in range(vision_layers):
        result += timm_block(f"{trunk}.blocks.{index}", f"vision_model.encoder.layers.{index}")
    for index in range(text_layers):
        result += open_clip_block(f"text.transformer.resblocks.{index}", f"text_model.encoder.layers.{index}")
    return result


ARCHITECTURE_FIELDS = {
    "vision_config": (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "image_size",
        "patch_size",
        "hidden_act",
        "layer_norm_eps",
        "vision_use_head",
    ),
    "text_config": (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "max_position_embeddings",
        "hidden_act",
        "layer_norm_eps",
        "projection_size",
    ),
}
