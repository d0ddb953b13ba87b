"""What only a GPU can check, so that the first GPU run is not the first test of the CUDA path.

* no host syncs: ``normalize`` after its first batch, and a whole plain step with fused AdamW (the non-finite
  skip stays on the device);
* a bf16 and an fp16 step (GradScaler) with fused AdamW: the same update as the foreach AdamW, the loss of the
  fp32 reference;
* the GPU generator through a checkpoint, and a GPU checkpoint's generators resumed on a CPU rank;
* on two GPUs under NCCL: the CLIP loss and the SigLIP ring (and all-gather) equal one process holding the global
  batch, loss and every gradient (as tests/test_losses_distributed.py does under gloo), with a timeout.

Every test is marked ``cuda`` and skipped without a GPU (the NCCL ones without two): ``pytest -m cuda``.
"""

from __future__ import annotations

import contextlib
import copy
import random
import warnings

import pytest
import torch
from checkpointing import load_checkpoint, save_checkpoint
from ranks import run_ranks
from test_losses_distributed import LOCAL_BATCH, TinyDualEncoder, global_batch, loss_of, single_process_reference
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.parallel import DistributedDataParallel

from clipforge.data.images import ImageTransform
from clipforge.losses import LossConfig, build_loss, naive_clip_loss
from clipforge.models import ModelConfig, build_model
from clipforge.train.optim import OptimConfig, build_optimizer
from clipforge.train.state import RNGState
from clipforge.train.step import build_step

pytestmark = pytest.mark.cuda
ONE_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (NCCL between them)")
DEVICE = "cuda:0"


