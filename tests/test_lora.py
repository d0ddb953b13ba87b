"""LoRA and the towers' adaptation modes (clipforge.models.lora, clipforge.models.adapt) against independent references.

LoRA at B = 0 is the base model bit for bit; with B != 0 every attention path (torch's own, the packed projection,
the pooled last block, with and without gradient checkpointing) gives the outputs of a plain model whose weights are
W + (alpha / r) B A, and the adapters' gradients equal the chain rule applied to that plain model's weight
gradients; merging gives the same model within 1e-6, and the exported transformers model its embeddings within 1e-5.
Rank 8 trains under 2% of ViT-B/16 (counted by hand); on 2 gloo ranks, DDP and FSDP2 give one process's gradients
and weights; a LoRA run resumes bit for bit.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_MODEL
from ranks import run_ranks
from torch import nn
from torch.distributed.tensor import DTensor

from clipforge.checkpoints import read_model_weights
from clipforge.distributed import DistInfo
from clipforge.models import ModelConfig, build_model, merge_lora, merged_state_dict
from clipforge.models.lora import FUSED, lora_modules
from clipforge.train.config import ParallelConfig, SpeedConfig
from clipforge.train.parallel import apply_training_options, prepare_model, unwrap

EVERY_TARGET = ["q", "k", "v", "out", "mlp"]
END_OF_TEXT = 49407
SWITCHES = [
    {"packed": packed, "pooled": pooled, "checkpointing": checkpointing}
    for packed, pooled, checkpointing in itertools.product((False, True), repeat=3)
]


def switch_id(switches: dict) -> str:
    return "-".join(name for name, on in switches.items() if on) or "plain"


def batch(size: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (size, 3, 32, 32) and captions (size, 24) ending at different positions, zero-padded after."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(size, 3, 32, 32, generator=generator)
    texts = torch.randint(1, 400, (size, 24), generator=generator)
    for row in range(size):
        end = 6 + (5 * row) % 18
        texts[row, end] = END_OF_TEXT
        texts[row, end + 1 :] = 0
    return images, texts


def prepared(
    model_json: str,
    *,
    seed: int = 0,
    packed: bool = False,
    pooled: bool = False,
    checkpointing: bool = False,
    randomize: bool = True,
    **model,
) -> nn.Module:
    """The model as the trainer prepares it (one process) with the given speed switches; with ``randomize``, every
    adapter's B drawn at random (its A is already), so that the adapters change the model."""
    torch.manual_seed(seed)
    cfg = ModelConfig(name=model_json, grad_checkpointing=checkpointing, **model)
    built = build_model(cfg)
    speed = SpeedConfig(packed_attention=packed, pooled_last_block=pooled, trim_text_padding=False, channels_last=False)
    prepared = prepare_model(
        built.model,
        model_cfg=cfg,
        speed=speed,
        parallel=ParallelConfig(),
        precision="fp32",
        learn_temperature=True,
        dist_info=DistInfo(),
    )
    if randomize:
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, parameter in prepared.model.named_parameters():
                if ".lora_b" in name:
                    parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
    return prepared.model


