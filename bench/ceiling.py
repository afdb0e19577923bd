"""How close training comes to the machine's ceiling: fp32 matmul GFLOP/s vs training FLOP/s."""

from __future__ import annotations

import torch

from bench.loops import project_rate
from bench.precision import project_sweep_rate
from bench.report import Section, pct
from bench.timing import BatchClock, rate_of
from bench.workspace import Workspace
from leukemia_mlops.models.backbones import build_classifier
from leukemia_mlops.models.yolo import count_flops

TITLE = "The machine's ceiling: matmul peak vs resnet18 training"
MATMUL_N = 2048
TRAINING_FACTOR = 3  # forward + backward (two matmuls per forward one) per image


def matmul_gflops(ws: Workspace) -> float:
    """Sustained fp32 ``torch.mm`` GFLOP/s on square matrices, all threads."""
    a, b = torch.randn(MATMUL_N, MATMUL_N), torch.randn(MATMUL_N, MATMUL_N)
    out = torch.empty(MATMUL_N, MATMUL_N)
    rate = rate_of(
        lambda: (torch.mm(a, b, out=out), 1)[1], BatchClock(ws.sizes.warmup, ws.sizes.budget_s / 4)
    )
    return 2 * MATMUL_N**3 * rate.per_s / 1e9


def run(ws: Workspace) -> Section:
    peak = matmul_gflops(ws)
    net = build_classifier("resnet18")
    rows, raw = [], {"matmul_gflops": peak}
    for size, batch, rate in (
        (
            ws.image_size,
            ws.defaults.datamodule.batch_size,
            project_rate(ws, "resnet18", ws.image_size),
        ),
        (ws.sizes.sweep_size, ws.sizes.sweep_batch, project_sweep_rate(ws)),
    ):
        gflop = TRAINING_FACTOR * count_flops(net, size) / 1e9
        achieved = gflop * rate.per_s
        label = f"resnet18 training, {size} px, batch {batch}"
        rows.append([label, gflop, rate.per_s, achieved, pct(achieved / peak)])
        raw[label] = {"train_gflop_per_image": gflop, "img_per_s": rate.per_s}
    rows.append([f"torch.mm {MATMUL_N}x{MATMUL_N} fp32", "", "", peak, "100%"])
    return Section(
        TITLE,
        f"Sustained fp32 GFLOP/s of `torch.mm` on {MATMUL_N}x{MATMUL_N} matrices with all "
        f"{torch.get_num_threads()} threads, against the FLOP rate resnet18 training reaches "
        "through the project's path (training FLOPs per image = 3x the forward FLOPs counted "
        "by `FlopCounterMode`; training images/s from the training and precision benchmarks).",
        ["workload", "GFLOP per image", "img/s", "GFLOP/s", "of matmul peak"],
        rows,
        [
            f"resnet18 training reaches {rows[0][-1]} and {rows[1][-1]} of the matmul peak "
            "(no target; convolutions, normalisation, the optimizer and data loading all run "
            "below matmul speed)."
        ],
        raw,
    )
