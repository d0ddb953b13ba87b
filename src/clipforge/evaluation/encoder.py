"""The interface evaluators take: something that embeds images and token ids, plus a tokenizer.

Evaluators never see a model class or a trainer, so the same function runs in the training loop,
from ``clipforge eval``, and on any other dual encoder (a test uses a hand-built fake).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F


class Encoder(Protocol):
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) float images → (N, D) L2-normalised embeddings."""

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, L) token ids → (N, D) L2-normalised embeddings."""


class OpenClipEncoder:
    """Adapts an open_clip model (or a DDP/compiled wrapper of one) to ``Encoder``."""

    def __init__(self, model: torch.nn.Module, device: torch.device | str = "cpu",
                 autocast_dtype: torch.dtype | None = None) -> None:
        self.model = getattr(model, "module", model)
        self.device = torch.device(device)
        self.autocast_dtype = autocast_dtype

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

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


Tokenizer = Callable[[list[str]], torch.Tensor]
