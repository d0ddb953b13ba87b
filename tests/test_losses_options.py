"""The CLIP loss options (multi-positive, hard negatives) against brute-force per-row references.

The references are written from the papers' formulas, one row and one column at a time in float64
python loops (the hard-negative one in the linear domain of Robinson et al.'s official code), and
share nothing with ``clipforge.losses``. Loss and gradients (features and the log temperature) are
compared; a 2-process gloo run shows the distributed loss equals one process holding the whole
batch, with duplicate captions and images placed across ranks.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from ranks import run_ranks
from references import naive_clip_loss
from torch.nn.parallel import DistributedDataParallel

from clipforge.losses import ClipLoss, LossConfig, build_loss
from clipforge.losses.clip import hard_negative_loss

CAPTION_IDS = [7, 3, 7, 9, 4, 3, 11, 7, 12, 13]  # 7 three times, 3 twice
IMAGE_IDS = [20, 21, 22, 23, 23, 25, 20, 27, 28, 29]  # 20 and 23 twice; (0, 6) share an image, not a caption


def features(batch=10, dim=8, seed=0, aligned=0, scale=1 / 0.07):
    """Unit features (leaves); the first ``aligned`` pairs almost identical (large positive logits)."""
    generator = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, dim, generator=generator), dim=-1)
    text = F.normalize(torch.randn(batch, dim, generator=generator), dim=-1)
    text[:aligned] = F.normalize(image[:aligned] + 0.05 * torch.randn(aligned, dim, generator=generator), dim=-1)
    return image.requires_grad_(), text.requires_grad_(), torch.tensor(math.log(scale), requires_grad=True)


def loss_and_grads(fn, image, text, log_scale):
    loss = fn(image, text, log_scale.exp())
    loss = loss["contrastive"] if isinstance(loss, dict) else loss
    return loss.detach(), torch.autograd.grad(loss, (image, text, log_scale))


def assert_same(mine, reference, rtol=1e-5):
    (loss, grads), (reference_loss, reference_grads) = mine, reference
    torch.testing.assert_close(loss.double(), reference_loss.double(), rtol=rtol, atol=1e-6)
    for grad, expected in zip(grads, reference_grads):
        torch.testing.assert_close(grad, expected.to(grad.dtype), rtol=rtol, atol=rtol * expected.abs().max().item())


# ---- brute-force references ------------------------------------------------------------------------------------


def row_logits(anchors, candidates, t, i):
    return [t * sum(anchors[i][k] * candidates[j][k] for k in range(anchors.shape[1])) for j in range(len(candidates))]


def reference_multi_positive(image, text, scale, caption_ids, image_ids, mode):
    """Khosla et al.'s L_out per row, -1/|P(i)| Σ_p log(exp(s_ip) / Σ_j exp(s_ij)), both directions, mean."""
    x, y, t = image.double(), text.double(), scale.double()
    n = len(x)

    def is_positive(i, j):
        same_caption, same_image = caption_ids[i] == caption_ids[j], image_ids[i] == image_ids[j]
        return (
            i == j
            or {
                "pairs": False,
                "caption": same_caption,
                "image": same_image,
                "caption_or_image": same_caption or same_image,
            }[mode]
        )

    total = 0.0
    for anchors, candidates in ((x, y), (y, x)):
        for i in range(n):
            logits = row_logits(anchors, candidates, t, i)
            denominator = sum(torch.exp(s) for s in logits)
            positives = [j for j in range(n) if is_positive(i, j)]
            total = total - sum(torch.log(torch.exp(logits[p]) / denominator) for p in positives) / len(positives)
    return total / (2 * n)


def reference_hard_negative(image, text, scale, beta, tau_plus, clamped=None):
    """Robinson et al.'s official criterion ('hard' estimator), one row at a time, both directions, mean."""
    x, y, t = image.double(), text.double(), scale.double()
    n = len(x)
    big_n = n - 1
    total = 0.0
    for anchors, candidates in ((x, y), (y, x)):
        for i in range(n):
            logits = row_logits(anchors, candidates, t, i)
            pos = torch.exp(logits[i])
            neg = [torch.exp(s) for j, s in enumerate(logits) if j != i]
            imp = [torch.exp(beta * torch.log(e)) for e in neg]
            reweight_neg = sum(w * e for w, e in zip(imp, neg)) / (sum(imp) / big_n)
            ng = (-tau_plus * big_n * pos + reweight_neg) / (1 - tau_plus)
            floor = big_n * torch.exp(-t)
            if ng < floor:
                ng = floor
                if clamped is not None:
                    clamped.append(i)
            total = total - torch.log(pos / (pos + ng))
    return total / (2 * n)


