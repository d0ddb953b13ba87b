"""Dense image features: one feature per cell of the image tower's grid, for segmentation and referring expressions.

``encode_dense(model, images)`` runs an open_clip image tower once and returns ``DenseFeatures``:

- ``tokens`` (B, h, w, C): what the segmentation linear probe fits on. A ViT's patch tokens after its last block
  and ``ln_post`` (the class token dropped); a CLIP-ResNet's last feature map (``layer4``, before the attention
  pool).
- ``embeddings`` (B, h, w, D), L2-normalised in the text embeddings' space: what zero-shot segmentation and
  referring expressions compare with text. ``variant`` says how a cell reaches that space:

  * ``"maskclip"`` (``DEFAULT_VARIANT``): MaskCLIP's value embeddings (Zhou et al., 2022, "Extract Free Dense
    Labels from CLIP"). ViT: the last block runs with its attention made the identity (an additive mask that lets
    each token attend to itself only, so its output is the token's own value projection through ``out_proj``,
    nothing mixed in from other tokens); the block's residual and MLP stay, then ``ln_post`` and ``proj``: what
    MaskCLIP's released ViT code computes. ResNet: the attention pool's ``v_proj`` then ``c_proj`` at every
    location of the last feature map (its 1×1-convolution form), no positional embedding.
  * ``"plain"``: the tower's own head applied to every cell as it is to the pooled one. ViT: every patch token
    through ``ln_post`` and ``proj``. ResNet: the attention pool's output at every location, with that location
    as the query (the pooled embedding is the same computation with the mean as the query).

  MaskCLIP is the default because in a trained CLIP the last attention layer spreads the image's global content
  into every patch token (its query-key attention barely depends on the query), so plain patch embeddings name
  the image's main object everywhere; the value path keeps each location's own content, which is what MaskCLIP
  reads dense labels from without training. Both variants come from the same weights, so a tower that trained
  its patches to be local (a dense objective) can be compared either way.

Only open_clip's ``VisionTransformer`` (without an attentional pooler: that pools to learned queries, not
patches) and ``ModifiedResNet`` towers have a grid this module reads; any other tower (timm, a transformers
model) is refused in one line naming its type (``dense_tower``).

The pass calls each block itself instead of hooking the tower's forward (``clipforge.models.outputs``): training
may replace a ViT's forward with the pooled-last-block shortcut (``clipforge.models.shortcuts``), which never
computes the last block's patch tokens, while a block's own call still computes every token.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

VARIANTS = ("maskclip", "plain")
DEFAULT_VARIANT = "maskclip"
VIT, RESNET = "vit", "resnet"


class DenseFeatures(NamedTuple):
    tokens: torch.Tensor | None  # (B, h, w, C) the tower's own features, for a linear probe
    embeddings: torch.Tensor | None  # (B, h, w, D) L2-normalised, in the text embeddings' space

    def to(self, *args, **kwargs) -> DenseFeatures:
        return DenseFeatures(*(None if value is None else value.to(*args, **kwargs) for value in self))


def dense_tower(model: torch.nn.Module) -> str:
    """``VIT`` or ``RESNET``: which grid ``encode_dense`` reads from ``model``'s image tower; any other tower is a
    ValueError in one line naming its type."""
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.transformer import VisionTransformer

    model = getattr(model, "module", model)
    visual = getattr(model, "visual", None)
    if isinstance(visual, VisionTransformer):
        if getattr(visual, "attn_pool", None) is not None:
            raise ValueError(
                "dense evaluation: this VisionTransformer pools with an attentional pooler, whose outputs are "
                "learned queries, not patches, so its patch tokens have no projection into the text space"
            )
        return VIT
    if isinstance(visual, ModifiedResNet):
        return RESNET
    raise ValueError(
        f"dense evaluation: the image tower is a {type(visual).__name__}, which has no patch grid clipforge reads "
        "(it reads open_clip's VisionTransformer patch tokens and ModifiedResNet's last feature map)"
    )


def check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"dense evaluation: variant {variant!r} is not one of {VARIANTS}")


@torch.no_grad()
def encode_dense(
    model: torch.nn.Module,
    images: torch.Tensor,
    variant: str = DEFAULT_VARIANT,
    tokens: bool = True,
    embeddings: bool = True,
) -> DenseFeatures:
    """``DenseFeatures`` of (B, 3, H, W) images (see the module docstring); ``tokens``/``embeddings`` False leaves
    that one None (and its work undone)."""
    check_variant(variant)
    model = getattr(model, "module", model)
    if dense_tower(model) == VIT:
        return _vit(model.visual, images, variant, tokens, embeddings)
    return _resnet(model.visual, images, variant, tokens, embeddings)


def _self_only_mask(length: int, like: torch.Tensor) -> torch.Tensor:
    """(L, L) additive attention mask: 0 on the diagonal, -inf elsewhere, so softmax puts weight exactly 1 on the
    token itself and attention returns each token's value projection through ``out_proj``."""
    mask = torch.full((length, length), float("-inf"), device=like.device, dtype=like.dtype)
    return mask.fill_diagonal_(0.0)


