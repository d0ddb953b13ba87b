"""The interface evaluators take: something that embeds images and token ids, plus a tokenizer.

Evaluators never see a model class or a trainer, so the same function runs in the training loop,
from ``clipforge eval``, and on any other dual encoder (a test uses a hand-built fake). Two adapters
ship: ``OpenClipEncoder`` (open_clip models, clipforge checkpoints) and ``HFClipEncoder``
(transformers ``CLIPModel``). ``autocast_dtype=torch.bfloat16`` runs the towers under autocast
(``clipforge eval --amp``); embeddings are always returned in fp32.

``OpenClipEncoder.encode_image_dense`` also gives per-patch features for the dense evaluators
(``clipforge.evaluation.dense``); an encoder without it is refused by them in one line.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F

from clipforge.evaluation.dense import DEFAULT_VARIANT, DenseFeatures, encode_dense

Tokenizer = Callable[[list[str]], torch.Tensor]


class Encoder(Protocol):
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) float images → (N, D) L2-normalised embeddings."""

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, L) token ids → (N, D) L2-normalised embeddings."""


class _Autocast:
    def __init__(self, device: torch.device | str, autocast_dtype: torch.dtype | None) -> None:
        self.device = torch.device(device)
        self.autocast_dtype = autocast_dtype

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)


class OpenClipEncoder(_Autocast):
    """Adapts an open_clip model (or a DDP/compiled wrapper of one) to ``Encoder``."""

    def __init__(
        self, model: torch.nn.Module, device: torch.device | str = "cpu", autocast_dtype: torch.dtype | None = None
    ) -> None:
        super().__init__(device, autocast_dtype)
        self.model = getattr(model, "module", model)

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            features = self.model.encode_image(images.to(self.device))
        return F.normalize(features.float(), dim=-1)

    @torch.no_grad()
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            features = self.model.encode_text(tokens.to(self.device))
        return F.normalize(features.float(), dim=-1)

    @torch.no_grad()
    def encode_image_dense(
        self, images: torch.Tensor, variant: str = DEFAULT_VARIANT, tokens: bool = True, embeddings: bool = True
    ) -> DenseFeatures:
        """(N, 3, H, W) images → ``DenseFeatures`` in fp32: (N, h, w, C) patch tokens and (N, h, w, D) normalised
        patch embeddings (``clipforge.evaluation.dense.encode_dense``)."""
        with self._autocast():
            features = encode_dense(self.model, images.to(self.device), variant, tokens, embeddings)
        return features.to(torch.float32)


def _pooled(output) -> torch.Tensor:
    # transformers >= 5 returns a model output whose pooler_output is the projected embedding.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class HFClipEncoder(_Autocast):
    """Adapts a transformers ``CLIPModel`` to ``Encoder`` (pixel values as its image processor makes them).

    Token ids need no attention mask: the text tower is causal and pools at the first end-of-text
    token, so padding after it changes nothing.
    """

    def __init__(
        self, model: torch.nn.Module, device: torch.device | str = "cpu", autocast_dtype: torch.dtype | None = None
    ) -> None:
        super().__init__(device, autocast_dtype)
        self.model = model

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            features = _pooled(self.model.get_image_features(pixel_values=images.to(self.device)))
        return F.normalize(features.float(), dim=-1)

    @torch.no_grad()
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            features = _pooled(self.model.get_text_features(input_ids=tokens.to(self.device)))
        return F.normalize(features.float(), dim=-1)