# ---- multi-positive -------------------------------------------------------------------------------------------


def multi_positive(mode, caption_ids=CAPTION_IDS, image_ids=IMAGE_IDS):
    loss = ClipLoss(positives=mode)
    return lambda image, text, scale: loss(
        image, text, scale, caption_ids=torch.tensor(caption_ids), image_ids=torch.tensor(image_ids)
    )


@pytest.mark.parametrize("mode", ["caption", "image", "caption_or_image"])
def test_multi_positive_equals_reference(mode):
    mine = loss_and_grads(multi_positive(mode), *features(seed=1))
    reference = loss_and_grads(
        lambda i, t, s: reference_multi_positive(i, t, s, CAPTION_IDS, IMAGE_IDS, mode), *features(seed=1)
    )
    assert_same(mine, reference)
    plain = loss_and_grads(ClipLoss(), *features(seed=1))
    assert abs(mine[0] - plain[0]) > 1e-3  # the duplicates changed the loss


@pytest.mark.parametrize("mode", ["caption", "image", "caption_or_image"])
def test_multi_positive_with_distinct_ids_is_the_clip_loss(mode):
    distinct = list(range(100, 110))
    mine = loss_and_grads(multi_positive(mode, distinct, distinct[::-1]), *features(seed=2))
    assert_same(mine, loss_and_grads(ClipLoss(), *features(seed=2)), rtol=1e-6)
    assert_same(mine, loss_and_grads(naive_clip_loss, *features(seed=2)), rtol=1e-6)
    reference = loss_and_grads(
        lambda i, t, s: reference_multi_positive(i, t, s, distinct, distinct, "pairs"), *features(seed=2)
    )
    assert_same(mine, reference)


def test_multi_positive_needs_ids():
    image, text, log_scale = features()
    with pytest.raises(ValueError, match="loss.positives=caption needs caption_ids"):
        ClipLoss(positives="caption")(image, text, log_scale.exp())
    with pytest.raises(ValueError, match="loss.positives=caption_or_image needs image_ids"):
        ClipLoss(positives="caption_or_image")(image, text, log_scale.exp(), caption_ids=torch.arange(10))
    with pytest.raises(ValueError, match=r"caption_ids: expected integer ids of shape \(10,\)"):
        ClipLoss(positives="caption")(image, text, log_scale.exp(), caption_ids=torch.arange(9))
    with pytest.raises(ValueError, match="caption_ids: expected integer ids"):
        ClipLoss(positives="caption")(image, text, log_scale.exp(), caption_ids=torch.zeros(10))


def test_pairs_ignores_ids_and_is_unchanged():
    image, text, log_scale = features()
    plain = ClipLoss()(image, text, log_scale.exp())["contrastive"]
    with_ids = ClipLoss()(
        image,
        text,
        log_scale.exp(),
        caption_ids=torch.zeros(10, dtype=torch.long),
        image_ids=torch.zeros(10, dtype=torch.long),
    )["contrastive"]
    assert torch.equal(plain, with_ids)


def test_multi_positive_with_huge_hash_ids():
    """63-bit hashes that differ only in the low bits stay distinct (compared as int64, never as floats)."""
    base = 2**62 + 12345
    captions = [base + 1, base + 2, base + 1, base + 3, base + 4, base + 2, base + 5, base + 1, base + 6, base + 7]
    mine = loss_and_grads(multi_positive("caption", captions), *features(seed=3))
    small = [c - base for c in captions]
    reference = loss_and_grads(
        lambda i, t, s: reference_multi_positive(i, t, s, small, IMAGE_IDS, "caption"), *features(seed=3)
    )
    assert_same(mine, reference)


# ---- hard negatives --------------------------------------------------------------------------------------------


HARD_CASES = [(1.0, 0.0), (0.0, 0.1), (0.5, 0.1), (3.0, 0.05), (0.2, 0.5)]


@pytest.mark.parametrize("beta,tau_plus", HARD_CASES)
def test_hard_negatives_equal_reference(beta, tau_plus):
    mine = loss_and_grads(ClipLoss(hard_negative_beta=beta, debias_tau_plus=tau_plus), *features(seed=4))
    reference = loss_and_grads(lambda i, t, s: reference_hard_negative(i, t, s, beta, tau_plus), *features(seed=4))
    assert_same(mine, reference)