def features(model: nn.Module, images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    out = model(images, texts)
    return torch.cat([out["image_features"], out["text_features"]])  # (2B, D)


LORA = {"image_adapt": "lora", "text_adapt": "lora", "lora_targets": EVERY_TARGET, "lora_rank": 4, "lora_alpha": 6.0}


@pytest.mark.parametrize("switches", SWITCHES, ids=switch_id)
def test_lora_at_b_zero_is_the_base_model_bit_for_bit(tiny_model_json, switches):
    base = prepared(tiny_model_json, **switches)
    adapted = prepared(tiny_model_json, randomize=False, **LORA, **switches)
    assert len(lora_modules(adapted)) == 2 * 2 * 4  # towers × blocks × (in_proj, out_proj, c_fc, c_proj)
    images, texts = batch()
    for training in (True, False):  # torch's training path or its inference fast path
        base.train(training)
        adapted.train(training)
        with torch.set_grad_enabled(training):
            assert torch.equal(features(base, images, texts), features(adapted, images, texts))


def plain_with_deltas(model_json: str, adapted: nn.Module) -> nn.Module:
    """A plain model (no parametrization) whose weights are the adapted model's W + (alpha / r) B A, computed here by
    hand from its factors: the reference every path of the adapted model must agree with."""
    plain = build_model(ModelConfig(name=model_json)).model
    weights = {}
    for name, tensor in adapted.state_dict().items():
        if ".parametrizations." not in name or not name.endswith(".original"):
            if ".parametrizations." not in name:
                weights[name] = tensor
            continue
        module, weight_name = name[: -len(".original")].split(".parametrizations.")
        prefix = f"{module}.parametrizations.{weight_name}.0."
        scaling = adapted.state_dict()[prefix + "scaling"]
        if prefix + "lora_a" in adapted.state_dict():
            delta = scaling * adapted.state_dict()[prefix + "lora_b"] @ adapted.state_dict()[prefix + "lora_a"]
        else:
            delta = torch.cat(
                [
                    scaling * adapted.state_dict()[f"{prefix}lora_b_{s}"] @ adapted.state_dict()[f"{prefix}lora_a_{s}"]
                    for s in FUSED
                ]
            )
        weights[f"{module}.{weight_name}"] = tensor + delta
    plain.load_state_dict(weights, strict=True)
    return plain


def expected_factor_gradients(adapted: nn.Module, plain: nn.Module) -> dict[str, torch.Tensor]:
    """d loss / d A and d loss / d B by the chain rule from the plain model's weight gradients G (rows of the slice):
    W' = W + s B A gives dA = s B^T G and dB = s G A^T."""
    plain_grads = {name: parameter.grad for name, parameter in plain.named_parameters()}
    names = {id(module): name for name, module in adapted.named_modules()}
    expected = {}
    for module, weight_name, update in lora_modules(adapted):
        gradient = plain_grads[f"{names[id(module)]}.{weight_name}"]
        slices = dict(zip(FUSED, gradient.chunk(3), strict=True)) if update.slices != ("",) else {"": gradient}
        scaling = update.scaling
        for slice_name in update.slices:
            suffix = f"_{slice_name}" if slice_name else ""
            down, up = getattr(update, f"lora_a{suffix}"), getattr(update, f"lora_b{suffix}")
            prefix = f"{names[id(module)]}.parametrizations.{weight_name}.0."
            expected[f"{prefix}lora_a{suffix}"] = scaling * up.detach().T @ slices[slice_name]
            expected[f"{prefix}lora_b{suffix}"] = scaling * slices[slice_name] @ down.detach().T
    return expected


@pytest.mark.parametrize("switches", SWITCHES, ids=switch_id)
def test_every_attention_path_computes_and_trains_with_the_adapters(tiny_model_json, switches):
    adapted = prepared(tiny_model_json, **LORA, **switches)
    plain = plain_with_deltas(tiny_model_json, adapted)
    images, texts = batch()
    weights = torch.randn(8, 64, generator=torch.Generator().manual_seed(7))  # a loss that reads every feature
    ours, reference = features(adapted, images, texts), features(plain, images, texts)
    base = features(prepared(tiny_model_json, **switches), images, texts)
    assert (base - reference).abs().max() > 1e-2  # the adapters change the model: a path that skips them fails
    torch.testing.assert_close(ours, reference, atol=2e-6, rtol=0)
    (ours * weights).sum().backward()
    (reference * weights).sum().backward()
    expected = expected_factor_gradients(adapted, plain)
    got = {name: p.grad for name, p in adapted.named_parameters() if p.grad is not None}
    assert got.keys() == expected.keys()  # the base weights are frozen (logit_scale trains, but no feature reads it)
    for name, gradient in expected.items():
        torch.testing.assert_close(got[name], gradient, atol=1e-5, rtol=1e-4, msg=name)
    out_proj = [g for n, g in got.items() if "out_proj.parametrizations.weight.0.lora_" in n]
    assert len(out_proj) == 2 * 2 * 2 and all(g.abs().max() > 1e-4 for g in out_proj)


def test_merged_equals_adapted_and_is_the_plain_model(tiny_model_json):
    adapted = prepared(tiny_model_json, **LORA).eval()
    images, texts = batch()
    with torch.no_grad():
        before = features(adapted, images, texts)
        unmerged_state = {name: tensor.clone() for name, tensor in adapted.state_dict().items()}
        assert merge_lora(adapted) == 16
        after = features(adapted, images, texts)
    assert (after - before).abs().max() <= 1e-6
    plain = build_model(ModelConfig(name=tiny_model_json)).model
    assert adapted.state_dict().keys() == plain.state_dict().keys()
    assert type(adapted.visual.transformer.resblocks[0].attn) is nn.MultiheadAttention
    assert type(adapted.transformer.resblocks[1].mlp.c_fc) is nn.Linear
    by_state = merged_state_dict(unmerged_state)  # the same arithmetic on a state dict: the same bits
    assert by_state.keys() == plain.state_dict().keys()
    assert all(torch.equal(by_state[name], tensor) for name, tensor in adapted.state_dict().items())


def test_dropout_drops_input_features_only_in_training(tiny_model_json):
    model = prepared(tiny_model_json, **{**LORA, "lora_dropout": 0.5}).train()
    attention = model.visual.transformer.resblocks[0].attn
    update = attention.parametrizations.in_proj_weight[0]
    original = attention.parametrizations.in_proj_weight.original
    torch.manual_seed(3)
    delta = (attention.in_proj_weight - original).detach()[:64]  # the q slice: s B (A diag(mask) / (1 - p))
    kept = delta.abs().sum(dim=0) > 0  # the input features the mask kept
    assert 0 < kept.sum() < 64
    down = update.lora_a_q.detach() * kept / 0.5
    torch.testing.assert_close(delta, update.scaling * update.lora_b_q.detach() @ down)
    model.eval()
    torch.testing.assert_close(
        attention.in_proj_weight[:64] - original[:64], update.scaling * update.lora_b_q @ update.lora_a_q
    )


def test_rank_8_trains_under_two_percent_of_vit_b_16():
    cfg = ModelConfig(name="ViT-B-16", image_adapt="lora", text_adapt="lora", lora_targets=EVERY_TARGET)
    model = build_model(cfg).model  # random init, nothing downloaded
    total = sum(parameter.numel() for parameter in model.parameters())
    assert 149_000_000 < total < 150_000_000
    apply_training_options(model, cfg)
    trainable = {name: p.numel() for name, p in model.named_parameters() if p.requires_grad}
    # By hand: 12 blocks per tower; rank 8; width 768 (image) and 512 (text), MLP 4x. An (A, B) pair on an
    # (out, in) weight is 8 × (in + out); q, k, v and out are (E, E) each, c_fc (4E, E), c_proj (E, 4E).
    attention = 12 * 4 * 8 * (768 + 768) + 12 * 4 * 8 * (512 + 512)
    mlp = 12 * 2 * 8 * (768 + 4 * 768) + 12 * 2 * 8 * (512 + 4 * 512)
    assert sum(n for name, n in trainable.items() if ".mlp." not in name) == attention + 1  # + logit_scale
    assert sum(n for name, n in trainable.items() if ".mlp." in name) == mlp
    assert (attention + mlp + 1) / total < 0.02  # 1.48%; attention alone 0.66%
    assert (attention + 1) / total < 0.007


def test_modes_train_what_they_say(tiny_model_json, tiny_resnet_json):
    def trainable(model_json, **model):
        cfg = ModelConfig(name=model_json, **model)
        built = build_model(cfg)
        apply_training_options(built.model, cfg)
        return {name for name, p in built.model.named_parameters() if p.requires_grad}

    every = trainable(tiny_model_json)
    assert trainable(tiny_model_json, image_adapt="frozen") == {n for n in every if not n.startswith("visual.")}
    last = trainable(tiny_model_json, image_adapt="frozen", text_adapt="last_k", adapt_last_k=1)
    assert last == {"logit_scale", "ln_final.weight", "ln_final.bias", "text_projection"} | {
        n for n in every if n.startswith("transformer.resblocks.1.")
    }
    head = trainable(tiny_model_json, image_adapt="last_k", adapt_last_k=0, text_adapt="frozen")
    assert head == {"logit_scale", "visual.proj", "visual.ln_post.weight", "visual.ln_post.bias"}
    resnet = trainable(tiny_resnet_json, image_adapt="last_k", text_adapt="frozen")
    stage_4 = {n for n in trainable(tiny_resnet_json) if n.startswith(("visual.layer4.", "visual.attnpool."))}
    assert resnet == {"logit_scale"} | stage_4 and len(stage_4) > 10
    with pytest.raises(ValueError, match=r"^model.image_adapt: lora adapts transformer blocks; ModifiedResNet"):
        trainable(tiny_resnet_json, image_adapt="lora")
    with pytest.raises(ValueError, match=r"^model.adapt_last_k: 3 is more than the image tower's 2 blocks$"):
        trainable(tiny_model_json, image_adapt="last_k", adapt_last_k=3)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"image_adapt": "lora", "lock_image": True}, r"model.image_adapt: lora contradicts model.lock_image: true"),
        ({"text_adapt": "frozen", "lock_text": True}, r"model.text_adapt: frozen contradicts model.lock_text: true"),
        ({"text_adapt": "partial"}, r"model.text_adapt: 'partial' is not one of"),
        ({"lora_rank": 0}, r"model.lora_rank: must be >= 1, got 0"),
        ({"lora_alpha": 0.0}, r"model.lora_alpha: must be positive"),
        ({"lora_dropout": 1.0}, r"model.lora_dropout: must be in \[0, 1\)"),
        ({"lora_targets": ["q", "fc"]}, r"model.lora_targets: \['q', 'fc'\] must be distinct names among"),
        ({"lora_targets": ["q", "q"]}, r"model.lora_targets: "),
        ({"lora_targets": []}, r"model.lora_targets: "),
        ({"adapt_last_k": -1}, r"model.adapt_last_k: must be >= 0"),
    ],
)
def test_contradictions_and_bad_values_are_refused_in_one_line(fields, message):
    with pytest.raises(ValueError, match=f"^{message}") as refused:
        ModelConfig(**fields)
    assert "\n" not in str(refused.value)


