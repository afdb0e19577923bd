"""How close training comes to the machine's ceiling: a roofline per precision.

The matmul peak is measured in every precision the device runs natively (fp32 always; bf16
where the CPU has AVX512-BF16/AMX or the GPU is Ampere or later; TF32 and fp16 on CUDA GPUs),
and each training row is compared with the peak of the precision it trains in: a bf16 rate
over the fp32 peak would read as more than 100%. On a CPU the peak of a precision is the
faster of ``torch.mm`` and a dense 3x3 convolution: the two run in different libraries (MKL's
matmul takes its AVX2 path on AMD CPUs while oneDNN's convolutions use AVX-512), and a peak
below what the models' own convolutions reach would put them above 100%.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from bench.loops import build, model_overrides, precision_of, project_rate
from bench.machine import cpu_flags
from bench.precision import project_sweep_rate, sweep_overrides
from bench.report import Section, pct
from bench.timing import BatchClock, rate_of
from bench.workspace import Workspace
from leukemia_mlops.models.yolo import count_flops
from leukemia_mlops.training.mixed_precision import choose_precision, cpu_has_bf16

TITLE = "The machine's ceiling: a roofline per precision"
MODELS = ("resnet18", "efficientnet_b0", "yolov3_tiny")
TRAINING_FACTOR = 3  # forward + backward (two matmuls per forward one) per image
#: Matrix side of the peak measurement, and multiplications per timed call, by device type.
MATMUL_N = {"cpu": 2048, "cuda": 8192}
MATMUL_REPEAT = {"cpu": 1, "cuda": 20}
#: (batch, channels, side) of the convolution peak: a mid-network resnet layer's shape.
CONV_SHAPE = (16, 256, 28)
#: Matmul precision of each training precision (the one its convolutions and matmuls run in).
PEAK_OF = {"32-true": "fp32", "bf16-mixed": "bf16", "bf16-true": "bf16", "16-mixed": "fp16"}
DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.half}


def native_precisions(device: str) -> tuple[str, ...]:
    """The matmul precisions ``device`` (``cpu`` or ``cuda``) computes natively."""
    if device == "cpu":
        return ("fp32", "bf16") if cpu_has_bf16() else ("fp32",)
    capability = torch.cuda.get_device_capability()
    ampere = choose_precision(capability, cpu_bf16=False) == "bf16-mixed"
    return ("fp32", "tf32", "fp16", "bf16") if ampere else ("fp32", "fp16")


@contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """fp32 matmuls on TF32 tensor cores while the block runs."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def synchronizer(device: str) -> Callable[[], None]:
    """Waits for the device's queued work (a no-op on the CPU), so that a clock sees it done."""
    return torch.cuda.synchronize if device == "cuda" else lambda: None


def matmul_gflops(precision: str, device: str, warmup: int, budget_s: float) -> float:
    """Sustained ``torch.mm`` GFLOP/s on square matrices in ``precision``, all threads."""
    n, repeat, sync = MATMUL_N[device], MATMUL_REPEAT[device], synchronizer(device)
    a, b = (torch.randn(n, n, device=device, dtype=DTYPES[precision]) for _ in range(2))
    out = torch.empty_like(a)

    def call() -> int:
        for _ in range(repeat):
            torch.mm(a, b, out=out)
        sync()
        return repeat

    with tf32(precision == "tf32"):
        rate = rate_of(call, BatchClock(warmup, budget_s))
    return 2 * n**3 * rate.per_s / 1e9


def conv_gflops(precision: str, warmup: int, budget_s: float) -> float:
    """Sustained GFLOP/s of a dense 3x3 convolution (:data:`CONV_SHAPE`) in ``precision`` on
    the CPU, all threads, inference mode."""
    batch, channels, side = CONV_SHAPE
    dtype = DTYPES[precision]
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False).to(dtype)
    conv = conv.to(memory_format=torch.channels_last)
    images = torch.randn(batch, channels, side, side, dtype=dtype)
    images = images.contiguous(memory_format=torch.channels_last)

    def call() -> int:
        conv(images)
        return 1

    with torch.inference_mode():
        rate = rate_of(call, BatchClock(warmup, budget_s))
    return 2 * batch * channels * channels * 9 * side * side * rate.per_s / 1e9


