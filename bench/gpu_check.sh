#!/usr/bin/env bash
# The GPU checks, as one prepared command for a lent GPU machine (the device tool runs it in the repo root):
#   1. the tests marked `cuda` (tests/test_cuda.py: no host syncs, bf16/fp16 fused steps, RNG and checkpoints on
#      CUDA, and with two GPUs the CLIP loss and SigLIP ring under NCCL against one process);
#   2. ViT-B/16 training-step throughput and MFU at batch 256, bf16, eager then compiled (bench/gpu_step.py).
#
# That machine's python3 has torch but not every clipforge dependency, and it cannot download: fetch the missing
# wheels here first, into .whl/ (git-ignored), and name it in the run's carry:
#   bash bench/gpu_check.sh --fetch-wheels       (here, once)
#   bash bench/gpu_check.sh                      (there, carry: [".whl"]; results also in $OUT/gpu_check.log)
# Record the printed figures with the date and the GPU in docs/benchmarks (or the README's figures).
set -uo pipefail
cd "$(dirname "$0")/.."
MISSING="open_clip_torch==3.3.0 webdataset==1.0.2 braceexpand omegaconf==2.4.0 ftfy wcwidth
simplejpeg==1.9.0"
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
    python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_cuda.py
    echo "pytest -m cuda exit code: $?"
    python3 bench/gpu_step.py --model ViT-B-16 --batch-size 256 --precision bf16 --steps 20
    python3 bench/gpu_step.py --model ViT-B-16 --batch-size 256 --precision bf16 --steps 20 --compile
} 2>&1 | tee "$log"