@pytest.mark.parametrize("beta,tau_plus", [(0.0, 0.1), (1.0, 0.3)])
def test_hard_negatives_floor_equals_reference(beta, tau_plus):
    """Half the pairs nearly identical: their debiased term goes below the floor N exp(-t), the others not."""
    clamped = []
    reference = loss_and_grads(
        lambda i, t, s: reference_hard_negative(i, t, s, beta, tau_plus, clamped), *features(seed=5, aligned=5)
    )
    assert 0 < len(clamped) < 20  # the floor is active on some rows, not all
    mine = loss_and_grads(ClipLoss(hard_negative_beta=beta, debias_tau_plus=tau_plus), *features(seed=5, aligned=5))
    assert_same(mine, reference)


def test_hard_negative_loss_at_beta_0_tau_0_is_the_clip_loss():
    image, text, log_scale = features(seed=6)

    def hard_at_zero(image, text, scale):
        labels = torch.arange(10)
        diagonal = torch.eye(10, dtype=torch.bool)
        return (
            hard_negative_loss(scale * image @ text.T, diagonal, labels, scale, 0.0, 0.0)
            + hard_negative_loss(scale * text @ image.T, diagonal, labels, scale, 0.0, 0.0)
        ) / 2

    assert_same(
        loss_and_grads(hard_at_zero, image, text, log_scale),
        loss_and_grads(naive_clip_loss, image, text, log_scale),
        rtol=1e-6,
    )
    assert_same(
        loss_and_grads(lambda i, t, s: reference_hard_negative(i, t, s, 0.0, 0.0), image, text, log_scale),
        loss_and_grads(naive_clip_loss, image, text, log_scale),
    )
    tiny_beta = loss_and_grads(ClipLoss(hard_negative_beta=1e-7), image, text, log_scale)
    assert_same(tiny_beta, loss_and_grads(ClipLoss(), image, text, log_scale))


def test_hard_negatives_are_harder():
    """β > 0 weights the most similar negatives up: the loss of each row can only grow."""
    losses = [loss_and_grads(ClipLoss(hard_negative_beta=beta), *features(seed=7))[0] for beta in (0.0, 0.5, 2.0)]
    assert losses[0] < losses[1] < losses[2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hard_negatives_stable_at_max_scale(dtype):
    """(1 + β) · 100 · cos overflows exp in fp32; the log-space loss stays finite and equals the fp64 reference."""
    image, text, log_scale = features(seed=8, aligned=3, scale=100.0)
    loss_fn = ClipLoss(hard_negative_beta=2.0, debias_tau_plus=0.1)
    loss = loss_fn(image.to(dtype), text.to(dtype), log_scale.exp())["contrastive"]
    grads = torch.autograd.grad(loss, (image, text, log_scale))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(torch.isfinite(g).all() for g in grads)
    if dtype == torch.float32:
        assert_same(
            (loss.detach(), grads),
            loss_and_grads(
                lambda i, t, s: reference_hard_negative(i, t, s, 2.0, 0.1), *features(seed=8, aligned=3, scale=100.0)
            ),
            rtol=1e-4,
        )


def test_hard_negatives_batch_of_one():
    image, text, log_scale = features(batch=1)
    loss, grads = loss_and_grads(ClipLoss(hard_negative_beta=1.0, debias_tau_plus=0.1), image, text, log_scale)
    assert loss == 0 and all((g == 0).all() for g in grads)


# ---- configuration ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options,message",
    [
        ({"positives": "labels"}, "loss.positives: 'labels' is not one of"),
        ({"hard_negative_beta": -1.0}, "loss.hard_negative_beta: must be >= 0"),
        ({"debias_tau_plus": 1.0}, r"loss.debias_tau_plus: must be in \[0, 1\)"),
        ({"debias_tau_plus": -0.1}, r"loss.debias_tau_plus: must be in \[0, 1\)"),
        (
            {"kind": "siglip", "positives": "caption"},
            "loss.positives apply to loss.kind=clip only, not loss.kind=siglip",
        ),
        (
            {"kind": "siglip", "hard_negative_beta": 1.0, "debias_tau_plus": 0.1},
            "loss.hard_negative_beta and loss.debias_tau_plus apply to loss.kind=clip only",
        ),
        (
            {"tile_size": 16, "hard_negative_beta": 0.5},
            "loss.hard_negative_beta need the materialised logits: set loss.tile_size=0",
        ),
        ({"tile_size": 16, "positives": "image"}, "loss.positives need the materialised logits"),
        (
            {"positives": "caption", "debias_tau_plus": 0.1},
            "loss.positives=caption cannot be combined with loss.debias_tau_plus",
        ),
    ],
)
def test_config_refuses_invalid_options(options, message):
    with pytest.raises(ValueError, match=message):
        LossConfig(**options)