def _vit(visual, images: torch.Tensor, variant: str, want_tokens: bool, want_embeddings: bool) -> DenseFeatures:
    grid_h, grid_w = visual.grid_size
    x = visual._embeds(images.to(visual.conv1.weight.dtype))  # (B, 1 + h·w, width), class token first
    if x.shape[1] != 1 + grid_h * grid_w:
        raise ValueError(
            f"dense evaluation: the ViT gave {x.shape[1]} tokens for its {grid_h}x{grid_w} grid (patch dropout on? "
            "evaluate the model in eval mode)"
        )
    transformer = visual.transformer
    batch_first = getattr(transformer, "batch_first", True)
    if not batch_first:
        x = x.transpose(0, 1)
    *blocks, last = transformer.resblocks
    for block in blocks:
        x = block(x, attn_mask=None)

    def patches(out: torch.Tensor) -> torch.Tensor:  # (B, h, w, width) after ln_post
        out = out if batch_first else out.transpose(0, 1)
        return visual.ln_post(out[:, 1:]).reshape(out.shape[0], grid_h, grid_w, -1)

    plain = patches(last(x, attn_mask=None)) if want_tokens or (want_embeddings and variant == "plain") else None
    embedded = None
    if want_embeddings:
        length = x.shape[1] if batch_first else x.shape[0]
        values = plain if variant == "plain" else patches(last(x, attn_mask=_self_only_mask(length, x)))
        embedded = F.normalize((values @ visual.proj if visual.proj is not None else values).float(), dim=-1)
    return DenseFeatures(plain if want_tokens else None, embedded)


def _resnet(visual, images: torch.Tensor, variant: str, want_tokens: bool, want_embeddings: bool) -> DenseFeatures:
    x = visual.stem(images.to(visual.conv1.weight.dtype))
    for layer in (visual.layer1, visual.layer2, visual.layer3, visual.layer4):
        x = layer(x)
    feature_map = x  # (B, C, h, w)
    embedded = None
    if want_embeddings:
        pool = visual.attnpool
        if variant == "maskclip":
            values = pool.c_proj(pool.v_proj(feature_map.permute(0, 2, 3, 1)))  # (B, h, w, D)
        else:
            batch, _, height, width = feature_map.shape
            values = attention_pool_all(pool, feature_map)[:, 1:].reshape(batch, height, width, -1)
        embedded = F.normalize(values.float(), dim=-1)
    return DenseFeatures(feature_map.permute(0, 2, 3, 1) if want_tokens else None, embedded)


def attention_pool_all(pool, feature_map: torch.Tensor) -> torch.Tensor:
    """open_clip's ``AttentionPool2d`` on a (B, C, h, w) feature map with every location as a query as well as the
    mean: (B, 1 + h·w, D), the mean's output first (the pooled embedding ``pool`` returns), then each location's in
    row-major order."""
    x = feature_map.flatten(2).permute(2, 0, 1)  # (h·w, B, C)
    x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)  # (1 + h·w, B, C)
    x = x + pool.positional_embedding[:, None, :].to(x.dtype)
    x, _ = F.multi_head_attention_forward(
        query=x,
        key=x,
        value=x,
        embed_dim_to_check=x.shape[-1],
        num_heads=pool.num_heads,
        q_proj_weight=pool.q_proj.weight,
        k_proj_weight=pool.k_proj.weight,
        v_proj_weight=pool.v_proj.weight,
        in_proj_weight=None,
        in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
        bias_k=None,
        bias_v=None,
        add_zero_attn=False,
        dropout_p=0.0,
        out_proj_weight=pool.c_proj.weight,
        out_proj_bias=pool.c_proj.bias,
        use_separate_proj_weight=True,
        training=False,
        need_weights=False,
    )
    return x.transpose(0, 1)


def check_dense(encoder) -> None:
    """Refuse, in one line, an encoder that gives no dense features, before any data is read: one without
    ``encode_image_dense`` (a transformers model's ``HFClipEncoder``), or an open_clip one whose tower has no grid
    (``dense_tower``)."""
    if not hasattr(encoder, "encode_image_dense"):
        raise ValueError(
            f"dense evaluation: {type(encoder).__name__} gives no patch features (clipforge reads them from open_clip "
            "towers; a transformers CLIPModel converts exactly with --model ARCH --weights FOLDER)"
        )
    model = getattr(encoder, "model", None)
    if model is not None and hasattr(model, "visual"):
        dense_tower(model)
