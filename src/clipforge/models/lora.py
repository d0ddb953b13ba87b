"""LoRA on open_clip's transformer blocks, in weight space, so that every attention path computes with it.

A LoRA adapter adds a trained low-rank update to a frozen weight: ``W' = W + (alpha / rank) B A`` with ``A`` of shape
(rank, in) and ``B`` (out, rank), ``B`` starting at zero so that the adapted model starts as the base model (Hu et
al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"; PEFT's initialisation: ``A`` Kaiming-uniform).

open_clip keeps q, k and v in one fused ``in_proj_weight`` of shape (3E, E) (``nn.MultiheadAttention``), which
PEFT's LoRA, made for separate ``nn.Linear`` layers, does not adapt; and ``nn.MultiheadAttention`` passes
``out_proj.weight`` straight to ``F.multi_head_attention_forward``, so an adapter in ``out_proj.forward`` is never
called and never trains. Here the adapter is a ``torch.nn.utils.parametrize`` parametrization of the weight itself:
reading ``attn.in_proj_weight`` or ``attn.out_proj.weight`` gives ``W + delta``, whoever reads it — torch's own
attention (training and inference fast paths), clipforge's packed attention (``clipforge.models.attention``), the
pooled last block (``clipforge.models.shortcuts``), gradient checkpointing's recomputation and FSDP2's gathered
blocks alike. The fused projection gets one (A, B) pair per chosen slice (q: rows 0..E, k: E..2E, v: 2E..3E), the
shape of transformers' separate ``q_proj`` / ``k_proj`` / ``v_proj`` adapters; ``out_proj`` and the MLP's ``c_fc``
and ``c_proj`` one pair each.

Dropout (``model.lora_dropout``) drops input features of the low-rank path: columns of ``A``, scaled by 1 / (1 -
p), one mask per target and forward pass, shared by every token. PEFT draws one mask per token (dropout on the
input ``x``); a weight-space adapter cannot, since the weight is one for the whole batch.

The state dict of an adapted module holds ``NAME.parametrizations.WEIGHT.original`` (the frozen base weight) and
``NAME.parametrizations.WEIGHT.0.lora_a_q`` / ``lora_b_q`` / ... / ``scaling`` (alpha / rank, a buffer, so that a
state dict alone can be merged). ``merge_lora(model)`` folds every adapter into its base weight and removes the
parametrizations (the model's classes and state-dict keys are the plain model's again); ``merged_state_dict`` does
the same to a state dict, for a checkpoint loaded into a plain model (``clipforge.model_loading``). Both compute
the merged weight with the same operations as the adapted forward, so merged and adapted models give the same
numbers.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

TARGETS = ("q", "k", "v", "out", "mlp")
FUSED = ("q", "k", "v")  # the slices of the fused in_proj_weight, in its row order
MARKER = ".parametrizations."
ORIGINAL = "original"


def low_rank_update(
    weight: torch.Tensor,
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    scaling: torch.Tensor,
) -> torch.Tensor:
    """``weight`` plus ``scaling * B @ A`` for each ``factors[name] = (A, B)``: name "" adapts the whole matrix,
    "q"/"k"/"v" a third of its rows (the fused projection's slice); rows without a factor are ``weight``'s own."""
    if "" in factors:
        down, up = factors[""]
        return weight + scaling * (up @ down)
    parts = []
    for name, rows in zip(FUSED, weight.chunk(3, dim=0), strict=True):
        if name in factors:
            down, up = factors[name]
            rows = rows + scaling * (up @ down)
        parts.append(rows)
    return torch.cat(parts)


class LowRankUpdate(nn.Module):
    """The parametrization ``W -> W + (alpha / rank) B A`` of one weight, with one (A, B) per slice in ``slices``
    ("" for the whole weight, else some of "q", "k", "v" of a fused (3E, E) projection)."""

    def __init__(
        self, weight: torch.Tensor, slices: tuple[str, ...], rank: int, alpha: float, dropout: float = 0.0
    ) -> None:
        super().__init__()
        out_features, in_features = weight.shape
        if slices != ("",):
            out_features //= 3
        self.slices = slices
        self.dropout = dropout
        for name in slices:
            down = torch.empty(rank, in_features, dtype=weight.dtype, device=weight.device)
            nn.init.kaiming_uniform_(down, a=math.sqrt(5))  # PEFT's init of lora_A (nn.Linear's default)
            self.register_parameter(_factor("a", name), nn.Parameter(down))
            up = torch.zeros(out_features, rank, dtype=weight.dtype, device=weight.device)
            self.register_parameter(_factor("b", name), nn.Parameter(up))
        self.register_buffer("scaling", torch.tensor(alpha / rank, dtype=torch.float32))

    def factors(self, dropout: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        result = {}
        for name in self.slices:
            down, up = getattr(self, _factor("a", name)), getattr(self, _factor("b", name))
            if dropout and self.dropout > 0:
                keep = torch.empty(down.shape[1], dtype=down.dtype, device=down.device).bernoulli_(1 - self.dropout)
                down = down * (keep / (1 - self.dropout))
            result[name] = (down, up)
        return result

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return low_rank_update(weight, self.factors(dropout=self.training), self.scaling.to(weight.dtype))

    def extra_repr(self) -> str:
        rank = getattr(self, _factor("a", self.slices[0])).shape[0]
        return f"slices={self.slices}, rank={rank}, scaling={self.scaling.item():g}, dropout={self.dropout}"


def _factor(which: str, name: str) -> str:
    return f"lora_{which}_{name}" if name else f"lora_{which}"


def adapt_block(
    block: nn.Module, targets: tuple[str, ...] | list[str], rank: int, alpha: float, dropout: float = 0.0
) -> list[str]:
    """LoRA on one open_clip residual block (``attn`` with a fused ``in_proj_weight`` and an ``out_proj``; ``mlp``
    with ``c_fc`` and ``c_proj``); returns the weights adapted, as names inside the block."""
    attention, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
    fused = tuple(name for name in FUSED if name in targets)
    wanted = []
    if fused:
        if not isinstance(getattr(attention, "in_proj_weight", None), torch.Tensor):
            raise ValueError(f"{type(block).__name__} has no fused attention projection (attn.in_proj_weight)")
        wanted.append(("attn", attention, "in_proj_weight", fused))
    if "out" in targets:
        if not isinstance(getattr(attention, "out_proj", None), nn.Linear):
            raise ValueError(f"{type(block).__name__} has no attention output projection (attn.out_proj)")
        wanted.append(("attn.out_proj", attention.out_proj, "weight", ("",)))
    if "mlp" in targets:
        layers = [getattr(mlp, name, None) for name in ("c_fc", "c_proj")]
        if not all(isinstance(layer, nn.Linear) for layer in layers):
            raise ValueError(f"{type(block).__name__} has no MLP of two linear layers (mlp.c_fc, mlp.c_proj)")
        wanted += [(f"mlp.{name}", layer, "weight", ("",)) for name, layer in zip(("c_fc", "c_proj"), layers)]
    adapted = []
    for path, module, weight_name, slices in wanted:
        update = LowRankUpdate(getattr(module, weight_name), slices, rank, alpha, dropout)
        parametrize.register_parametrization(module, weight_name, update)
        adapted.append(f"{path}.{weight_name}")
    return adapted


def lora_modules(model: nn.Module) -> list[tuple[nn.Module, str, LowRankUpdate]]:
    """Every (module, weight name, adapter) of ``model``."""
    found = []
    for module in model.modules():
        if parametrize.is_parametrized(module):
            for name, chain in module.parametrizations.items():
                found += [(module, name, update) for update in chain if isinstance(update, LowRankUpdate)]
    return found


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' own parameters (the A and B factors)."""
    return [parameter for _, _, update in lora_modules(model) for parameter in update.parameters()]


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA adapter of ``model`` into its base weight (no dropout) and remove it: the model's modules,
    parameters and state-dict keys are the plain model's again, its outputs those of the adapted model in eval
    mode. The base weights keep their ``requires_grad``. Returns how many weights were merged."""
    merged = 0
    for module, name, update in lora_modules(model):
        chain = module.parametrizations[name]
        if len(chain) != 1:
            raise ValueError(f"{name} of {type(module).__name__} has other parametrizations than LoRA")
        weight = low_rank_update(chain.original, update.factors(), update.scaling.to(chain.original.dtype))
        parametrize.remove_parametrizations(module, name, leave_parametrized=False)
        getattr(module, name).copy_(weight)
        merged += 1
    return merged


def has_lora(state: dict[str, torch.Tensor]) -> bool:
    """Whether ``state`` (a model's state dict) holds LoRA adapters."""
    return any(MARKER in key for key in state)


def merged_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with every LoRA-adapted weight merged (``merge_lora``'s arithmetic) under its plain key
    (``...attn.in_proj_weight``); a state dict without adapters is returned as it is."""
    if not has_lora(state):
        return state
    plain = {key: value for key, value in state.items() if MARKER not in key}
    for key in state:
        if MARKER not in key or not key.endswith(f".{ORIGINAL}"):
            continue
        module, rest = key.split(MARKER, 1)
        weight_name = rest[: -len(ORIGINAL) - 1]
        prefix = f"{module}{MARKER}{weight_name}.0."
        factors = {}
        for name in ("", *FUSED):
            if prefix + _factor("a", name) in state:
                factors[name] = (state[prefix + _factor("a", name)], state[prefix + _factor("b", name)])
        original = state[key]
        if not factors or prefix + "scaling" not in state:
            raise ValueError(f"{key}: a parametrized weight without LoRA factors and scaling")
        with torch.no_grad():
            plain[f"{module}.{weight_name}"] = low_rank_update(
                original, factors, state[prefix + "scaling"].to(original.dtype)
            )
    return plain