def test_build_loss_passes_the_options_through():
    loss = build_loss(LossConfig(positives="caption_or_image"), rank=0, world_size=1)
    assert isinstance(loss, ClipLoss) and loss.positives == "caption_or_image"
    loss = build_loss(LossConfig(hard_negative_beta=0.5, debias_tau_plus=0.1))
    assert (loss.hard_negative_beta, loss.debias_tau_plus, loss.positives) == (0.5, 0.1, "pairs")
    default = build_loss(LossConfig())
    assert (default.positives, default.hard_negative_beta, default.debias_tau_plus) == ("pairs", 0.0, 0.0)
    with pytest.raises(ValueError, match="loss.tile_size=0"):
        ClipLoss(tile_size=8, positives="caption")


# ---- distributed: 2 gloo processes equal one process holding the whole batch ---------------------------------

LOCAL_BATCH = 6
# duplicates within rank 0 (caption 10, image 1) and across ranks (captions 10, 11, 12; images 0, 4)
GLOBAL_CAPTIONS = [10, 11, 12, 10, 13, 14, 11, 15, 10, 16, 17, 12]
GLOBAL_IMAGES = [0, 1, 2, 3, 4, 1, 6, 7, 8, 4, 0, 11]
DISTRIBUTED_CASES = [
    {"positives": "caption"},
    {"positives": "caption_or_image"},
    {"positives": "image"},
    {"hard_negative_beta": 1.0, "debias_tau_plus": 0.1},
    {"hard_negative_beta": 0.5},
]


class TinyDualEncoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.image = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
        self.text = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))

    def forward(self, images, texts):
        return F.normalize(self.image(images), dim=-1), F.normalize(self.text(texts), dim=-1)


def global_batch():
    generator = torch.Generator().manual_seed(1)
    size = len(GLOBAL_CAPTIONS)
    return torch.randn(size, 12, generator=generator), torch.randn(size, 10, generator=generator)


def loss_and_parameter_grads(model, loss_fn, images, texts, captions, image_ids):
    image_features, text_features = model(images, texts)
    core = model.module if hasattr(model, "module") else model
    loss = loss_fn(
        image_features,
        text_features,
        core.logit_scale.exp(),
        caption_ids=torch.tensor(captions),
        image_ids=torch.tensor(image_ids),
    )["contrastive"]
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in core.named_parameters()}


def worker(rank, world_size):
    local = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    images, texts = global_batch()
    results = []
    for options in DISTRIBUTED_CASES:
        loss, grads = loss_and_parameter_grads(
            DistributedDataParallel(TinyDualEncoder()),
            build_loss(LossConfig(**options), rank, world_size),
            images[local],
            texts[local],
            GLOBAL_CAPTIONS[local],
            GLOBAL_IMAGES[local],
        )
        torch.distributed.all_reduce(loss)
        results.append((loss.item() / world_size, grads))
    return results


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    return run_ranks(worker, 2, tmp_path_factory.mktemp("ranks"))[0]  # one spawn for every case


@pytest.mark.parametrize(
    "case", range(len(DISTRIBUTED_CASES)), ids=["-".join(f"{k}={v}" for k, v in o.items()) for o in DISTRIBUTED_CASES]
)
def test_distributed_equals_single_process(case, distributed_results):
    loss, grads = distributed_results[case]
    images, texts = global_batch()
    reference_loss, reference_grads = loss_and_parameter_grads(
        TinyDualEncoder(),
        build_loss(LossConfig(**DISTRIBUTED_CASES[case])),
        images,
        texts,
        GLOBAL_CAPTIONS,
        GLOBAL_IMAGES,
    )
    plain_loss, _ = loss_and_parameter_grads(
        TinyDualEncoder(), ClipLoss(), images, texts, GLOBAL_CAPTIONS, GLOBAL_IMAGES
    )
    assert abs(reference_loss - plain_loss) > 1e-3  # the option (and the cross-rank duplicates) matter
    assert loss == pytest.approx(reference_loss.item(), rel=1e-5)
    assert set(grads) == set(reference_grads)
    for name, grad in grads.items():
        reference = reference_grads[name]
        torch.testing.assert_close(grad, reference, rtol=1e-5, atol=1e-5 * reference.abs().max().item())
        assert (grad - reference).norm() <= 1e-5 * reference.norm(), name
