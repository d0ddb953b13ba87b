"""Tensor-by-tensor correspondence between open_clip and transformers state dicts, usable both ways.

A ``Pair`` says which open_clip tensors hold the same numbers as which transformers tensors:
renamed, transposed, with a leading batch axis dropped, or a fused projection split along its
first axis (open_clip's ``in_proj_weight`` = transformers' q, k, v stacked). ``convert`` applies
a list of pairs in either direction and refuses to drop or invent a tensor, so a conversion is
bit-exact by construction: only renames, transposes, views and concatenations, no arithmetic.

Hand-written because no library maps open_clip's own modules to ``CLIPModel``/``SiglipModel``:
transformers 5.x ships no conversion scripts in its wheel (the old
``convert_clip_original_pytorch_to_hf.py`` mapped OpenAI's checkpoints and is the model for the
names here), and open_clip's ``convert.py`` only reads big_vision and MobileCLIP checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Pair:
    open_clip: tuple[str, ...]
    """open_clip keys; several are concatenated along the first axis (in order) to form the tensor."""
    hf: tuple[str, ...]
    """transformers keys; several are equal-sized pieces of the tensor along its first axis."""
    kind: str = "copy"
    """copy | transpose (2-D, x @ W in open_clip vs Linear in transformers) | unbatch (open_clip has a
    leading axis of 1) | vector (transformers stores a scalar as shape (1,))."""
    open_clip_parts: tuple[int, ...] | None = None
    """Relative sizes of the open_clip pieces when they differ (timm's q and fused kv: (1, 2))."""


def rename(open_clip: str, hf: str, kind: str = "copy") -> Pair:
    return Pair((open_clip,), (hf,), kind)


def _to_hf(tensor: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "transpose":
        return tensor.t()
    if kind == "unbatch":
        return tensor.squeeze(0)
    if kind == "vector":
        return tensor.reshape(1)
    return tensor


def _to_open_clip(tensor: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "transpose":
        return tensor.t()
    if kind == "unbatch":
        return tensor.unsqueeze(0)
    if kind == "vector":
        return tensor.reshape(())
    return tensor


def _split(tensor: torch.Tensor, count: int, parts: tuple[int, ...] | None) -> tuple[torch.Tensor, ...]:
    if count == 1:
        return (tensor,)
    parts = parts or (1,) * count
    unit, remainder = divmod(tensor.shape[0], sum(parts))
    assert not remainder and len(parts) == count, (tensor.shape, parts)
    return torch.split(tensor, [unit * part for part in parts])


def convert(pairs: list[Pair], state_dict: dict[str, torch.Tensor], to_hf: bool) -> dict[str, torch.Tensor]:
    """Map ``state_dict`` (open_clip keys if ``to_hf`` else transformers keys) to the other side.

    Every source tensor must be used by exactly one pair: a leftover means the architecture holds
    weights the other side has no place for, which is an error rather than a silent loss.
    Returned tensors are fresh contiguous copies (safetensors refuses tensors sharing storage).
    """
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for pair in pairs:
        sources, targets = (pair.open_clip, pair.hf) if to_hf else (pair.hf, pair.open_clip)
        missing = [key for key in sources if key not in state_dict]
        if missing:
            raise KeyError(f"expected tensor(s) {missing} are missing")
        used.update(sources)
        tensor = torch.cat([state_dict[key] for key in sources]) if len(sources) > 1 else state_dict[sources[0]]
        if to_hf:
            tensor = _to_hf(tensor, pair.kind)
            pieces = _split(tensor, len(targets), None)
        else:
            pieces = _split(tensor, len(targets), pair.open_clip_parts)
            pieces = tuple(_to_open_clip(piece, pair.kind) for piece in pieces)
        for key, piece in zip(targets, pieces):
            out[key] = piece.clone(memory_format=torch.contiguous_format)
    leftover = sorted(set(state_dict) - used)
    if leftover:
        raise KeyError(f"{len(leftover)} tensor(s) have no counterpart: {leftover[:8]}")
    return out


def open_clip_block(source: str, target: str) -> list[Pair]:
    """An open_clip ``ResidualAttentionBlock`` (nn.MultiheadAttention) ⇄ a CLIP/SigLIP encoder layer."""
    pairs = [
        Pair((f"{source}.attn.in_proj_{name}",), tuple(f"{target}.self_attn.{p}_proj.{name}" for p in "qkv"))
        for name in ("weight", "bias")
    ]
    for ours, theirs in (
        ("ln_1", "layer_norm1"),
        ("ln_2", "layer_norm2"),
        ("mlp.c_fc", "mlp.fc1"),
        ("mlp.c_proj", "mlp.fc2"),
        ("attn.out_proj", "self_attn.out_proj"),
    ):
        pairs += [rename(f"{source}.{ours}.{name}", f"{target}.{theirs}.{name}") for name in ("weight", "bias")]
    return pairs


def timm_block(source: str, target: str) -> list[Pair]:
    """A timm ViT ``Block`` (fused qkv Linear) ⇄ a SigLIP encoder layer."""
    pairs = [
        Pair((f"{source}.attn.qkv.{name}",), tuple(f"{target}.self_attn.{p}_proj.{name}" for p in "qkv"))
        for name in ("weight", "bias")
    ]
    for ours, theirs in (
        ("norm1", "layer_norm1"),
        ("norm2", "layer_norm2"),
        ("mlp.fc1", "mlp.fc1"),
        ("mlp.fc2", "mlp.fc2"),
        ("attn.proj", "self_attn.out_proj"),
    ):
        pairs += [rename(f"{source}.{ours}.{name}", f"{target}.{theirs}.{name}") for name in ("weight", "bias")]
    return pairs
