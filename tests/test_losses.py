import math

import open_clip.loss
import pytest
import torch
import torch.nn.functional as F
from references import naive_clip_loss, naive_siglip_loss

from clipforge.losses import ClipLoss, LossConfig, SigLipLoss, build_loss, clamp_logit_scale


def features(batch=64, dim=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, dim, generator=generator), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(batch, dim, generator=generator), dim=-1).requires_grad_()
    log_scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    return image, text, log_scale


def loss_and_grads(fn, image, text, log_scale):
    loss = fn(image, text, log_scale.exp())
    loss = loss["contrastive"] if isinstance(loss, dict) else loss
    grads = torch.autograd.grad(loss, (image, text, log_scale))
    return loss.detach(), grads


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_equals_open_clip_loss_and_gradients(batch):
    ours = loss_and_grads(ClipLoss(), *features(batch))
    theirs = loss_and_grads(open_clip.loss.ClipLoss(), *features(batch))
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-6, atol=1e-6)
    for mine, reference in zip(ours[1], theirs[1]):
        torch.testing.assert_close(mine, reference, rtol=1e-6, atol=1e-6)


def test_equals_naive_reference_and_is_symmetric():
    image, text, log_scale = features(16)
    loss = ClipLoss()(image, text, log_scale.exp())["contrastive"]
    torch.testing.assert_close(loss, naive_clip_loss(image, text, log_scale.exp()))
    swapped = ClipLoss()(text, image, log_scale.exp())["contrastive"]
    torch.testing.assert_close(loss, swapped)
    # perfectly aligned, well separated features at a high scale: loss near zero
    eye = torch.eye(8)
    assert ClipLoss()(eye, eye, torch.tensor(100.0))["contrastive"] < 1e-3


def test_computed_in_fp32_for_half_features():
    image, text, log_scale = features(32)
    reference = ClipLoss()(image, text, log_scale.exp())["contrastive"]
    half = ClipLoss()(image.bfloat16(), text.bfloat16(), log_scale.exp())["contrastive"]
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, reference, rtol=2e-2, atol=2e-2)


def test_clamp_keeps_scale_at_most_max():
    scale = torch.nn.Parameter(torch.tensor(math.log(500.0)))
    clamp_logit_scale(scale, 100.0)
    assert scale.exp().item() == pytest.approx(100.0)
    scale.data.fill_(-1.0)
    clamp_logit_scale(scale, 100.0)
    assert scale.item() == 0.0


def test_build_loss_refuses_unknown_kind():
    assert isinstance(build_loss(LossConfig()), ClipLoss)
    with pytest.raises(ValueError, match="loss.kind"):
        LossConfig(kind="triplet")


def siglip_features(batch=40, dim=16, seed=0):
    image, text, _ = features(batch, dim, seed)
    log_scale = torch.tensor(math.log(10.0), requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)
    return image, text, log_scale, bias


def test_siglip_equals_open_clip_and_the_paper():
    image, text, log_scale, bias = siglip_features()
    ours = SigLipLoss()(image, text, log_scale.exp(), bias)["contrastive"]
    grads = torch.autograd.grad(ours, (image, text, log_scale, bias))
    image2, text2, log_scale2, bias2 = siglip_features()
    theirs = open_clip.loss.SigLipLoss()(image2, text2, log_scale2.exp(), bias2)
    reference_grads = torch.autograd.grad(theirs, (image2, text2, log_scale2, bias2))
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    for mine, reference in zip(grads, reference_grads):
        torch.testing.assert_close(mine, reference, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours, naive_siglip_loss(image, text, log_scale.exp(), bias))


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("tile", [1, 7, 16, 64])
def test_tiled_equals_untiled_loss_and_gradients(kind, tile):
    def run(tile_size):
        image, text, log_scale, bias = siglip_features(batch=45, seed=3)
        if kind == "clip":
            loss = ClipLoss(tile_size=tile_size)(image, text, log_scale.exp())["contrastive"]
            inputs = (image, text, log_scale)
        else:
            loss = SigLipLoss(tile_size=tile_size)(image, text, log_scale.exp(), bias)["contrastive"]
            inputs = (image, text, log_scale, bias)
        return loss, torch.autograd.grad(loss, inputs)

    loss, grads = run(0)
    tiled_loss, tiled_grads = run(tile)
    torch.testing.assert_close(tiled_loss, loss, rtol=1e-5, atol=1e-6)
    for mine, reference in zip(tiled_grads, grads):
        torch.testing.assert_close(mine, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tile", [0, 16])
def test_no_overflow_with_half_features_at_max_scale(dtype, tile):
    image, text, _, bias = siglip_features(batch=64)
    aligned = torch.cat([text[:32].detach(), image[32:].detach()])  # half the pairs identical: huge logits
    for loss_fn, extra in ((ClipLoss(tile_size=tile), ()), (SigLipLoss(tile_size=tile), (bias,))):
        image_half = image.detach().to(dtype).requires_grad_()
        text_half = aligned.to(dtype).requires_grad_()
        loss = loss_fn(image_half, text_half, torch.tensor(100.0), *extra)["contrastive"]
        loss.backward()
        assert torch.isfinite(loss) and loss.dtype == torch.float32
        assert torch.isfinite(image_half.grad).all() and torch.isfinite(text_half.grad).all()