# --- 2 gloo ranks against one process ----------------------------------------------------------------------------

GLOBAL_BATCH = 8


def _gradients(rank: int, world_size: int, model_json: str, strategy: str, distributed: bool) -> dict:
    """The (full) gradients of one backward of the real step on this rank's part of a fixed global batch, prepared
    as ``prepare_model`` does (adaptation, then the pooled last block and packed attention, then DDP or FSDP2), with
    gradient checkpointing, every adapter's B drawn at random before wrapping."""
    from clipforge.losses import LossConfig, build_loss
    from clipforge.models import enable_packed_attention, enable_pooled_last_block
    from clipforge.train.optim import OptimConfig, build_optimizer
    from clipforge.train.parallel import parallelize
    from clipforge.train.step import build_step

    torch.manual_seed(rank)  # ranks start different, as in the loop; DDP and FSDP take rank 0's weights
    cfg = ModelConfig(name=model_json, grad_checkpointing=True, **LORA)
    model = build_model(cfg).model
    apply_training_options(model, cfg)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_b" in name:
                parameter.normal_(0.0, 0.2)
    assert enable_pooled_last_block(model) == ["image", "text"] and enable_packed_attention(model) == 4
    info = DistInfo(rank=rank, world_size=world_size, local_world_size=world_size) if distributed else DistInfo()
    model = parallelize(model, info, strategy)
    core = unwrap(model)
    optimizer = build_optimizer(OptimConfig(layer_decay=0.7), core)
    step = build_step(
        model,
        build_loss(LossConfig(), rank, world_size),
        optimizer,
        None,
        device="cpu",
        precision="fp32",
        grad_clip_norm=None,
        max_logit_scale=100.0,
    )
    local = slice(rank * GLOBAL_BATCH // world_size, (rank + 1) * GLOBAL_BATCH // world_size)
    images, texts = batch(GLOBAL_BATCH, seed=10)
    step.backward({"images": images[local], "texts": texts[local]})

    def full(tensor):
        return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().clone()

    return {name: full(p.grad) for name, p in core.named_parameters() if p.grad is not None}


def _rank_worker(rank: int, world_size: int, model_json: str) -> dict:
    return {strategy: _gradients(rank, world_size, model_json, strategy, True) for strategy in ("ddp", "fsdp")}


def test_two_gloo_ranks_ddp_and_fsdp_equal_one_process(tmp_path):
    model_json = tmp_path / "tiny.json"
    model_json.write_text(json.dumps(TINY_MODEL))
    ranks = run_ranks(_rank_worker, 2, tmp_path / "ranks", str(model_json), timeout=600)
    reference = _gradients(0, 1, str(model_json), "ddp", False)
    lora = [name for name in reference if ".lora_" in name]
    assert len(lora) == 2 * 2 * 12 and any("out_proj" in name for name in lora)  # (A, B) of q, k, v, out, c_fc, c_proj
    assert all(reference[name].abs().max() > 0 for name in lora)
    assert set(reference) == {*lora, "logit_scale"}  # the base weights are frozen
    for strategy in ("ddp", "fsdp"):
        for rank in ranks:
            assert rank[strategy].keys() == reference.keys(), strategy
            for name, gradient in reference.items():
                scale = gradient.abs().max().clamp_min(1e-12)
                assert (rank[strategy][name] - gradient).abs().max() <= 1e-5 * scale, (strategy, name)


# --- a LoRA run: resume bit for bit, export a plain model ----------------------------------------------------------


def run_config(synth_data: Path, model_json: str, out: Path, *extra: str):
    from clipforge.train.config import load_config

    return load_config(
        None,
        [
            f"data.train_urls={synth_data}/train/{{00000..00005}}.tar",
            "data.batch_size=16",
            "data.num_workers=0",
            "data.shuffle_buffer=50",
            f"model.name={model_json}",
            "model.image_adapt=lora",
            "model.text_adapt=lora",
            "model.lora_targets=[q,k,v,out,mlp]",
            "model.lora_rank=4",
            "optim.lr=1e-2",
            "optim.warmup_steps=1",
            "optim.layer_decay=0.8",
            f"train.output_dir={out}",
            "train.steps=4",
            "checkpoint.every=2",
            "checkpoint.keep_last=5",
            "logging.log_every=1",
            "logging.progress_bar=false",
            "logging.tensorboard=false",
            *extra,
        ],
    )


def losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["train/loss"] for r in map(json.loads, lines) if "train/loss" in r}


