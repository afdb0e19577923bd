"""What the benchmarks ran on: CPU, its bf16 support, memory and library versions."""

from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from leukemia_mlops.training.mixed_precision import cpu_has_bf16, resolve_precision

#: SIMD and matrix-unit flags that decide the kernels (and whether bf16 and fp16 are native).
FLAGS = (
    "avx2",
    "fma",
    "avx_vnni",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)
PACKAGES = ("torch", "torchvision", "pytorch-lightning", "onnxruntime", "numpy", "albumentations")
#: Keys that identify the machine; a stored section measured elsewhere is flagged by them.
IDENTITY = ("cpu", "cores")


def _cpuinfo(key: str) -> str:
    path = Path("/proc/cpuinfo")
    lines = path.read_text().splitlines() if path.exists() else []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith(key)), "")


def _mem_total_gib() -> float:
    path = Path("/proc/meminfo")
    if not path.exists():
        return float("nan")
    kib = next(int(line.split()[1]) for line in path.read_text().splitlines() if "MemTotal" in line)
    return kib / 2**20


def cpu_flags() -> str:
    """The CPU flags that decide the SIMD and bf16 kernels, as listed in ``/proc/cpuinfo``."""
    flags = set(_cpuinfo("flags").split())
    return " ".join(f for f in FLAGS if f in flags) or "none"


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:  # a GPU machine carries only what its checks need
        return "not installed"


def describe() -> dict[str, object]:
    """Stable facts about this machine (no load or clock figures)."""
    return {
        "cpu": _cpuinfo("model name") or platform.processor() or "unknown",
        "cores": os.cpu_count() or 1,
        "torch threads": torch.get_num_threads(),
        "memory GiB": round(_mem_total_gib(), 1),
        "CPU flags of interest": cpu_flags(),
        "native bf16 (cpu_has_bf16)": cpu_has_bf16(),
        "torch CPU kernels": torch.backends.cpu.get_cpu_capability(),
        "resolve_precision('auto', 'cpu')": resolve_precision("auto", "cpu"),
        "os": platform.platform(),
        "python": platform.python_version(),
        **{name: _version(name) for name in PACKAGES},
    }


def load_average() -> float:
    """The 1-minute load average: above the core count, other work shared the CPU."""
    return os.getloadavg()[0]
