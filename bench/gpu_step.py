"""Training-step throughput and MFU on one GPU: forward, loss, backward and fused AdamW on synthetic tensors.

    python3 bench/gpu_step.py --model ViT-B-16 --batch-size 256 --precision bf16 [--compile]

The data pipeline is left out (tensors made once on the GPU), so this is the model's and the step's ceiling;
``bench/train_throughput.py`` measures whole runs against OpenCLIP. FLOPs per sample are
``clipforge.train.flops.count_train_flops`` (what ``clipforge train --dry-run`` reports and ``perf/mfu`` uses; the
captions here are full length); MFU is achieved FLOP/s over the chip's dense peak for the precision
(``--peak-tflops``, default ``clipforge.train.peak``'s table: H100/H200 989 bf16, 495 tf32).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from clipforge.losses import LossConfig, build_loss
from clipforge.models import ModelConfig, build_model, enable_packed_attention, enable_pooled_last_block
from clipforge.train.flops import count_train_flops
from clipforge.train.optim import OptimConfig, build_optimizer, build_scheduler
from clipforge.train.peak import peak_tflops
from clipforge.train.step import build_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--steps", type=int, default=20, help="timed steps, after 5 warm-up steps")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--peak-tflops", type=float, help="the chip's dense peak for this precision")
    parser.add_argument("--device", default="cuda", help="cuda (cpu: only to try the script)")
    args = parser.parse_args()

    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = True
    device = args.device
    cuda = device.startswith("cuda")
    built = build_model(ModelConfig(name=args.model), device=device)
    model = built.model.train()
    enable_pooled_last_block(model)  # as speed.pooled_last_block and speed.packed_attention (the defaults) prepare it
    enable_packed_attention(model)
    size = built.preprocess_cfg["size"]
    size = size if isinstance(size, int) else size[0]
    context = built.model_cfg["text_cfg"].get("context_length", 77)
    flops_per_sample = count_train_flops(ModelConfig(name=args.model)).train()
    if args.compile:
        model.compile()
    optim_cfg = OptimConfig(lr=1e-4, warmup_steps=0)
    optimizer = build_optimizer(optim_cfg, model)
    step = build_step(
        model,
        build_loss(LossConfig()),
        optimizer,
        build_scheduler(optim_cfg, optimizer, 10**6),
        device=device,
        precision=args.precision,
        grad_clip_norm=None,
        max_logit_scale=100.0,
    )
    batch = {
        "images": torch.randn(args.batch_size, 3, size, size, device=device),
        "texts": torch.randint(1, 49406, (args.batch_size, context), device=device),
        "keys": [],
    }
    batch["texts"][:, -1] = 49407  # end-of-text, where the text tower pools
    for _ in range(5):
        step(batch)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(args.steps):
        out = step(batch)
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = peak_tflops(device, args.precision, tf32=True, configured=args.peak_tflops)[0] or None
    samples_per_s = args.steps * args.batch_size / elapsed
    achieved = samples_per_s * flops_per_sample / 1e12
    print(
        json.dumps(
            {
                "device": name,
                "torch": torch.__version__,
                "model": args.model,
                "batch_size": args.batch_size,
                "precision": args.precision,
                "compile": args.compile,
                "samples_per_s": round(samples_per_s, 1),
                "step_time_ms": round(1000 * elapsed / args.steps, 2),
                "train_gflops_per_sample": flops_per_sample / 1e9,
                "achieved_tflops": round(achieved, 1),
                "mfu": round(achieved / peak, 4) if peak else None,
                "max_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
                "loss": float(out["loss"]),
                "date": time.strftime("%Y-%m-%d"),
            }
        )
    )


if __name__ == "__main__":
    main()