def train_and_resume(synth_data: Path, model_json: str, tmp_path: Path, *extra: str) -> Path:
    """Train 4 steps; train again from the step-2 checkpoint; the two step-4 checkpoints and logged losses must be
    the same bits. Returns the uninterrupted run's checkpoints folder."""
    import shutil

    from clipforge.train.loop import train

    train(run_config(synth_data, model_json, tmp_path / "full", *extra))
    checkpoints = tmp_path / "full" / "checkpoints"
    (tmp_path / "partial" / "checkpoints").mkdir(parents=True)
    shutil.copytree(checkpoints / "step_00000002", tmp_path / "partial" / "checkpoints" / "step_00000002")
    train(run_config(synth_data, model_json, tmp_path / "partial", "checkpoint.resume=latest", *extra))
    final = read_model_weights(checkpoints / "step_00000004")  # whichever format the checkpointer wrote
    resumed = read_model_weights(tmp_path / "partial" / "checkpoints" / "step_00000004")
    assert resumed.keys() == final.keys()
    assert [name for name in final if not torch.equal(final[name], resumed[name])] == []
    full_losses = losses(tmp_path / "full")
    assert losses(tmp_path / "partial") == {step: loss for step, loss in full_losses.items() if step > 2}
    return checkpoints


def test_a_lora_run_with_dropout_resumes_bit_for_bit(synth_data, tiny_model_json, tmp_path):
    train_and_resume(synth_data, tiny_model_json, tmp_path, "model.lora_dropout=0.1")