def dense_peaks(ws: Workspace) -> dict[str, dict[str, float]]:
    """GFLOP/s of ``torch.mm`` and of a 3x3 convolution in each native CPU precision;
    measured once per run."""

    def measure() -> dict[str, dict[str, float]]:
        warmup, budget = ws.sizes.warmup, ws.sizes.budget_s / 4
        return {
            p: {
                "matmul": matmul_gflops(p, "cpu", warmup, budget),
                "conv": conv_gflops(p, warmup, budget),
            }
            for p in native_precisions("cpu")
        }

    return ws.memo(("dense peaks",), measure)


def cpu_peaks(ws: Workspace) -> dict[str, float]:
    """The peak of each native CPU precision: its faster dense kernel."""
    return {p: max(kernels.values()) for p, kernels in dense_peaks(ws).items()}


def roofline_row(label: str, precision: str, gflop: float, per_s: float, peaks: dict) -> list:
    """``label``'s achieved GFLOP/s against the peak of its own precision (none: not native)."""
    peak_name = PEAK_OF.get(precision, precision)
    achieved = gflop * per_s
    peak = peaks.get(peak_name)
    share = pct(achieved / peak) if peak else f"no native {peak_name} peak"
    return [label, precision, gflop, per_s, achieved, peak_name, share]


def run(ws: Workspace) -> Section:
    kernels, peaks = dense_peaks(ws), cpu_peaks(ws)
    size = ws.image_size
    rows, raw = [], {"dense_gflops": kernels, "peak_gflops": peaks, "cpu_flags": cpu_flags()}
    trainings = [
        (
            f"{model} training, {size} px",
            size,
            model_overrides(model, size),
            project_rate(ws, model, size),
        )
        for model in MODELS
    ]
    sweep = ws.sizes.sweep_size
    trainings.append(
        (
            f"resnet18 training, {sweep} px (precision table)",
            sweep,
            sweep_overrides(ws),
            project_sweep_rate(ws),
        )
    )
    for label, px, overrides, rate in trainings:
        cfg = ws.config(ws.prepared(ws.train_spec, px), px, *overrides)
        precision = precision_of(cfg)
        gflop = TRAINING_FACTOR * count_flops(build(cfg)[1].net, px) / 1e9
        rows.append(roofline_row(label, precision, gflop, rate.per_s, peaks))
        raw[label] = {
            "precision": precision,
            "train_gflop_per_image": gflop,
            "img_per_s": rate.per_s,
        }
    n = MATMUL_N["cpu"]
    batch, channels, side = CONV_SHAPE
    names = {"matmul": f"torch.mm {n}x{n}", "conv": f"conv2d 3x3 {channels}ch {side}px x{batch}"}
    rows += [
        [names[kernel], p, "", "", gflops, p, pct(gflops / peaks[p])]
        for p, by_kernel in kernels.items()
        for kernel, gflops in by_kernel.items()
    ]
    return Section(
        TITLE,
        f"Sustained GFLOP/s of `torch.mm` on {n}x{n} matrices and of a dense 3x3 convolution "
        f"({channels} to {channels} channels, {side}x{side} px, batch {batch}, channels-last, "
        f"inference) with all {torch.get_num_threads()} threads in each precision this CPU "
        f"computes natively (CPU flags: {cpu_flags()}; bf16 counts only with AVX512-BF16 or "
        "AMX); a precision's peak is the faster of the two (they run in different libraries: "
        "MKL's matmul, oneDNN's convolution). Against it, the "
        "FLOP rate each model's training reaches through the project's path at its resolved "
        "precision (training FLOPs per image = 3x the forward FLOPs counted by "
        "`FlopCounterMode`; images/s from the training benchmark). Each row is a share of the "
        "peak of its own precision.",
        ["workload", "precision", "GFLOP per image", "img/s", "GFLOP/s", "peak used", "of peak"],
        rows,
        [
            "native precisions here, peak (faster dense kernel): "
            + ", ".join(f"{p} {peak:,.0f} GFLOP/s" for p, peak in peaks.items())
            + ("" if "bf16" in peaks else " (bf16 is emulated on this CPU: no bf16 roofline)"),
            *(
                f"{row[0]} reaches {row[-1]} of the {row[5]} peak (no target; convolutions, "
                "normalisation, the optimizer and data loading run below dense-kernel speed)"
                for row in rows[: len(trainings)]
            ),
        ],
        raw,
    )
