"""Loader capacity: images/s the training loader alone delivers, per worker and in total.

Both augmentation paths at 128 and 224 px, beside each CNN's training rate measured in the same
run, and projected to a 16-core machine feeding one GPU. With ``augment_on: device`` the loader
only gathers uint8 batches from the memory-mapped cache; the augmentation then runs on the
training device, timed here on this machine's device as its own row.
"""

from __future__ import annotations

import os

import torch

from bench.feed import augment_rate, loader_capacity
from bench.loops import project_rate
from bench.report import Section, verdict
from bench.timing import BatchClock
from bench.workspace import Workspace

TITLE = "Loader capacity: both augmentation paths, per worker, vs training"
SIZES = (128, 224)
MODELS = ("resnet18", "efficientnet_b0")
PATHS = ("cpu", "device")
TARGET = 3.0  # device-path loader vs the fastest model's training rate at 224 px
PROJECTED_CORES = 16  # one rank; one core of its share stays with the training process
#: A published one-GPU training rate (224 px, mixed precision), and ResNet-18's FLOP share.
PUBLISHED = {
    "source": "NVIDIA DeepLearningExamples, PyTorch/Classification/ConvNets/resnet50v1.5/"
    "README.md, 'Training performance: NVIDIA DGX A100 (8x A100 80GB)', 1 GPU",
    "model": "ResNet-50 v1.5, 1x A100 80GB, mixed precision",
    "img_per_s": 2470.0,
    "resnet18_factor": 4.1 / 1.8,  # ResNet-50 / ResNet-18 GFLOPs per 224 px image
}


def worker_counts(quick: bool) -> tuple[int, ...]:
    """1 worker and one per core of this machine (only 1 in quick mode)."""
    return (1,) if quick else tuple(sorted({1, os.cpu_count() or 1}))


def gpu_resnet18(size: int) -> float:
    """The published GPU rate scaled to ResNet-18 at ``size`` px (FLOPs go with the pixels)."""
    return PUBLISHED["img_per_s"] * PUBLISHED["resnet18_factor"] * (224 / size) ** 2


def projection(per_worker: float, size: int) -> tuple[float, float]:
    """(img/s of a 16-core loader, its multiple of the published GPU rate for ResNet-18)."""
    total = per_worker * (PROJECTED_CORES - 1)
    return total, total / gpu_resnet18(size)


def size_rows(ws: Workspace, size: int, device: str) -> tuple[list[list], dict, list[str]]:
    """Loader rows of both paths and every worker count, then the augmentation and training
    rows, at ``size``; the raw figures; verdicts for the device path."""
    training = {model: project_rate(ws, model, size).per_s for model in MODELS}
    prepared, batch = ws.prepared(ws.train_spec, size), int(ws.defaults.datamodule.batch_size)

    def clock() -> BatchClock:
        return BatchClock(ws.sizes.warmup, ws.sizes.budget_s)

    fastest = max(training.values())
    rows, raw, readings = [], {f"{size}/training": training}, []
    for path in PATHS:
        for workers in worker_counts(ws.sizes.quick):
            total = loader_capacity(prepared, batch, path, workers, clock()).per_s
            projected, vs_gpu = projection(total / workers, size)
            rows.append(
                [size, path, workers, total, total / workers, total / fastest, projected, vs_gpu]
            )
            raw[f"{size}/{path}/{workers}"] = {"img_per_s": total, "vs_training": total / fastest}
            if path == "device":
                label = f"{size} px, device path, {workers} worker(s) vs fastest training"
                readings.append(verdict(label, total / fastest, TARGET))
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    augment = augment_rate(size, batch, device, clock(), sync).per_s
    raw[f"{size}/augment_{device}"] = augment
    rows.append([size, f"augmentation on {device}", "", augment, "", augment / fastest, "", ""])
    for model, rate in training.items():
        rows.append([size, f"{model} training", "", rate, "", rate / fastest, "", ""])
    return rows, raw, readings


def run(ws: Workspace) -> Section:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows, raw, readings = [], {}, []
    for size in (ws.image_size,) if ws.sizes.quick else SIZES:
        more_rows, more_raw, more_readings = size_rows(ws, size, device)
        rows, readings = rows + more_rows, readings + more_readings
        raw |= more_raw
    gpu = gpu_resnet18(224)
    readings.append(
        f"Projection: a {PROJECTED_CORES}-core machine runs {PROJECTED_CORES - 1} workers at this "
        f"machine's per-worker rate (linear in cores, a guess: memory bandwidth and a faster or "
        f"slower core move it). GPU reference: {PUBLISHED['model']} trains "
        f"{PUBLISHED['img_per_s']:,.0f} img/s ({PUBLISHED['source']}); ResNet-18 at its FLOP "
        f"ratio ({PUBLISHED['resnet18_factor']:.2f}x fewer) would take about {gpu:,.0f} img/s "
        "at 224 px, and (224 / px)^2 times that at a smaller size."
    )
    batch = int(ws.defaults.datamodule.batch_size)
    return Section(
        TITLE,
        f"Images/s of `CellDataModule.train_dataloader()` alone (batch {batch}, shuffled, "
        "seeded), timed after warm-up: `augment_on=cpu` runs albumentations per item in the "
        "workers; `augment_on=device` gathers uint8 batches from the memory-mapped cache and "
        "leaves the augmentation to the training device (its own row: `BatchAugment` on this "
        "machine's device, which is the CPU when no GPU is present). Training rates: the "
        "project's Lightning path (configured loader and precision) in the same run. "
        "*vs training*: multiple of the fastest model's rate at that size.",
        [
            "px",
            "path",
            "workers",
            "img/s",
            "img/s per worker",
            "vs training",
            f"{PROJECTED_CORES}-core projection",
            "vs GPU (ResNet-18 est.)",
        ],
        rows,
        readings,
        {**raw, "published": PUBLISHED},
    )
