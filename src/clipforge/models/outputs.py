"""Model outputs beyond the pooled embeddings, made only when an objective asks for them.

``OutputCapture(model, ("image_tokens", ...))`` registers forward hooks that keep the towers' unpooled output tokens of
each forward; ``take()`` hands them over (and forgets them). With no outputs requested nothing is registered, so the
model runs exactly as before. Hooks fire inside DDP's and FSDP's forward and under gradient checkpointing, and the
kept tensors are part of the autograd graph, so a loss on them trains the towers.

- ``image_tokens``: (B, N, width) — a ViT's residual stream after its last block (class token first, before
  ``ln_post`` and the projection); a CLIP-ResNet's last feature map as (B, H·W, channels) tokens.
- ``text_tokens``: (B, L, width) — the text transformer's output before ``ln_final`` and pooling.

Every token of the last block must then be computed: the pooled-last-block shortcut (``clipforge.models.shortcuts``)
keeps only the pooled token, so ``needs_every_token`` tells the trainer to leave it off.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

OUTPUTS = ("image_tokens", "text_tokens")


def _image_token_module(model: torch.nn.Module) -> tuple[torch.nn.Module, bool]:
    """The module whose output is the image tokens, and whether that output is a (B, C, H, W) feature map."""
    visual = getattr(model, "visual", None)
    if visual is not None and hasattr(visual, "transformer") and hasattr(visual, "conv1"):
        return visual.transformer, False  # open_clip VisionTransformer
    if visual is not None and hasattr(visual, "layer4"):
        return visual.layer4, True  # open_clip ModifiedResNet
    raise ValueError(
        f"image_tokens: cannot find the unpooled tokens of a {type(visual).__name__} image tower "
        "(clipforge reads them from open_clip's VisionTransformer and ModifiedResNet)"
    )


def _text_token_module(model: torch.nn.Module) -> torch.nn.Module:
    transformer = getattr(model, "transformer", None)
    if transformer is None:
        raise ValueError(
            f"text_tokens: cannot find the text transformer of a {type(model).__name__} (open_clip's CLIP text tower)"
        )
    return transformer


def needs_every_token(outputs: Iterable[str]) -> bool:
    return any(name in OUTPUTS for name in outputs)


class OutputCapture:
    """Forward hooks on ``model`` (the plain, unwrapped one) that keep the requested outputs of the last forward."""

    def __init__(self, model: torch.nn.Module, outputs: Iterable[str] = ()) -> None:
        self.outputs = tuple(dict.fromkeys(outputs))
        unknown = [name for name in self.outputs if name not in OUTPUTS]
        if unknown:
            raise ValueError(f"model outputs {unknown}: not one of {OUTPUTS}")
        self.kept: dict[str, torch.Tensor] = {}
        self.handles = []
        if "image_tokens" in self.outputs:
            module, feature_map = _image_token_module(model)
            self.handles.append(module.register_forward_hook(self._keeper("image_tokens", feature_map)))
        if "text_tokens" in self.outputs:
            self.handles.append(_text_token_module(model).register_forward_hook(self._keeper("text_tokens", False)))

    def _keeper(self, name: str, feature_map: bool):
        def keep(module, inputs, output) -> None:
            tokens = output[0] if isinstance(output, tuple) else output
            if feature_map:  # (B, C, H, W) → (B, H·W, C)
                tokens = tokens.flatten(2).transpose(1, 2)
            self.kept[name] = tokens

        return keep

    def take(self) -> dict[str, torch.Tensor]:
        """The outputs of the last forward; a missing one (the tower did not run) is an error naming it."""
        missing = [name for name in self.outputs if name not in self.kept]
        if missing:
            raise RuntimeError(f"model outputs {missing} were requested but the forward did not produce them")
        kept, self.kept = self.kept, {}
        return kept

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
