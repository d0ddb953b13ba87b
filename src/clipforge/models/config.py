"""The ``model`` section of the run config: which dual encoder to build, where its initial weights come from and how
its towers train (LiT's locks; the adaptation modes and LoRA of ``clipforge.models.adapt``).

It lives apart from ``builder.py``, which imports open_clip and torch, so that reading and validating a config
(``clipforge train --help``, ``clipforge submit``) imports neither.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ADAPT_MODES = ("full", "frozen", "lora", "last_k")
LORA_TARGETS = ("q", "k", "v", "out", "mlp")


@dataclass
class ModelConfig:
    """Which dual encoder to build, where its initial weights come from and how its towers train."""

    name: str = "ViT-B-32"
    """open_clip architecture name (e.g. ViT-B-32, see `open_clip.list_models()`), the stem of a JSON file in
    configs/models/, or a path to an open_clip-style JSON model config."""
    init_from: str | None = None
    """Weights to start from, all local (nothing is downloaded): a clipforge checkpoint directory, an open_clip
    weights file (.pt/.bin/.safetensors) or folder (open_clip_config.json + open_clip_model.safetensors), or a
    transformers CLIPModel/SiglipModel folder (config.json + model.safetensors), converted exactly. The weights must
    fit the architecture (model.name, model.force_quick_gelu). None = random init."""
    force_quick_gelu: bool = False
    """Use QuickGELU activations (as OpenAI's original CLIP weights need)."""
    init_logit_scale: float | None = None
    """Initial log inverse temperature (None = the architecture's, log(1/0.07) for CLIP; SigLIP uses log(10))."""
    init_logit_bias: float | None = None
    """Initial logit bias; set it (SigLIP: -10) to give the model the learnable bias the sigmoid loss needs."""
    grad_checkpointing: bool = False
    """Recompute each transformer block's activations in the backward pass: less memory, ~30% more compute."""
    patch_dropout: float = 0.0
    """FLIP patch dropout: the fraction of image patches dropped in training (ViT image towers only)."""
    lock_image: bool = False
    """LiT: freeze the image tower (typically loaded with model.init_from)."""
    lock_image_unlocked_groups: int = 0
    """With lock_image: leave the last N layer groups of the image tower trainable."""
    lock_image_freeze_bn_stats: bool = False
    """With lock_image: also freeze BatchNorm running statistics (ResNet towers)."""
    lock_text: bool = False
    """Freeze the text tower."""
    lock_text_unlocked_layers: int = 0
    """With lock_text: leave the last N layer groups trainable (open_clip's grouping, from the end: the projection,
    then the last transformer block with the final LayerNorm, then one group per earlier block, then the
    embeddings)."""
    lock_text_freeze_layer_norm: bool = True
    """With lock_text: keep the frozen layers' LayerNorms frozen too (open_clip's built-in text tower requires it)."""
    image_adapt: str = "full"
    """How the image tower trains: full (every weight), frozen (none), lora (LoRA adapters on its blocks'
    model.lora_targets, the rest frozen), or last_k (the last model.adapt_last_k blocks and the final norm and
    projection). lock_image is open_clip's own lock (with its layer groups): use one of the two, not both."""
    text_adapt: str = "full"
    """How the text tower trains: full, frozen, lora or last_k, as model.image_adapt. Not with lock_text."""
    lora_rank: int = 8
    """The rank r of each LoRA update (A: r x in, B: out x r) in the towers whose mode is lora."""
    lora_alpha: float = 8.0
    """LoRA scaling numerator: the update is (lora_alpha / lora_rank) B A (PEFT's lora_alpha)."""
    lora_dropout: float = 0.0
    """Dropout on the input features of each LoRA update in training (one mask per weight and step, shared by all
    tokens: the adapter lives in the weight, see docs/adapting.md)."""
    lora_targets: list[str] = field(default_factory=lambda: ["q", "k", "v", "out"])
    """The weights of each block that get a LoRA update: q, k, v (slices of the fused attention projection), out
    (the attention output projection), mlp (both MLP layers)."""
    adapt_last_k: int = 1
    """With image_adapt or text_adapt last_k: how many of the tower's last residual blocks train (0: only the final
    norm and projection)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.patch_dropout < 1.0:
            raise ValueError(f"model.patch_dropout: must be in [0, 1), got {self.patch_dropout}")
        for name in ("lock_image_unlocked_groups", "lock_text_unlocked_layers"):
            if getattr(self, name) < 0:
                raise ValueError(f"model.{name}: must be >= 0, got {getattr(self, name)}")
        self._check_adaptation()

    def _check_adaptation(self) -> None:
        for tower in ("image", "text"):
            mode = getattr(self, f"{tower}_adapt")
            if mode not in ADAPT_MODES:
                raise ValueError(f"model.{tower}_adapt: {mode!r} is not one of {ADAPT_MODES}")
            if getattr(self, f"lock_{tower}") and mode != "full":
                raise ValueError(
                    f"model.{tower}_adapt: {mode} contradicts model.lock_{tower}: true (open_clip's lock of the "
                    f"same tower); set one of them"
                )
        if self.lora_rank < 1:
            raise ValueError(f"model.lora_rank: must be >= 1, got {self.lora_rank}")
        if not self.lora_alpha > 0:
            raise ValueError(f"model.lora_alpha: must be positive, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"model.lora_dropout: must be in [0, 1), got {self.lora_dropout}")
        unknown = [target for target in self.lora_targets if target not in LORA_TARGETS]
        if unknown or not self.lora_targets or len(set(self.lora_targets)) != len(self.lora_targets):
            raise ValueError(
                f"model.lora_targets: {list(self.lora_targets)} must be distinct names among {LORA_TARGETS}, at "
                "least one"
            )
        if self.adapt_last_k < 0:
            raise ValueError(f"model.adapt_last_k: must be >= 0, got {self.adapt_last_k}")
