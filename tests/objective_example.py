"""An objective written the way a user adds one: this file, plus one line that registers it
(``TERMS["mean_colour"] = "objective_example:build"``, in tests/test_objectives.py).

It needs a batch field the loader does not know (each image's mean colour, made in the data workers) and a model
output beyond the pooled embeddings (the image tower's patch tokens), and it owns a trainable head: a linear map
from the mean patch token to the colour, trained with a squared error. Nothing else in clipforge changes for it.
"""

import torch
import torch.nn.functional as F

from clipforge.losses import Objective, SampleField


def mean_colour(image: torch.Tensor, caption: str) -> torch.Tensor:
    """The image's mean RGB in [0, 1], (3,), from the uint8 (3, H, W) training image."""
    return image.float().mean(dim=(1, 2)) / 255


class MeanColour(Objective):
    term_names = ("mean_colour",)
    model_outputs = ("image_tokens",)
    batch_fields = (SampleField("mean_colour", mean_colour),)

    def __init__(self, width: int) -> None:
        super().__init__()
        self.head = torch.nn.Linear(width, 3)

    def forward(self, outputs, batch):
        patches = outputs["image_tokens"][:, 1:].mean(dim=1)  # (B, width): the patch tokens, class token left out
        return {"mean_colour": F.mse_loss(self.head(patches), batch["mean_colour"])}


def build(options: dict, context) -> MeanColour:
    if options:
        raise ValueError(f"unknown options {sorted(options)} (mean_colour takes none)")
    return MeanColour(context.model.visual.transformer.width)
