"""The distributed losses on 2 and 4 gloo processes equal one process holding the whole global batch.

Each rank holds a slice of the global batch, runs a tiny dual encoder under DDP and backpropagates
its local loss; DDP averages the gradients. The parent computes the naive single-process loss on
the whole batch and compares the loss and every parameter's gradient (logit_scale and logit_bias
included) to 1e-5 relative.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from ranks import run_ranks
from references import naive_clip_loss, naive_siglip_loss
from torch.nn.parallel import DistributedDataParallel

from clipforge.losses import LossConfig, build_loss

LOCAL_BATCH = 6


class TinyDualEncoder(torch.nn.Module):
    def __init__(self, with_bias: bool):
        super().__init__()
        torch.manual_seed(0)
        self.image = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
        self.text = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))
        if with_bias:  # only SigLIP has one; an unused parameter would stall DDP's reduction
            self.logit_bias = torch.nn.Parameter(torch.tensor(-10.0))

    def forward(self, images, texts):
        return F.normalize(self.image(images), dim=-1), F.normalize(self.text(texts), dim=-1)


def global_batch(world_size):
    generator = torch.Generator().manual_seed(1)
    size = LOCAL_BATCH * world_size
    return torch.randn(size, 12, generator=generator), torch.randn(size, 10, generator=generator)


def loss_of(loss_fn, kind, model, images, texts):
    image_features, text_features = model(images, texts)
    core = model.module if hasattr(model, "module") else model
    if kind == "clip":
        return loss_fn(image_features, text_features, core.logit_scale.exp())["contrastive"]
    return loss_fn(image_features, text_features, core.logit_scale.exp(), core.logit_bias)["contrastive"]


def worker(rank, world_size, cfg):
    model = DistributedDataParallel(TinyDualEncoder(cfg.kind == "siglip"))
    images, texts = global_batch(world_size)
    local = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    loss = loss_of(build_loss(cfg, rank, world_size), cfg.kind, model, images[local], texts[local])
    loss.backward()
    mean_loss = loss.detach().clone()
    torch.distributed.all_reduce(mean_loss)
    return mean_loss.item() / world_size, {n: p.grad.clone() for n, p in model.module.named_parameters()}


def run_distributed(cfg, world_size, tmp_path):
    return run_ranks(worker, world_size, tmp_path / "ranks", cfg)[0]


def single_process_reference(kind, world_size):
    model = TinyDualEncoder(kind == "siglip")
    images, texts = global_batch(world_size)
    image_features, text_features = model(images, texts)
    if kind == "clip":
        loss = naive_clip_loss(image_features, text_features, model.logit_scale.exp())
    else:
        loss = naive_siglip_loss(image_features, text_features, model.logit_scale.exp(), model.logit_bias)
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}


CASES = [
    ("clip", {}, 2),
    ("clip", {}, 4),
    ("clip", {"tile_size": 4}, 2),
    ("siglip", {}, 2),
    ("siglip", {}, 4),
    ("siglip", {"siglip_exchange": "ring"}, 2),
    ("siglip", {"siglip_exchange": "ring"}, 4),
    ("siglip", {"siglip_exchange": "ring", "tile_size": 4}, 4),
]


@pytest.mark.parametrize(
    "kind,options,world_size",
    CASES,
    ids=[f"{k}-{'-'.join(f'{a}={b}' for a, b in o.items()) or 'plain'}-{w}proc" for k, o, w in CASES],
)
def test_distributed_loss_equals_single_process(kind, options, world_size, tmp_path):
    loss, grads = run_distributed(LossConfig(kind=kind, **options), world_size, tmp_path)
    reference_loss, reference_grads = single_process_reference(kind, world_size)
    assert loss == pytest.approx(reference_loss, rel=1e-5)
    assert set(grads) == set(reference_grads)
    for name, grad in grads.items():
        reference = reference_grads[name]
        # 1e-5 relative: elementwise, with entries near zero judged against the tensor's scale
        torch.testing.assert_close(grad, reference, rtol=1e-5, atol=1e-5 * reference.abs().max().item())
        assert (grad - reference).norm() <= 1e-5 * reference.norm(), name
