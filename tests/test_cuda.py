"""What only a GPU can check, so that the first GPU run is not the first test of the CUDA path.

* no host syncs: ``normalize`` after its first batch, and a whole plain step with fused AdamW (the non-finite
  skip stays on the device);
* a bf16 and an fp16 step (GradScaler) with fused AdamW: the same update as the foreach AdamW, the loss of the
  fp32 reference;
* the GPU generator through a checkpoint, and a GPU checkpoint's generators resumed on a CPU rank;
* bf16 autocast numerics against fp32: features and gradients of a step;
* pinned-memory batches copied without blocking and normalised on the device, equal to the CPU normalisation;
* the fused flash / memory-efficient SDPA kernels (not the math fallback) taken in a training step;
* an NCCL group of one rank: initialised, and the collectives the loss uses work;
* a short training run on the GPU: memory stats, MFU against the table's peak and the CUDA-event breakdown logged;
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
from references import naive_clip_loss
from test_losses_distributed import LOCAL_BATCH, TinyDualEncoder, global_batch, loss_of, single_process_reference
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.parallel import DistributedDataParallel

from clipforge.data.images import ImageTransform
from clipforge.losses import LossConfig, build_loss
from clipforge.models import ModelConfig, build_model, enable_packed_attention, enable_pooled_last_block
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
        model,
        build_loss(LossConfig()),
        optimizer,
        constant_schedule(optimizer),
        device=DEVICE,
        precision="fp32",
        grad_clip_norm=1.0,
        max_logit_scale=100.0,
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
                model,
                build_loss(LossConfig()),
                optimizer,
                constant_schedule(optimizer),
                device=DEVICE,
                precision=precision,
                grad_clip_norm=1.0,
                max_logit_scale=100.0,
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


@ONE_GPU
def test_bf16_autocast_features_and_gradients_follow_fp32(tiny_model_json):
    built = build_model(ModelConfig(name=tiny_model_json))
    model = built.model.to(DEVICE).train()
    data = model_batch(built, 32)
    results = {}
    for dtype in (None, torch.bfloat16):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model(data["images"], data["texts"])
        loss = naive_clip_loss(out["image_features"].float(), out["text_features"].float(), out["logit_scale"].float())
        loss.backward()
        results[dtype] = (
            out,
            loss.detach(),
            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
        )
    (out32, loss32, grads32), (out16, loss16, grads16) = results[None], results[torch.bfloat16]
    for key in ("image_features", "text_features"):
        cosine = torch.nn.functional.cosine_similarity(out16[key].float(), out32[key], dim=-1)
        assert cosine.min() > 0.99, (key, cosine.min())
    assert loss16.item() == pytest.approx(loss32.item(), rel=0.02)
    for name, grad in grads32.items():
        error = (grads16[name].float() - grad).norm() / grad.norm().clamp_min(1e-12)
        assert error < 0.1, (name, error.item())  # bf16 keeps 8 bits of mantissa: gradients to a few percent


@ONE_GPU
def test_pinned_batches_copy_without_blocking_and_normalise_on_the_device(synth_data, tiny_model_json):
    from clipforge.data import DataConfig, build_train_loader
    from clipforge.train.loop import prepare_batch

    built = build_model(ModelConfig(name=tiny_model_json))
    cfg = DataConfig(train_urls=f"{synth_data}/train/{{00000..00001}}.tar", batch_size=8, num_workers=1)
    loader = build_train_loader(cfg, built.preprocess_cfg, built.tokenizer, pin_memory=True)
    try:
        batch = next(loader)
    finally:
        loader.close()
    assert batch["images"].dtype == torch.uint8 and batch["images"].is_pinned()  # 4x less to copy than float
    expected = loader.transform.normalize(batch["images"].clone())  # the CPU's float normalisation
    warm_up = {"images": batch["images"].clone().pin_memory(), "texts": batch["texts"]}
    prepare_batch(warm_up, loader.transform, DEVICE, channels_last=False, dynamic_text=False)  # mean, std on the GPU
    with sync_debug("error"):  # a pinned, non-blocking copy and the normalisation queue without waiting
        copied = prepare_batch(batch, loader.transform, DEVICE, channels_last=False, dynamic_text=False)
    assert copied["images"].device.type == "cuda" and copied["images"].dtype == torch.float32
    torch.testing.assert_close(copied["images"].cpu(), expected)


@ONE_GPU
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_training_attention_takes_the_fused_sdpa_kernels(precision, tiny_model_json):
    from torch.profiler import ProfilerActivity, profile

    built = build_model(ModelConfig(name=tiny_model_json))
    model = built.model.to(DEVICE).train()
    enable_pooled_last_block(model)  # as speed.pooled_last_block and speed.packed_attention prepare it
    enable_packed_attention(model)
    optimizer = build_optimizer(OptimConfig(warmup_steps=0), model)
    step = build_step(
        model,
        build_loss(LossConfig()),
        optimizer,
        constant_schedule(optimizer),
        device=DEVICE,
        precision=precision,
        grad_clip_norm=1.0,
        max_logit_scale=100.0,
    )
    data = model_batch(built)
    step(data)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as trace:
        step(data)
    names = {event.key for event in trace.key_averages()}
    fused = {name for name in names if "flash_attention" in name or "efficient_attention" in name}
    assert fused, sorted(n for n in names if "attention" in n)
    assert "aten::_scaled_dot_product_attention_math" not in names  # the unfused fallback


def _nccl_single_rank(rank, world_size):
    from clipforge.distributed import all_gather

    assert torch.distributed.get_backend() == "nccl" and torch.distributed.get_world_size() == 1
    value = torch.arange(4.0, device=f"cuda:{rank}")
    torch.distributed.all_reduce(value)
    gathered = all_gather(value.reshape(2, 2), world_size)
    torch.distributed.barrier()
    return value.cpu(), gathered.cpu()


@ONE_GPU
def test_an_nccl_group_of_one_rank_starts_and_its_collectives_work(tmp_path):
    (value, gathered) = run_ranks(_nccl_single_rank, 1, tmp_path, device="cuda", timeout=120)[0]
    assert value.tolist() == [0.0, 1.0, 2.0, 3.0] and gathered.tolist() == [[0.0, 1.0], [2.0, 3.0]]


@ONE_GPU
def test_a_gpu_run_logs_memory_mfu_and_the_cuda_event_breakdown(synth_data, tiny_model_json, tmp_path):
    import json

    from clipforge.train.config import load_config
    from clipforge.train.loop import train

    out = tmp_path / "run"
    cfg = load_config(
        None,
        [
            f"data.train_urls={synth_data}/train/{{00000..00005}}.tar",
            "data.batch_size=32",
            "data.num_workers=1",
            f"model.name={tiny_model_json}",
            f"train.output_dir={out}",
            "train.steps=4",
            "train.precision=bf16",
            "logging.peak_tflops=100",
            "logging.log_every=2",
            "logging.profile_every=2",
            "logging.progress_bar=false",
            "logging.tensorboard=false",
            "logging.plot=false",
            "eval.suite=null",
        ],
    )
    torch.cuda.reset_peak_memory_stats()
    train(cfg)
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0 < last["perf/max_memory_mb"] <= torch.cuda.max_memory_allocated() / 2**20 + 1
    assert last["perf/mfu"] == pytest.approx(last["perf/model_tflops_per_device"] / 100) and last["perf/mfu"] > 0
    parts = [key for key in last if key.startswith("time/") and key != "time/step_s"]
    assert len(parts) == 8 and all(last[key] >= 0 for key in parts)
    assert sum(last[key] for key in parts) == pytest.approx(last["time/step_s"], rel=1e-6)


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
