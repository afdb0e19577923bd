"""Choosing the fastest numerics the hardware supports natively.

Emulated bf16 is slower than fp32 (CPUs without AVX512-BF16/AMX, GPUs before Ampere), so
``auto`` asks for native support only: ``torch.cuda.is_bf16_supported()`` counts emulation
by default and allocates a tensor on the current device, which, called by every rank before
Lightning sets each rank's device, would open a CUDA context on GPU 0 from all of them.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

import torch

_CPU_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}
#: Ampere (8.0) and later compute bf16 natively.
_GPU_BF16_CAPABILITY = (8, 0)


def cpu_flags_have_bf16(cpuinfo: str) -> bool:
    """Whether ``/proc/cpuinfo`` text lists native bf16 (AVX512-BF16 or AMX)."""
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return bool(_CPU_BF16_FLAGS & set(line.split(":", 1)[1].split()))
    return False


@cache
def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively."""
    cpuinfo = Path("/proc/cpuinfo")
    return cpuinfo.exists() and cpu_flags_have_bf16(cpuinfo.read_text())


def local_gpu_capability() -> tuple[int, int]:
    """Compute capability of this rank's own GPU, read without creating a CUDA context.

    The rank's device is its local rank (``LOCAL_RANK`` from Lightning's launcher and torchrun,
    ``SLURM_LOCALID`` under srun; 0 for the launching process).
    """
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")))
    return torch.cuda.get_device_capability(local_rank % torch.cuda.device_count())


def choose_precision(gpu_capability: tuple[int, int] | None, cpu_bf16: bool) -> str:
    """``auto`` for a GPU of ``gpu_capability`` (None: a CPU run)."""
    if gpu_capability is not None:
        return "bf16-mixed" if gpu_capability >= _GPU_BF16_CAPABILITY else "16-mixed"
    return "bf16-mixed" if cpu_bf16 else "32-true"


def resolve_precision(precision: str, accelerator: str) -> str:
    """``auto``: bf16 mixed precision where the device runs it natively, else fp16/fp32."""
    if precision != "auto":
        return precision
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return choose_precision(local_gpu_capability(), cpu_bf16=False)
    return choose_precision(None, cpu_has_bf16())
