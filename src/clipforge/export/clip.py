"""open_clip CLIP (ViT image tower, causal CLIP text transformer) ⇄ transformers ``CLIPModel``.

What makes the two compute the same numbers (checked to 1e-5 by tests/test_export.py):

- Activation: read from the MLP modules (QuickGELU → ``quick_gelu``, GELU → ``gelu``, tanh GELU →
  ``gelu_pytorch_tanh``) and written per tower as ``hidden_act``.
- Image pooling: open_clip LayerNorms every token (``ln_post``) and takes the class token;
  transformers takes the class token and LayerNorms it. A LayerNorm acts per token, so both agree.
- Text pooling: open_clip takes the token at the argmax of the ids, i.e. the first end-of-text
  token (49407 is the largest id its tokenizer emits); transformers takes the first position equal
  to ``eos_token_id``, set to 49407. Because the text tower is causal, no token up to the end of
  text sees the padding, so neither the pad id nor an attention mask changes the embedding.
- Projections: open_clip's ``x @ proj`` matrices are transformers' ``Linear`` weights transposed.

Not convertible (``CannotConvert`` names the reason): a ResNet or timm image tower, attentional
pooling, layer scale, open_clip's custom attention blocks, a bidirectional or non-argmax text
tower, projections with bias, a Hugging Face text tower. A learnable ``logit_bias`` (CLIP
architecture trained with the sigmoid loss) has no place in ``CLIPModel``; it is left out with a
note, and embeddings are unaffected.
"""

from __future__ import annotations

from open_clip.transformer import VisionTransformer
from torch import nn
from transformers import CLIPConfig

from clipforge.export.mapping import Pair, open_clip_block, rename
from clipforge.export.towers import CannotConvert, Tower, logit_parameters, open_clip_blocks, text_tower_summary

START_OF_TEXT, END_OF_TEXT = 49406, 49407


def _vision(model: nn.Module) -> tuple[Tower, dict]:
    visual = model.visual
    tower = Tower("visual.")
    if not isinstance(visual, VisionTransformer):
        kind = type(visual).__name__
        why = {
            "ModifiedResNet": "CLIPModel has no ResNet image tower (this is open_clip's ModifiedResNet, "
            "vision_cfg.layers is a list)",
            "TimmModel": "CLIPModel's image tower is a CLIP ViT, this is a timm model",
        }
        tower.problems.append(why.get(kind, f"CLIPModel's image tower is a CLIP ViT, this is {kind}"))
        return tower, {}
    if visual.attn_pool is not None:
        tower.problems.append("the image tower uses attentional pooling, which CLIPModel does not have")
    if visual.pool_type != "tok":
        tower.problems.append(f"the image tower pools by {visual.pool_type!r}; CLIPModel takes the class token")
    if isinstance(visual.ln_pre, nn.Identity):
        tower.problems.append("the image tower has no pre-LayerNorm (no_ln_pre), CLIPModel always applies one")
    if visual.conv1.bias is not None:
        tower.problems.append("the patch embedding has a bias, CLIPModel's has none")
    if visual.proj is None:
        tower.problems.append("the image tower has no projection")
    height, width = visual.image_size
    patch_height, patch_width = visual.patch_size
    if height != width or patch_height != patch_width:
        tower.problems.append(f"non-square image {visual.image_size} or patch {visual.patch_size}")
    open_clip_blocks(
        visual.transformer.resblocks,
        tower,
        [visual.ln_pre, visual.ln_post] if not isinstance(visual.ln_pre, nn.Identity) else [visual.ln_post],
        "the image tower",
    )
    return tower, {"image_size": height, "patch_size": patch_height}


def describe(model: nn.Module) -> tuple[CLIPConfig, list[Pair], list[str]]:
    """``CLIPConfig`` equivalent to ``model``, the tensor pairs, and notes; ``CannotConvert`` if none is."""
    vision, vision_details = _vision(model)
    text, details = text_tower_summary(model)
    problems = vision.problems + text.problems
    if not details["causal"]:
        problems.append("the text tower is bidirectional (no_causal_mask); CLIPModel's is causal")
    if details["pool_type"] != "argmax" and not (details["pool_type"] == "eos" and details["eos_id"] == END_OF_TEXT):
        problems.append(f"the text tower pools by {details['pool_type']!r}; CLIPModel takes the end-of-text token")
    if details["projection"] != "matrix":
        problems.append(f"the text projection is {details['projection']!r}; CLIPModel's is a Linear without bias")
    if details["cls_emb"] or details["pad_mask"]:
        problems.append("the text tower has a class token or a padding mask (CoCa-style), which CLIPModel lacks")
    if problems:
        raise CannotConvert("; ".join(problems))
    embed_dim = details["embed_dim"]
    if model.visual.proj.shape[1] != embed_dim:
        raise CannotConvert(f"image and text embeddings differ in size ({model.visual.proj.shape[1]} vs {embed_dim})")
    logit_scale, logit_bias = logit_parameters(model)
    config = CLIPConfig(
        projection_dim=embed_dim,
        logit_scale_init_value=float(logit_scale.detach().reshape(())),
        vision_config=dict(
            **vision.hf_sizes(),
            image_size=vision_details["image_size"],
            patch_size=vision_details["patch_size"],
            projection_dim=embed_dim,
        ),
        text_config=dict(
            **text.hf_sizes(),
            vocab_size=details["vocab_size"],
            max_position_embeddings=details["context_length"],
            projection_dim=embed_dim,
            bos_token_id=START_OF_TEXT,
            eos_token_id=END_OF_TEXT,
            pad_token_id=END_OF_TEXT,
        ),
    )
    notes = []
    if logit_bias is not None:
        notes.append(
            f"logit_bias = {float(logit_bias.detach().reshape(())):.4f} is not part of CLIPModel and was "
            "left out (embeddings and rankings are unaffected; sigmoid probabilities need it)"
        )
    return config, pairs(vision.layers, text.layers, text.prefix), notes


def pairs(vision_layers: int, text_layers: int, text_prefix: str = "") -> list[Pair]:
    """open_clip CLIP ⇄ CLIPModel tensors (``text_prefix`` "text." for a CustomTextCLIP)."""
    result = [
        rename("visual.class_embedding", "vision_model.embeddings.class_embedding"),
        rename("visual.conv1.weight", "vision_model.embeddings.patch_embedding.weight"),
        rename("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight"),
        rename("visual.proj", "visual_projection.weight", "transpose"),
        rename(f"{text_prefix}token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
        rename(f"{text_prefix}positional_embedding", "text_model.embeddings.position_embedding.weight"),
        rename(f"{text_prefix}text_projection", "text_projection.weight", "transpose"),
        rename("logit_scale", "logit_scale"),
    ]
    norms = (
        ("visual.ln_pre", "vision_model.pre_layrnorm"),
        ("visual.ln_post", "vision_model.post_layernorm"),
        (f"{text_prefix}ln_final", "text_model.final_layer_norm"),
    )
    result += [rename(f"{ours}.{name}", f"{theirs}.{name}") for ours, theirs in norms for name in ("weight", "bias")]
    for index in range(vision_layers):
        result += open_clip_block(f"visual.transformer.resblocks.{index}", f"vision_model.encoder.layers.{index}")
    for index in range(text_layers):
        result += open_clip_block(f"{text_prefix}transformer.resblocks.{index}", f"text_model.encoder.layers.{index}")
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
    ),
    "": ("projection_dim",),
}
