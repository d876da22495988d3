"""Numeric precision: how fast this machine multiplies in float32 and bf16, and the autocast
context a training step runs under.

    resolve_precision("auto", torch.device("cpu"))   # "bf16" where bf16 products pay (AMX), else "fp32"
    with autocast(device, "bf16"): ...               # nullcontext() for fp32
    matmul_peak("float32")                           # GFLOP/s of a square product (mt-bench's peak)

Its own module so that training and the benchmark both import it, and neither imports the other.
"""
from __future__ import annotations

import logging
import time
from contextlib import nullcontext

import torch

log = logging.getLogger("mt.precision")

# auto picks bf16 only when its products are this much faster: below that, the casts around
# every product and the slower bf16 elementwise work eat the gain
BF16_MIN_SPEEDUP = 1.5


# a peak sample should take about its `seconds` whatever a product costs here: bf16 without AMX
# runs at ~1 GFLOP/s, where the three 1024 x 1024 warm-up products alone would take 6 s
PROBE_N = 256


def _fitting_n(dtype: torch.dtype, seconds: float, n: int) -> int:
    """n, halved while one n x n product is predicted to take over a tenth of `seconds`
    (predicted from a timed PROBE_N product, by the cube of the size)."""
    a = torch.randn(PROBE_N, PROBE_N, dtype=dtype)
    a @ a  # the first call also starts the thread pool and picks kernels: not timed
    t0 = time.perf_counter()
    a @ a
    dt = time.perf_counter() - t0
    while n > 64 and dt * (n / PROBE_N) ** 3 > seconds / 10:
        n //= 2
    return n


def matmul_peak(dtype_name: str, seconds: float = 1.0, n: int = 1024) -> float:
    """GFLOP/s of an n x n matrix product in `dtype_name`, the best of rounds over about
    `seconds`; n is made smaller where a product of that size would not fit many times."""
    dtype = getattr(torch, dtype_name)
    end = time.perf_counter() + seconds  # the probe and warm-up count: the whole call is ~`seconds`
    n = _fitting_n(dtype, seconds, n)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    best = 0.0
    while best == 0.0 or time.perf_counter() < end:
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        best = max(best, 4 * 2 * n ** 3 / (time.perf_counter() - t0) / 1e9)
    return best


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` -> bf16 where bf16 matrix products are faster than float32, else fp32."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    fp32, bf16 = matmul_peak("float32", 0.2, 512), matmul_peak("bfloat16", 0.2, 512)
    choice = "bf16" if bf16 >= BF16_MIN_SPEEDUP * fp32 else "fp32"
    log.info("train.precision=auto: %s (bf16 matmul %.0f GFLOP/s, float32 %.0f)", choice, bf16, fp32)
    return choice


def autocast(device: torch.device, precision: str):
    """The context a training step's forward runs under: none for fp32, else torch.autocast."""
    if precision == "fp32":
        return nullcontext()
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("train.precision=fp16 needs CUDA; use bf16 on CPU")
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
