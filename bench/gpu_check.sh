#!/usr/bin/env bash
# The GPU checks, as one prepared command for a lent GPU machine (the device tool runs it in the repo root), in
# about 10 minutes on one H100/H200 with 16 CPU cores:
#   1. the tests marked `cuda` (tests/test_cuda.py: bf16 numerics against fp32, fused AdamW, pinned non-blocking
#      copies with on-device normalisation, SDPA flash attention taken in training, NCCL single-rank start, the CUDA
#      generator in checkpoints, memory stats in the logs, no host syncs; with two GPUs the losses under NCCL);
#   2. ViT-B/16, 224 px, bf16, batch 256 from synthetic shards written at 256 px: clipforge train against
#      open_clip_train (--precision amp_bf16), eager then compiled (speed.compile / --torchcompile), samples/s and
#      MFU of each (bench/train_throughput.py --device cuda);
#   3. the model's step ceiling without the data pipeline (bench/gpu_step.py, eager);
#   4. `clipforge plan`'s memory against the GPU: the peak each of a few one-GPU runs holds (ViT-B/16 bf16 with and
#      without gradient checkpointing, ViT-L/14, SigLIP B/16, the demo in fp32; torch.cuda.max_memory_allocated over
#      a third step) beside the plan's fake step, within 10%, and the allocator's reserved/allocated ratio, the slack
#      the plan sets aside (bench/plan_check.py --device cuda; about 2 minutes).
# Each part has a time limit, so a hang cannot eat the machine's whole budget.
#
# That machine's python3 has torch but not every clipforge dependency, and it cannot download: fetch the missing
# wheels here first, into .whl/ (git-ignored), and name it in the run's carry:
#   bash bench/gpu_check.sh --fetch-wheels       (here, once)
#   bash bench/gpu_check.sh                      (there, carry: [".whl"]; results also in $OUT/gpu_check.log)
# Record the printed figures with the date and the GPU in docs/benchmarks.md.
set -uo pipefail
cd "$(dirname "$0")/.."
MISSING="open_clip_torch==3.3.0 webdataset==1.0.2 braceexpand omegaconf==2.4.0 ftfy wcwidth
simplejpeg==1.9.0 pandas python-dateutil pytz tzdata six"
if [[ "${1:-}" == "--fetch-wheels" ]]; then
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d .whl $MISSING || exit 1
    ls -l .whl
    exit 0
fi
log=${OUT:-/tmp}/gpu_check.log
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    if compgen -G ".whl/*.whl" >/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
            && export PYTHONPATH=/tmp/site
    fi
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    timeout 120 python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_cuda.py
    echo "pytest -m cuda exit code: $?"
    python3 -c "import open_clip_train.main" || echo "open_clip_train does not import here: its rows will fail"
    vit="--device cuda --model ViT-B-16 --precision bf16 --batch-size 256 --shard-image-size 256 --workers 8
         --threads 16 --steps 50 --log-every 10 --skip-windows 2 --repeats 1 --data-dir /tmp/clipforge-gpu-bench"
    timeout 130 python3 bench/train_throughput.py $vit
    echo "eager comparison exit code: $?"
    timeout 240 python3 bench/train_throughput.py $vit --compile
    echo "compiled comparison exit code: $?"
    timeout 45 python3 bench/gpu_step.py --model ViT-B-16 --batch-size 256 --precision bf16 --steps 20
    timeout 240 python3 bench/plan_check.py --device cuda --json "${OUT:-/tmp}/plan_check_gpu.json"
    echo "planned against measured GPU memory exit code: $?"
} 2>&1 | tee "$log"
