"""The device's matmul peak, measured: the denominator of every MFU this package reports.

A published peak (e.g. 989 TFLOP/s for an H100 SXM at bf16) is rarely reached even by a
bare matmul (clocks, power, a PCIe card), so MFU against it mixes the step's efficiency
with the card's. Timing a large matmul in the same run measures what this device delivers.
"""

from __future__ import annotations

import time

import torch

# (dtype, side of the square matrices): large bf16 on a GPU, fp32 at a size a CPU
# finishes in milliseconds
SETTINGS = {"cuda": (torch.bfloat16, 8192), "cpu": (torch.float32, 1024)}


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so a host clock measures them (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: str | torch.device, repeats: int = 20, warmup: int = 3) -> dict:
    """FLOP/s of ``repeats`` back-to-back (n x n) @ (n x n) matmuls on ``device``."""
    device = torch.device(device)
    dtype, n = SETTINGS[device.type]
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(warmup):
        a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    seconds = time.perf_counter() - start
    return {
        "flops_per_s": 2 * n**3 * repeats / seconds,
        "dtype": str(dtype).removeprefix("torch."),
        "size": n,
        "repeats": repeats,
    }
