"""LocCa's decoder objective (Wan et al. 2024, "LocCa: Visual Pretraining with Location-aware Captioners"), as
SigLIP 2 trains it beside the sigmoid loss from the first step, at equal weight (Tschannen et al. 2025):

```yaml
loss:
  kind: siglip
  terms:
    - {name: locca, weight: 1.0, options: {depth: 2, referring: 0.25, grounded: 0.25, parallel: 0.5}}
```

A small pre-norm transformer decoder reads the image tower's unpooled tokens (``image_tokens``, layer-normed and
projected to its width) through cross-attention and predicts text over the text tower's vocabulary (so its tokenizer
is the text tower's), with ``bins`` coordinate tokens and four task tokens appended. Each sample gives one decoder
sequence, of one of three tasks:

- captioning: ``[CAP] caption`` → the caption; for a ``parallel`` share of these every caption token is predicted
  at once from mask tokens with no causal mask (CapPa's parallel prediction, Tschannen et al. 2023);
- referring expression comprehension: ``[REF] region caption`` → the region's box as 4 coordinate tokens;
- grounded captioning: ``[GND] 4 coordinate tokens`` → the region's caption.

A sample with regions (the ``regions`` batch field, ``clipforge.data.regions``) is a referring example with
probability ``referring``, a grounded one with probability ``grounded``, and a captioning one otherwise, about one of
its regions drawn uniformly; a sample without (web data) is always captioning. The draws come from a generator seeded
by ``seed`` and the optimizer step and are made for the global batch, each rank taking its rows, so they depend on a
sample's place in the global batch only: one process and N ranks (and a resumed run) make the same ones.

Coordinates in [0, 1] of the crop are quantised into ``bins`` equal bins, token ``vocab + floor(v · bins)``; a
token's value is its bin's centre, so a coordinate comes back within half a bin (``quantize``, ``dequantize``).

Every sequence is padded to one length, 1 + the text tower's context length (less its start token) + 4, so the
decoder's shapes and work per sample are fixed (``train_flops``). The loss is the mean token cross-entropy of each
task over the global batch's target tokens, one term each (``locca_caption``, ``locca_referring``,
``locca_grounded``; 0 for a task with no example in the step): every rank divides its tokens' sum by the global count
(one all-reduce of three numbers) times the world size, which the data-parallel gradient average turns into the
global mean. The logged value is rank 0's share so scaled. The output head runs at the target positions only (most
positions of a short caption carry none, and the (positions, vocabulary) logits are the decoder's largest cost);
its logits are computed ``logits_chunk`` sequences' worth of positions at a time and recomputed in the backward (a
(B, T, vocab) tensor is gigabytes at a real batch and vocabulary).

The decoder is training state only: attached under ``objectives.`` it trains, is checkpointed and sharded with the
towers, and no export holds it.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import is_fake
from torch.utils.checkpoint import checkpoint

from clipforge.losses.objective import Objective, ObjectiveContext, RegionsField, read_options

TASKS = ("caption", "referring", "grounded")
TASK_TOKENS = 4  # [CAP], [REF], [GND] and the mask token of parallel prediction, after the coordinate bins


@dataclass
class LocCaOptions:
    """The objective's options (``loss.terms[].options``)."""

    depth: int = 2  # decoder blocks
    width: int = 0  # decoder width; 0: the text tower's
    heads: int = 0  # attention heads; 0: the text tower's
    mlp_ratio: float = 4.0
    bins: int = 1000  # coordinate tokens per axis value
    referring: float = 0.25  # probability that a sample with regions is a referring example
    grounded: float = 0.25  # ... a grounded-captioning example
    parallel: float = 0.5  # share of captioning examples predicted in parallel
    max_regions: int = 8  # regions per sample the loader keeps
    logits_chunk: int = 32  # sequences whose logits are made at once (recomputed in the backward); 0: all
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("depth", "bins", "max_regions"):
            if getattr(self, name) < 1:
                raise ValueError(f"option {name} must be at least 1, got {getattr(self, name)}")
        for name in ("width", "heads", "logits_chunk"):
            if getattr(self, name) < 0:
                raise ValueError(f"option {name} must be >= 0, got {getattr(self, name)}")
        if not self.mlp_ratio > 0:
            raise ValueError(f"option mlp_ratio must be positive, got {self.mlp_ratio}")
        for name in ("referring", "grounded", "parallel"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"option {name} is a probability in [0, 1], got {getattr(self, name)}")
        if self.referring + self.grounded > 1:
            raise ValueError(f"options referring + grounded must be at most 1, got {self.referring + self.grounded}")


