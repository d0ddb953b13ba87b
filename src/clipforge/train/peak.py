"""The peak a run's MFU is measured against: a known accelerator's dense peak, ``logging.peak_tflops``, or on a CPU
this machine's own matrix-multiply throughput, measured once by a GEMM probe and cached.

Datasheet peaks are dense (no 2:4 sparsity), per device, for the precision the matmuls run in: bf16/fp16 autocast;
fp32 runs use TF32 tensor cores when ``train.tf32`` (the default on CUDA), plain fp32 otherwise. A GPU missing
from the table has no MFU unless ``logging.peak_tflops`` gives its peak.

A CPU has no datasheet figure worth trusting (cores, clocks, AVX-512 and what else runs on the machine all
count), so its peak is measured: the best of a few square matmuls at the run's dtype and thread count (``probe``).
The figure is cached in ``$XDG_CACHE_HOME/clipforge/peak_tflops.json`` (default ``~/.cache``), keyed by CPU model,
dtype, threads and torch version; MFU on a CPU then says what fraction of this machine's own matmul throughput the
training step reaches. On a machine shared with other work a probe measures that work too, so every run probes
again briefly (~0.1 s) and the cache keeps the highest figure seen: a busy moment never lowers the peak, and a
first probe taken while the machine was busy is replaced by the first quiet one.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path

import torch

log = logging.getLogger("clipforge.train")

# TFLOP/s, dense. bf16 and fp16 tensor cores; tf32 tensor cores; fp32 CUDA cores (NVIDIA datasheets).
GPU_PEAKS = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "tf32": 494.7, "fp32": 66.9},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2},
    "H100 NVL": {"bf16": 835.0, "fp16": 835.0, "tf32": 417.5, "fp32": 60.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "tf32": 494.7, "fp32": 66.9},  # SXM
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "L40S": {"bf16": 362.1, "fp16": 362.1, "tf32": 183.0, "fp32": 91.6},
}
PROBE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def matmul_precision(precision: str, tf32: bool) -> str:
    """The precision the step's matmuls run in: the autocast dtype, or tf32/fp32 for an fp32 run."""
    if precision != "fp32":
        return precision
    return "tf32" if tf32 else "fp32"


def gpu_peak_tflops(device_name: str, precision: str) -> float | None:
    """The table's dense peak for a CUDA device name (``torch.cuda.get_device_name``), or None if unknown."""
    for chip, peaks in GPU_PEAKS.items():  # the more specific names (H100 PCIe) come before H100
        if chip in device_name:
            return peaks[precision]
    return None


def peak_tflops(device: str, precision: str, tf32: bool = True, configured: float | None = None) -> tuple[float, str]:
    """(peak TFLOP/s per device, where it came from) for MFU; (0.0, reason) when there is none."""
    if configured:
        return configured, "logging.peak_tflops"
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
        used = matmul_precision(precision, tf32)
        peak = gpu_peak_tflops(name, used)
        if peak is None:
            return 0.0, f"{name} is not in clipforge.train.peak.GPU_PEAKS: set logging.peak_tflops for MFU"
        return peak, f"{name} datasheet, {used} dense"
    return cached_cpu_peak(precision), f"GEMM probe of this CPU, {precision}, {torch.get_num_threads()} threads"


def cache_file() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "clipforge" / "peak_tflops.json"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cached_cpu_peak(precision: str) -> float:
    """This CPU's measured matmul peak at ``precision`` and the current thread count, probed once and cached."""
    threads = torch.get_num_threads()
    key = f"{cpu_name()} | {os.cpu_count()} cpus | {precision} | {threads} threads | torch {torch.__version__}"
    path = cache_file()
    try:
        cached = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        cached = {}
    if key in cached:  # a short probe every run: the cache keeps the best seen, so a busy moment cannot lower it
        known = float(cached[key]["tflops"])
        tflops = probe(PROBE_DTYPES[precision], seconds=0.05, trials=2)
        if tflops <= known:
            return known
    else:
        tflops = probe(PROBE_DTYPES[precision])
    log.info("GEMM probe: %.3f TFLOP/s (%s); cached in %s", tflops, key, path)
    cached[key] = {"tflops": tflops, "measured": time.strftime("%Y-%m-%d %H:%M")}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(cached, indent=1) + "\n")
        temporary.replace(path)  # concurrent ranks or runs: the last complete file wins
    except OSError as exc:
        log.warning("could not cache the GEMM probe in %s: %s", path, exc)
    return tflops


def probe(dtype: torch.dtype = torch.float32, size: int = 1024, seconds: float = 0.3, trials: int = 3) -> float:
    """Dense matmul TFLOP/s on the CPU: the best of ``trials`` runs of ``size``² × ``size``² products, each at
    least ``seconds`` long, after one warm-up product."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(dtype)
    b = torch.randn(size, size, generator=generator).to(dtype)
    torch.mm(a, b)
    best = 0.0
    for _ in range(trials):
        count, started = 0, time.perf_counter()
        while True:
            torch.mm(a, b)
            count += 1
            elapsed = time.perf_counter() - started
            if elapsed >= seconds:
                break
        best = max(best, 2 * size**3 * count / elapsed / 1e12)
    return best
