import math

import open_clip.loss
import pytest
import torch
import torch.nn.functional as F

from clipforge.losses import ClipLoss, LossConfig, build_loss, clamp_logit_scale, naive_clip_loss


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
