"""Step strategies: GradCache accumulation equals one k×-sized batch, gradient for gradient."""

import copy
import json

import pytest
import torch
from conftest import TINY_MODEL

from clipforge.losses import LossConfig, build_loss
from clipforge.models import ModelConfig, build_model
from clipforge.train.step import CachedAccumulationStep, PlainStep, build_step


def make_step(model, loss_fn, accum_steps):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    return build_step(
        model,
        loss_fn,
        optimizer,
        scheduler,
        device="cpu",
        precision="fp32",
        grad_clip_norm=1.0,
        max_logit_scale=100.0,
        accum_steps=accum_steps,
    )


def batch(built, size=32):
    generator = torch.Generator().manual_seed(0)
    words = ["red", "blue", "circle", "square", "star", "two", "small", "large", "above", "left"]
    captions = [" ".join(words[i] for i in torch.randint(0, 10, (5,), generator=generator)) for _ in range(size)]
    return {"images": torch.randn(size, 3, 32, 32, generator=generator), "texts": built.tokenizer(captions)}


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_cached_accumulation_equals_one_large_batch(kind, tiny_model_json):
    extra = {"init_logit_scale": 2.302585, "init_logit_bias": -10.0} if kind == "siglip" else {}
    built = build_model(ModelConfig(name=tiny_model_json, **extra))
    data = batch(built)
    grads = {}
    for accum_steps in (1, 4):
        model = copy.deepcopy(built.model).train()
        step = make_step(model, build_loss(LossConfig(kind=kind)), accum_steps)
        assert isinstance(step, CachedAccumulationStep if accum_steps > 1 else PlainStep)
        metrics = step.backward(data)
        grads[accum_steps] = ({n: p.grad.clone() for n, p in model.named_parameters()}, metrics["loss"])
    (reference, reference_loss), (cached, cached_loss) = grads[1], grads[4]
    torch.testing.assert_close(cached_loss, reference_loss, rtol=1e-5, atol=1e-6)
    assert "logit_scale" in cached and (kind == "clip" or "logit_bias" in cached)
    for name, grad in reference.items():
        torch.testing.assert_close(cached[name], grad, rtol=1e-5, atol=1e-5 * grad.abs().max().item())
        assert (cached[name] - grad).norm() <= 1e-5 * grad.norm(), name


def test_replayed_rng_reproduces_patch_dropout(tmp_path):
    config = json.loads(json.dumps(TINY_MODEL))
    config["vision_cfg"]["patch_dropout"] = 0.5
    path = tmp_path / "dropout-tiny.json"
    path.write_text(json.dumps(config))
    built = build_model(ModelConfig(name=str(path)))
    model = built.model.train()
    step = make_step(model, build_loss(LossConfig()), 4)
    data = batch(built)
    chunks = list(zip(data["images"].chunk(4), data["texts"].chunk(4)))
    states, cached = step.cache_features(chunks)
    image_features = cached["image_features"]
    replayed, fresh = [], []
    with torch.no_grad():
        for (images, texts), state in zip(chunks, states):
            step._set_rng_state(state)
            replayed.append(model(images, texts)["image_features"])
            fresh.append(model(images, texts)["image_features"])  # a new draw of the dropout mask
    torch.testing.assert_close(torch.cat(replayed), image_features)
    assert not torch.allclose(torch.cat(fresh), image_features)