def quantize(values: torch.Tensor, bins: int) -> torch.Tensor:
    """Coordinates in [0, 1] → bin indices in [0, bins): the bin each value falls in (1.0 in the last)."""
    return (values * bins).floor().clamp(0, bins - 1).long()


def dequantize(indices: torch.Tensor, bins: int) -> torch.Tensor:
    """Bin indices → the bins' centres, within half a bin of every value ``quantize`` put there."""
    return (indices.float() + 0.5) / bins


@dataclass(frozen=True)
class TextTower:
    """What the decoder takes from the text tower: its vocabulary, width, heads, context length, and how a tokenised
    caption's length is read (open_clip's tokenizer starts with a start token and ends with the highest id, the
    end-of-text token, which its ``argmax`` pooling finds; others end where the padding starts)."""

    vocab_size: int
    width: int
    heads: int
    context_length: int
    argmax_end: bool
    pad_id: int

    @classmethod
    def of(cls, model: nn.Module) -> TextTower:
        text = getattr(model, "text", model)  # open_clip's CustomTextCLIP keeps its text tower apart
        transformer = getattr(text, "transformer", None)
        blocks = getattr(transformer, "resblocks", None)
        if not hasattr(text, "vocab_size") or not hasattr(text, "context_length") or not blocks:
            raise ValueError(
                f"locca needs open_clip's text transformer to share its tokenizer and vocabulary; this model's text "
                f"tower is a {type(text).__name__}"
            )
        pooling = getattr(text, "text_pool_type", getattr(text, "pool_type", "argmax"))
        return cls(
            int(text.vocab_size),
            int(transformer.width),
            int(blocks[0].attn.num_heads),
            int(text.context_length),
            pooling == "argmax",
            int(getattr(text, "pad_id", 0)),
        )

    @property
    def start(self) -> int:
        """Leading tokens that are not the caption's (open_clip's start token)."""
        return 1 if self.argmax_end else 0

    def lengths(self, tokens: torch.Tensor) -> torch.Tensor:
        """(..., L) tokens → (...,) how many tokens after the start token are the caption's, its end token included
        (0 for an all-padding row)."""
        if self.argmax_end:
            return (tokens.argmax(dim=-1) + 1 - self.start).clamp_min(0) * (tokens.amax(dim=-1) > 0)
        return (tokens != self.pad_id).sum(dim=-1)


def image_token_width(model: nn.Module) -> int:
    """The width of the ``image_tokens`` the model gives (``clipforge.models.outputs``)."""
    visual = getattr(model, "visual", None)
    if visual is not None and hasattr(visual, "transformer") and hasattr(visual, "conv1"):
        return int(visual.transformer.width)
    if visual is not None and hasattr(visual, "attnpool"):
        return int(visual.attnpool.k_proj.in_features)  # a CLIP-ResNet's last feature map's channels
    raise ValueError(f"locca: cannot tell the width of a {type(visual).__name__} image tower's tokens")


class Attention(nn.Module):
    """Multi-head attention of ``x`` (B, T, d) over ``context`` (B, N, d) (``x`` itself for self-attention)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query, self.key_value, self.out = (
            nn.Linear(width, width),
            nn.Linear(width, 2 * width),
            nn.Linear(width, width),
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, length, width = x.shape
        query = self.query(x).view(batch, length, self.heads, -1).transpose(1, 2)  # (B, h, T, d/h)
        key, value = self.key_value(context).view(batch, context.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        mixed = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)  # (B, h, T, d/h)
        return self.out(mixed.transpose(1, 2).reshape(batch, length, width))


class DecoderBlock(nn.Module):
    """Pre-norm: causal (or, for parallel prediction, full) self-attention, cross-attention to the image, MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.norm_self, self.self_attention = nn.LayerNorm(width), Attention(width, heads)
        self.norm_cross, self.cross_attention = nn.LayerNorm(width), Attention(width, heads)
        self.norm_mlp = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        normed = self.norm_self(x)
        x = x + self.self_attention(normed, normed, mask)
        x = x + self.cross_attention(self.norm_cross(x), image)
        return x + self.mlp(self.norm_mlp(x))


