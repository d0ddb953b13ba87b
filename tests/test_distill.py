"""MobileCLIP-style distillation (clipforge.losses.DistillationLoss): against a brute-force reference on one process,
and at 2 gloo ranks equal to one process holding the whole global batch, every gradient compared."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from ranks import run_ranks
from references import naive_clip_loss, naive_distillation_loss
from test_losses_distributed import LOCAL_BATCH, TinyDualEncoder, global_batch
from torch.nn.parallel import DistributedDataParallel

from clipforge.losses import DistillationLoss, LossConfig, build_loss, distillation_loss

TEACHER_TEMPERATURE = 0.05
WEIGHT = 0.7


def teacher_batch(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    image = F.normalize(torch.randn(size, 5, generator=generator), dim=-1)
    text = F.normalize(image + 0.5 * torch.randn(size, 5, generator=generator), dim=-1)
    return image, text


def test_distillation_equals_the_brute_force_reference_in_value_and_gradient():
    torch.manual_seed(0)
    image = F.normalize(torch.randn(9, 8), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(9, 8), dim=-1).requires_grad_()
    scale = torch.tensor(12.0, requires_grad=True)
    teacher_image, teacher_text = teacher_batch(9)
    ours = distillation_loss(image, text, scale, teacher_image, teacher_text, 1 / TEACHER_TEMPERATURE)
    ours_grads = torch.autograd.grad(ours, (image, text, scale))
    reference = naive_distillation_loss(image, text, scale, teacher_image, teacher_text, 1 / TEACHER_TEMPERATURE)
    reference_grads = torch.autograd.grad(reference, (image, text, scale))
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    for mine, expected in zip(ours_grads, reference_grads):
        torch.testing.assert_close(mine, expected, rtol=1e-4, atol=1e-6)


def test_a_student_equal_to_the_teacher_has_no_distillation_loss():
    image, text = teacher_batch(6)
    loss = distillation_loss(image, text, torch.tensor(20.0), image, text, 20.0)
    assert abs(float(loss)) < 1e-6


def test_the_weight_mixes_contrastive_and_distillation_as_mobileclip():
    image, text = (F.normalize(t, dim=-1) for t in torch.randn(2, 6, 8).unbind(0))
    teacher_image, teacher_text = teacher_batch(6)
    scale = torch.tensor(10.0)
    terms = build_loss(LossConfig(distill_weight=WEIGHT, distill_teacher_temperature=TEACHER_TEMPERATURE))(
        image, text, scale, teacher_image=teacher_image, teacher_text=teacher_text
    )
    clip = naive_clip_loss(image, text, scale)
    distill = naive_distillation_loss(image, text, scale, teacher_image, teacher_text, 1 / TEACHER_TEMPERATURE)
    torch.testing.assert_close(terms["contrastive"], (1 - WEIGHT) * clip)
    torch.testing.assert_close(terms["distill"], WEIGHT * distill)


def test_configuration_errors_name_the_key():
    with pytest.raises(ValueError, match="loss.distill_weight"):
        LossConfig(distill_weight=1.5)
    with pytest.raises(ValueError, match="loss.kind=clip"):
        LossConfig(kind="siglip", distill_weight=0.5)
    with pytest.raises(ValueError, match="loss.distill_teacher_temperature"):
        build_loss(LossConfig(distill_weight=0.5))
    with pytest.raises(ValueError, match="data.teacher or"):
        build_loss(LossConfig(distill_weight=0.5), teacher_temperature=0.1)(*torch.randn(2, 3, 4), torch.tensor(1.0))


def worker(rank, world_size):
    model = DistributedDataParallel(TinyDualEncoder(False))
    images, texts = global_batch(world_size)
    teacher_image, teacher_text = teacher_batch(LOCAL_BATCH * world_size)
    local = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    loss_fn = build_loss(LossConfig(distill_weight=WEIGHT), rank, world_size, teacher_temperature=TEACHER_TEMPERATURE)
    image_features, text_features = model(images[local], texts[local])
    terms = loss_fn(
        image_features,
        text_features,
        model.module.logit_scale.exp(),
        teacher_image=teacher_image[local],
        teacher_text=teacher_text[local],
    )
    loss = sum(terms.values())
    loss.backward()
    mean_loss = loss.detach().clone()
    torch.distributed.all_reduce(mean_loss)
    return mean_loss.item() / world_size, {n: p.grad.clone() for n, p in model.module.named_parameters()}


def test_two_gloo_ranks_equal_one_process(tmp_path):
    loss, grads = run_ranks(worker, 2, tmp_path / "ranks", timeout=240)[0]
    model = TinyDualEncoder(False)
    images, texts = global_batch(2)
    teacher_image, teacher_text = teacher_batch(2 * LOCAL_BATCH)
    image_features, text_features = model(images, texts)
    scale = model.logit_scale.exp()
    reference = (1 - WEIGHT) * naive_clip_loss(image_features, text_features, scale) + WEIGHT * naive_distillation_loss(
        image_features, text_features, scale, teacher_image, teacher_text, 1 / TEACHER_TEMPERATURE
    )
    reference.backward()
    assert math.isclose(loss, reference.item(), rel_tol=1e-5)
    for name, parameter in model.named_parameters():
        # 1e-5 relative as in test_losses_distributed: entries near zero judged against the tensor's scale (an
        # absolute 1e-7 failed here on fp32 rounding of 3e-7 in gradients whose largest entry is about 2)
        reference = parameter.grad
        torch.testing.assert_close(grads[name], reference, rtol=1e-5, atol=1e-5 * reference.abs().max().item())
        assert (grads[name] - reference).norm() <= 1e-5 * reference.norm(), name
    assert isinstance(build_loss(LossConfig(distill_weight=0.5), teacher_temperature=0.1), DistillationLoss)
