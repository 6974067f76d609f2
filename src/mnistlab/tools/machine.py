"""The machine a run is measured on: its CPU's name and how fast it multiplies matrices now."""

from __future__ import annotations

import time

import torch

from ..speed import cpu_name, device_name, sync

__all__ = ["cpu_name", "device_name", "fp32_gemm_gflops", "sync"]


def fp32_gemm_gflops(device: torch.device, size: int = 2048, repeats: int = 8) -> float:
    """The fp32 matrix-product rate of `device` right now, in GFLOP/s: a machine-speed probe.

    Timings on a shared machine drift with its load; stored beside them, this says how fast the
    machine was when they were taken.
    """
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    a @ b  # warm-up
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9
