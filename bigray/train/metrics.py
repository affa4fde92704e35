"""Throughput and MFU: peak FLOP/s from a table for known GPUs, measured for CPUs."""

from __future__ import annotations

import time

import torch

# Dense bf16/fp16 tensor-core peaks (FLOP/s) from the vendors' data sheets.
GPU_PEAK_BF16 = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "A10": 125e12,
    "L4": 121e12,
    "V100": 125e12,
    "T4": 65e12,
}


def measure_matmul_peak(dtype: torch.dtype = torch.float32, n: int = 1024, seconds: float = 0.3) -> float:
    """FLOP/s of torch.mm on this CPU with the current thread count (the CPU MFU denominator)."""
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        torch.mm(a, b)
    iters, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        torch.mm(a, b)
        iters += 1
    return 2 * n**3 * iters / (time.perf_counter() - t0)


def peak_flops(device: torch.device, precision: str) -> float:
    """Peak FLOP/s of one worker's device for the training precision (0 if unknown)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAK_BF16.items():
            if key in name:
                return peak if precision in ("bf16", "fp16") else peak / 2  # tf32 runs at half rate
        return 0.0
    return measure_matmul_peak(torch.bfloat16 if precision == "bf16" else torch.float32)