class Decoder(nn.Module):
    """Tokens (B, T) and image tokens (B, N, image_width) → hidden states (B, T, width), before the output head."""

    def __init__(
        self, vocab_size: int, length: int, image_width: int, width: int, depth: int, heads: int, mlp_ratio: float
    ) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"the decoder width {width} is not a multiple of its {heads} heads")
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.randn(length, width) * 0.01)
        self.image_norm, self.image_projection = nn.LayerNorm(image_width), nn.Linear(image_width, width)
        self.blocks = nn.ModuleList(DecoderBlock(width, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size)
        nn.init.normal_(self.token_embedding.weight, std=0.02)

    def forward(self, tokens: torch.Tensor, image_tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        image = self.image_projection(self.image_norm(image_tokens))  # (B, N, width)
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x, image, mask)
        return self.norm(x)


def _token_losses(hidden: torch.Tensor, targets: torch.Tensor, head: nn.Linear) -> torch.Tensor:
    """(n, d) hidden states, (n,) targets → (n,) cross-entropy, in fp32."""
    return F.cross_entropy(head(hidden).float(), targets, reduction="none")


class LocCa(Objective):
    term_names = tuple(f"locca_{task}" for task in TASKS)
    model_outputs = ("image_tokens",)

    def __init__(self, options: LocCaOptions, text: TextTower, image_width: int, context: ObjectiveContext) -> None:
        super().__init__()
        self.options, self.text = options, text
        self.batch_fields = (RegionsField(options.max_regions),)
        self.content = text.context_length - text.start  # caption tokens a sequence holds, the end token included
        self.length = self.content + 4  # decoder input: task token + content + 4 coordinates, less the last token
        self.coordinates = text.vocab_size  # first coordinate token; the task tokens follow the bins
        self.task_token = {task: text.vocab_size + options.bins + i for i, task in enumerate(TASKS)}
        self.mask_token = text.vocab_size + options.bins + len(TASKS)
        width = options.width or text.width
        self.decoder = Decoder(
            text.vocab_size + options.bins + TASK_TOKENS,
            self.length,
            image_width,
            width,
            options.depth,
            options.heads or text.heads,
            options.mlp_ratio,
        )
        self.rank, self.world_size, self.group = context.rank, context.world_size, context.group
        self.step, self.autocast = context.step, context.autocast

    def _draws(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """(B, 3) uniforms for this rank's samples (task, region, parallel), drawn for the whole global batch."""
        generator = torch.Generator(device=device)
        step = self.step() if self.step is not None else 0
        generator.manual_seed((self.options.seed << 32) + step)
        every = torch.rand(self.world_size * batch_size, 3, generator=generator, device=device)
        return every[self.rank * batch_size : (self.rank + 1) * batch_size]

    def _content(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) tokens → (B, content): the caption's tokens after the start token, padded with zeros."""
        content = tokens[:, self.text.start : self.text.start + self.content]
        return F.pad(content, (0, self.content - content.shape[1]))

    def sequences(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The decoder's inputs (B, T), targets (B, T), each target's task (B, T; -1 for no target), and the
        attention mask (B, 1, T, T), from the captions, the regions and this step's draws."""
        texts, count = batch["texts"], batch["region_count"]
        batch_size, device = texts.shape[0], texts.device
        draws = self._draws(batch_size, device)
        rows = torch.arange(batch_size, device=device)
        has_regions = count > 0
        task = torch.where(has_regions & (draws[:, 0] < self.options.referring), 1, 0)
        task = torch.where(
            has_regions & (task == 0) & (draws[:, 0] < self.options.referring + self.options.grounded), 2, task
        )
        region = torch.minimum((draws[:, 1] * count).long(), (count - 1).clamp_min(0))  # (B,)
        parallel = (task == 0) & (draws[:, 2] < self.options.parallel)

        caption, caption_length = self._content(texts), self.text.lengths(texts)  # (B, C), (B,)
        region_tokens = batch["region_captions"][rows, region]  # (B, L)
        phrase, phrase_length = self._content(region_tokens), self.text.lengths(region_tokens)
        box = self.coordinates + quantize(batch["region_boxes"][rows, region], self.options.bins)  # (B, 4)

        zeros = torch.zeros(batch_size, 4, dtype=texts.dtype, device=device)
        first = torch.zeros(batch_size, 1, dtype=texts.dtype, device=device)
        captioning = torch.cat([first + self.task_token["caption"], caption, zeros], dim=1)  # (B, S), S = T + 1
        grounded = torch.cat([first + self.task_token["grounded"], box, phrase], dim=1)
        position = torch.arange(self.length + 1, device=device).expand(batch_size, -1)  # (B, S)
        after_phrase = (position - 1 - phrase_length[:, None]).clamp(0, 3)
        referring = torch.where(
            position <= phrase_length[:, None],
            torch.cat([phrase, zeros], dim=1).gather(1, (position - 1).clamp_min(0)),
            torch.where(position <= phrase_length[:, None] + 4, box.gather(1, after_phrase), 0),
        )
        referring[:, 0] = self.task_token["referring"]
        sequence = torch.where((task == 1)[:, None], referring, torch.where((task == 2)[:, None], grounded, captioning))
        inputs, targets = sequence[:, :-1], sequence[:, 1:]

        step = position[:, :-1]  # the input position t predicts sequence[t + 1]
        target_end = torch.where(
            task == 0, caption_length, torch.where(task == 1, phrase_length + 4, 4 + phrase_length)
        )
        target_start = torch.where(task == 1, phrase_length, torch.where(task == 2, 4, 0))
        is_target = (step >= target_start[:, None]) & (step < target_end[:, None])
        target_task = torch.where(is_target, task[:, None], -1)

        inputs = torch.where(parallel[:, None] & (step >= 1), self.mask_token, inputs)
        causal = torch.ones(self.length, self.length, dtype=torch.bool, device=device).tril()
        mask = causal | parallel[:, None, None]  # parallel prediction: every position sees every other
        return inputs, targets, target_task, mask[:, None]

    def forward(self, outputs, batch):
        inputs, targets, target_task, mask = self.sequences(batch)
        # the output head runs at the target positions only: a caption shorter than the context leaves most
        # positions without one, and the (positions, vocabulary) logits are the decoder's largest cost
        with self.autocast() if self.autocast is not None else nullcontext():
            hidden = self.decoder(inputs, outputs["image_tokens"], mask)  # (B, T, width)
            if is_fake(target_task):  # clipforge plan: the count is unknown; a full caption's, the most there can be
                keep = slice(0, self.content)
                hidden, targets = hidden[:, keep].flatten(0, 1), targets[:, keep].flatten()
                tasks = target_task[:, keep].flatten()
            else:
                where = target_task >= 0  # (B, T); selecting them is one host sync on a GPU
                hidden, targets, tasks = hidden[where], targets[where], target_task[where]  # n target tokens here
            losses = self._losses(hidden, targets)  # (n,) fp32
        chosen = torch.stack([tasks == i for i in range(len(TASKS))])  # (3, n)
        counts = chosen.sum(dim=1).float()  # (3,) target tokens of each task here
        if self.world_size > 1:
            dist.all_reduce(counts, group=self.group)  # over the global batch
        sums = (losses.unsqueeze(0) * chosen).sum(dim=1)  # (3,)
        terms = sums / counts.clamp_min(1) * self.world_size
        return {name: terms[i] for i, name in enumerate(self.term_names)}

    def _losses(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(n, width) hidden states at target positions and their (n,) targets → (n,) token losses, the logits made
        ``logits_chunk`` sequences' worth of positions at a time and recomputed in the backward."""
        chunk = self.options.logits_chunk * self.length
        if not chunk or hidden.shape[0] <= chunk:
            return _token_losses(hidden, targets, self.decoder.head)
        parts = [
            checkpoint(_token_losses, part, target, self.decoder.head, use_reentrant=False)
            for part, target in zip(hidden.split(chunk), targets.split(chunk))
        ]
        return torch.cat(parts)

    def train_flops(self, image_tokens: int, image_trainable: bool = True) -> float:
        """Matmul FLOPs per sample (norms, activations, the softmax are not counted, as in ``clipforge.train.flops``):
        the image projection, each block's projections and attention (scores and weighted sum over T² and T·N), the
        MLP, the output head; the backward twice the forward, less the image projection's input gradient when the
        image tokens need none. The logits' recomputation (``logits_chunk``) is hardware work, not model work.

        The head runs at the target positions only, which depend on the captions' lengths; it is charged here for
        every position a caption can fill (the content length), an upper bound: with captions much shorter than
        the context, MFU overstates by the head's share of the positions left empty."""
        tokens, image, width = self.length, image_tokens, self.decoder.norm.normalized_shape[0]
        image_width = self.decoder.image_projection.in_features
        hidden = self.decoder.blocks[0].mlp[0].out_features
        vocab = self.decoder.head.out_features
        block = (
            2 * tokens * 4 * width * width  # self-attention: query, key, value, out
            + 4 * tokens * tokens * width  # its scores and weighted sum
            + 2 * tokens * 2 * width * width  # cross-attention: query, out
            + 2 * image * 2 * width * width  # its keys and values
            + 4 * tokens * image * width  # its scores and weighted sum
            + 2 * tokens * 2 * width * hidden  # MLP
        )
        projection = 2 * image * image_width * width
        forward = projection + len(self.decoder.blocks) * block + 2 * self.content * width * vocab
        return float(3 * forward - (0 if image_trainable else projection))


def build(options: dict, context: ObjectiveContext) -> LocCa:
    parsed = read_options(LocCaOptions, options, "locca")
    if context.model is None:
        raise ValueError("locca builds its decoder from the model's towers: the context has no model")
    return LocCa(parsed, TextTower.of(context.model), image_token_width(context.model), context)