def test_a_lora_run_resumes_bit_for_bit_and_exports_a_plain_model(synth_data, tiny_model_json, tmp_path):
    from transformers import CLIPModel

    from clipforge.cli import main
    from clipforge.model_loading import load_checkpoint_model

    checkpoints = train_and_resume(synth_data, tiny_model_json, tmp_path)
    final = read_model_weights(checkpoints / "step_00000004")
    middle = read_model_weights(checkpoints / "step_00000002")
    frozen = [name for name in final if name.endswith(".original")]
    factors = [name for name in final if ".lora_b" in name]
    assert len(frozen) == 16 and len(factors) == 2 * 2 * 6
    assert all(torch.equal(final[name], middle[name]) for name in frozen)  # the base weights do not train
    assert all(not torch.equal(final[name], middle[name]) for name in factors)

    # The checkpoint's adapted model against the merged one that export loads, and that against transformers'.
    cfg = ModelConfig(
        name=tiny_model_json, image_adapt="lora", text_adapt="lora", lora_rank=4, lora_targets=EVERY_TARGET
    )
    adapted = build_model(cfg).model
    apply_training_options(adapted, cfg)
    adapted.load_state_dict(final, strict=True)
    merged = load_checkpoint_model(checkpoints / "step_00000004")
    assert not any(".parametrizations." in name for name in merged.model.state_dict())
    images, texts = batch()
    with torch.no_grad():
        unmerged_features = features(adapted.eval(), images, texts)
        merged_features = features(merged.model, images, texts)
    assert (merged_features - unmerged_features).abs().max() <= 1e-6
    out = tmp_path / "export"
    assert main(["export", str(checkpoints / "step_00000004"), "--format", "hf", "--out", str(out)]) == 0
    hf, info = CLIPModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    hf.eval()
    mask = (texts != 0).long()
    with torch.no_grad():
        theirs = torch.cat(
            [
                hf.get_image_features(pixel_values=images).pooler_output,
                hf.get_text_features(input_ids=texts, attention_mask=mask).pooler_output,
            ]
        )
        ours = torch.cat([merged.model.encode_image(images), merged.model.encode_text(texts)])
    assert (theirs - ours).abs().max() <= 1e-5