def sgd_step_recording_gradients(model, grad_clip_norm):
    """A plain step with SGD(lr=1e-3) whose optimizer keeps a copy of the gradients it was given."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    given = {}
    optimizer.register_step_pre_hook(lambda *_: given.update({n: p.grad.clone() for n, p in model.named_parameters()}))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    step = build_step(
        model,
        build_loss(LossConfig()),
        optimizer,
        scheduler,
        device="cpu",
        precision="fp32",
        grad_clip_norm=grad_clip_norm,
        max_logit_scale=100.0,
    )
    return step, given


def gradient_norm(grads: dict) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads.values()]))


def reference_gradient_norm(built, data) -> torch.Tensor:
    model = copy.deepcopy(built.model).train()
    make_step(model, build_loss(LossConfig()), 1).backward(data)
    return gradient_norm({n: p.grad for n, p in model.named_parameters()})


def test_without_clipping_the_gradients_are_applied_as_they_are(tiny_model_json, monkeypatch):
    """optim.grad_clip_norm=null: the step reports the gradient norm and updates with the unscaled gradients, without
    going through clip_grad_norm_ (whose clip to inf multiplied every gradient by 1)."""
    built = build_model(ModelConfig(name=tiny_model_json))
    data = batch(built)
    model = copy.deepcopy(built.model).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    step, given = sgd_step_recording_gradients(model, None)

    def no_clipping(*args, **kwargs):
        raise AssertionError("clip_grad_norm_ called with clipping off")

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", no_clipping)
    out = step(data)
    norm = gradient_norm(given)
    assert norm > 1.0  # a clip at the default 1.0 would have shrunk them
    torch.testing.assert_close(norm, reference_gradient_norm(built, data), rtol=1e-4, atol=0)  # not scaled
    torch.testing.assert_close(out["grad_norm"], norm, rtol=1e-4, atol=0)  # fp32 sums over 3M entries, two orders
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.detach(), before[name] - 1e-3 * given[name], rtol=1e-6, atol=1e-7)


def test_clipping_scales_the_update_to_the_clip_norm(tiny_model_json):
    built = build_model(ModelConfig(name=tiny_model_json))
    data = batch(built)
    reference_norm = reference_gradient_norm(built, data)
    assert reference_norm > 0.5
    model = copy.deepcopy(built.model).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    step, given = sgd_step_recording_gradients(model, 0.5)
    out = step(data)
    torch.testing.assert_close(out["grad_norm"], reference_norm, rtol=1e-4, atol=0)  # the norm before clipping
    torch.testing.assert_close(gradient_norm(given), torch.tensor(0.5), rtol=1e-4, atol=0)  # the update's, after
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.detach(), before[name] - 1e-3 * given[name], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fused", [True, False])
def test_a_nonfinite_batch_leaves_weights_and_optimizer_state_as_they_were(fused, tiny_model_json):
    """Fused AdamW skips on the device (the flag handed over as found_inf), foreach AdamW on the host: either way a
    NaN batch changes no weight, no moment and no step count, and the next finite batch updates as usual."""
    from clipforge.train.optim import OptimConfig, build_optimizer, build_scheduler

    built = build_model(ModelConfig(name=tiny_model_json))
    cfg = OptimConfig(lr=1e-3, warmup_steps=0, fused=fused)
    optimizer = build_optimizer(cfg, built.model)
    step = build_step(
        built.model,
        build_loss(LossConfig()),
        optimizer,
        build_scheduler(cfg, optimizer, 10),
        device="cpu",
        precision="fp32",
        grad_clip_norm=None,
        max_logit_scale=100.0,
    )
    assert step.skips_on_device == fused
    data = batch(built, 8)
    assert not step(data)["nonfinite"]
    weights = copy.deepcopy(built.model.state_dict())
    moments = copy.deepcopy(optimizer.state_dict()["state"])
    poisoned = {**data, "images": data["images"].clone()}
    poisoned["images"][0, 0, 0, 0] = float("nan")
    out = step(poisoned)
    assert isinstance(out["nonfinite"], torch.Tensor) and bool(out["nonfinite"])
    assert all(torch.equal(weights[k], v) for k, v in built.model.state_dict().items())
    after = optimizer.state_dict()["state"]
    assert all(torch.equal(moments[i][k], after[i][k]) for i in moments for k in moments[i])  # step counts too
    assert not step(data)["nonfinite"]
    assert not torch.equal(weights["text_projection"], built.model.state_dict()["text_projection"])