@contextlib.contextmanager
def sync_debug(mode: str):
    """torch.cuda.set_sync_debug_mode for the block: "error" raises at a synchronising call, "warn" warns."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def model_batch(built, size: int = 16) -> dict[str, torch.Tensor]:
    """A fixed batch on the GPU: normalised images (size, 3, 32, 32) and token ids (size, context)."""
    generator = torch.Generator().manual_seed(0)
    words = ["red", "blue", "circle", "square", "star", "two", "small", "large", "above", "left"]
    captions = [" ".join(words[i] for i in torch.randint(0, 10, (5,), generator=generator)) for _ in range(size)]
    return {
        "images": torch.randn(size, 3, 32, 32, generator=generator).to(DEVICE),
        "texts": built.tokenizer(captions).to(DEVICE),
    }


def constant_schedule(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


@ONE_GPU
def test_normalize_makes_no_host_sync_after_its_first_batch():
    transform = ImageTransform(size=32)
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)).to(
        DEVICE
    )
    reference = transform.normalize(images.cpu())
    transform.normalize(images)  # the first batch on this device makes its mean and std tensors
    with sync_debug("error"):
        normalized = transform.normalize(images)
    torch.testing.assert_close(normalized.cpu(), reference)


@ONE_GPU
def test_a_plain_step_makes_no_host_sync(tiny_model_json):
    built = build_model(ModelConfig(name=tiny_model_json))
    model = built.model.to(DEVICE).train()
    optimizer = build_optimizer(OptimConfig(warmup_steps=0), model)
    step = build_step(
        model, build_loss(LossConfig()), optimizer, constant_schedule(optimizer), DEVICE, "fp32", 1.0, 100.0
    )
    data = model_batch(built)
    step(data)  # optimizer state, cuBLAS handles and the like are made on the first step
    with sync_debug("error"):  # the backward pass runs on autograd's device thread: only "error" reaches it
        step.backward(data)
    with sync_debug("warn"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = step(data)
    syncs = [w for w in caught if "synchronizing" in str(w.message)]
    # fused AdamW takes the non-finite skip as a device flag: the whole step runs without waiting for the GPU
    assert step.skips_on_device and syncs == [], [str(w.message) for w in syncs]
    assert not out["nonfinite"]


@ONE_GPU
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_mixed_precision_step_with_fused_adamw_updates_as_foreach_adamw(precision, tiny_model_json):
    """The fused kernel (which takes GradScaler's inf flag on the device) applies the update of the foreach AdamW on
    the same gradients; the step's loss is the fp32 loss to autocast's precision."""
    built = build_model(ModelConfig(name=tiny_model_json))
    data = model_batch(built)
    initial = copy.deepcopy(built.model).to(DEVICE)
    with torch.no_grad():
        out = initial(data["images"], data["texts"])
        reference_loss = naive_clip_loss(out["image_features"], out["text_features"], out["logit_scale"])
    runs = {}
    deterministic = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True  # both runs get bit-identical gradients (math attention as well)
    try:
        for fused in (True, False):
            model = copy.deepcopy(built.model).to(DEVICE).train()
            optimizer = build_optimizer(OptimConfig(lr=1e-3, warmup_steps=0, fused=fused), model)
            assert bool(optimizer.param_groups[0]["fused"]) is fused
            step = build_step(
                model, build_loss(LossConfig()), optimizer, constant_schedule(optimizer), DEVICE, precision, 1.0, 100.0
            )
            assert (step.scaler is not None) == (precision == "fp16")
            skipped = 0  # fp16: the scaler skips steps whose gradients overflow and lowers its scale
            with sdpa_kernel(SDPBackend.MATH):
                while True:
                    scale = step.scaler.get_scale() if step.scaler is not None else None
                    result = step(data)
                    assert not result["nonfinite"]
                    if step.scaler is None or step.scaler.get_scale() == scale:
                        break
                    skipped += 1
                    assert skipped < 30, "the gradient scaler never applied an update"
            runs[fused] = model, result, skipped
    finally:
        torch.backends.cudnn.deterministic = deterministic
    (fused_model, fused_result, fused_skipped), (foreach_model, _, foreach_skipped) = runs[True], runs[False]
    assert fused_skipped == foreach_skipped  # the same overflowing steps skipped, then one update applied
    torch.testing.assert_close(fused_result["loss"], reference_loss, rtol=0, atol=0.05)
    moved = 0.0
    for (name, fused_parameter), foreach_parameter, start in zip(
        fused_model.named_parameters(), foreach_model.parameters(), initial.parameters()
    ):
        torch.testing.assert_close(fused_parameter, foreach_parameter, rtol=1e-4, atol=1e-5, msg=name)
        moved = max(moved, (fused_parameter - start).abs().max().item())
    assert moved > 5e-4  # an update of about lr was applied, not skipped


def draws(device: str) -> tuple[list[float], list[float], float]:
    return torch.rand(4, device=device).tolist(), torch.rand(4).tolist(), random.random()


@ONE_GPU
def test_the_gpu_generator_round_trips_through_a_checkpoint(tmp_path):
    torch.manual_seed(5)
    random.seed(6)
    draws(DEVICE)  # somewhere in the streams, not at a seed
    assert set(RNGState(DEVICE).state_dict()) == {"torch", "python", "cuda_device"}
    model = torch.nn.Linear(2, 2)
    save_checkpoint(tmp_path, model, device=DEVICE)  # the generators as they are now
    expected = draws(DEVICE)
    torch.manual_seed(0)
    random.seed(0)
    load_checkpoint(tmp_path / "step_00000001", model, device=DEVICE)
    assert draws(DEVICE) == expected


@ONE_GPU
def test_a_gpu_checkpoints_generators_resume_on_a_cpu_rank(tmp_path, monkeypatch):
    torch.manual_seed(9)
    random.seed(10)
    model = torch.nn.Linear(2, 2)
    save_checkpoint(tmp_path, model, device=DEVICE)
    expected = torch.rand(4).tolist(), random.random()
    state = torch.load(tmp_path / "step_00000001" / "rng_rank0.pt", weights_only=True)
    assert "cuda_device" in state
    torch.manual_seed(0)
    random.seed(0)

    def forbidden(*args, **kwargs):
        raise AssertionError("a CPU rank restored a CUDA generator")

    for name in ("set_rng_state", "set_rng_state_all", "get_rng_state", "get_rng_state_all"):
        monkeypatch.setattr(torch.cuda, name, forbidden)
    load_checkpoint(tmp_path / "step_00000001", model, device="cpu")
    assert (torch.rand(4).tolist(), random.random()) == expected


NCCL_CASES = [
    ("clip", {}),
    ("clip", {"tile_size": 4}),
    ("siglip", {}),
    ("siglip", {"siglip_exchange": "ring"}),
    ("siglip", {"siglip_exchange": "ring", "tile_size": 4}),
]
NCCL_IDS = [f"{kind}-{'-'.join(f'{k}={v}' for k, v in options.items()) or 'plain'}" for kind, options in NCCL_CASES]


def _distributed_losses(rank, world_size, device_type):
    """Every case's mean loss and gradients on this rank (a slice of the global batch under DDP); device_type cuda:
    rank r on cuda:r under NCCL (cpu, under gloo, is how this function itself was checked without GPUs)."""
    torch.set_float32_matmul_precision("highest")  # compared with fp32 on a CPU: no TF32
    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    images, texts = global_batch(world_size)
    local = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    results = {}
    for case, (kind, options) in zip(NCCL_IDS, NCCL_CASES):
        cfg = LossConfig(kind=kind, **options)
        model = DistributedDataParallel(
            TinyDualEncoder(kind == "siglip").to(device), device_ids=[rank] if device_type == "cuda" else None
        )
        loss = loss_of(
            build_loss(cfg, rank, world_size), kind, model, images[local].to(device), texts[local].to(device)
        )
        loss.backward()
        mean_loss = loss.detach().clone()
        torch.distributed.all_reduce(mean_loss)
        results[case] = (
            mean_loss.item() / world_size,
            {n: p.grad.detach().cpu() for n, p in model.module.named_parameters()},
        )
    return results


@pytest.fixture(scope="module")
def nccl_results(tmp_path_factory):
    """One launch of two NCCL ranks for every case; a hung exchange fails after the timeout."""
    return run_ranks(_distributed_losses, 2, tmp_path_factory.mktemp("nccl"), "cuda", device="cuda", timeout=300)[0]


@TWO_GPUS
@pytest.mark.parametrize("case", NCCL_IDS)
def test_nccl_losses_equal_one_process_with_the_global_batch(case, nccl_results):
    kind = case.split("-")[0]
    loss, grads = nccl_results[case]
    reference_loss, reference_grads = single_process_reference(kind, 2)
    assert loss == pytest.approx(reference_loss, rel=1e-5)
    assert set(grads) == set(reference_grads)
    for name, grad in grads.items():
        reference = reference_grads[name]
        torch.testing.assert_close(grad, reference, rtol=1e-5, atol=1e-5 * reference.abs().max().item())
        assert (grad - reference).norm() <= 1e-5 * reference.norm(), name
