"""Choosing the fastest numerics the hardware supports."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch

_CPU_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}


@cache
def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); emulated bf16 is slow."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return False
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            return bool(_CPU_BF16_FLAGS & set(line.split(":", 1)[1].split()))
    return False


def resolve_precision(precision: str, accelerator: str) -> str:
    """``auto``: bf16 mixed precision where the device runs it natively, else fp16/fp32."""
    if precision != "auto":
        return precision
    use_gpu = accelerator in ("gpu", "cuda") or (
        accelerator == "auto" and torch.cuda.is_available()
    )
    if use_gpu:
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if cpu_has_bf16() else "32-true"
