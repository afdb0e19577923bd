"""``predict`` from file to answer vs the network alone, at the same batch: what bounds a
slide's worth of cells, decoding or the network.

Three rates over the same synthetic 450 px BMP cells, for the PyTorch scorer of a checkpoint
and for the INT8 ONNX model: the network alone on the prepared cells (batches of 64 already in
memory), decoding alone (``decode_file``, as predict's loader runs it, in one process), and
``predict_paths`` end to end with its default loader (one decoding process beside the scoring
one), once over half the files and once over all: the whole run's rate, start included, and
the steady rate from the difference (the loader process's start cancels out). Decoding's
share is its part of the serial work per cell,
``(1 / decode rate) / (1 / decode rate + 1 / network rate)``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from bench.inference import export
from bench.report import Section, pct, verdict
from bench.timing import stopwatch
from bench.workspace import Workspace
from leukemia_mlops.data.datamodule import CachedSplit
from leukemia_mlops.data.prepare import PrepareSpec, decode_file
from leukemia_mlops.inference.predict import predict_paths
from leukemia_mlops.inference.quantize import quantize_onnx
from leukemia_mlops.inference.scorers import OnnxScorer, Scorer, TorchScorer
from leukemia_mlops.models.backbones import build_classifier

TITLE = "predict end to end vs the network alone"
BATCH = 64
#: predict's default loader processes (``lmo-predict --workers``).
DEFAULT_WORKERS = 1
#: End-to-end throughput as a share of the network's: the target.
TARGET = 0.70
#: Files per pass, and rounds (network, then predict) whose medians the table gives.
FILES, ROUNDS = 256, 3


def run(ws: Workspace) -> Section:
    size = ws.image_size
    n_images = ws.sizes.predict_images[0]
    prepared = ws.prepared(ws.synthetic_spec(n_images), size)
    raw = ws.raw(ws.synthetic_spec(n_images))
    cells = CachedSplit(prepared, "train")
    files = [raw / path for path in cells.paths[:FILES]]
    images = np.asarray(cells.images[cells.rows[:FILES]])
    scorers = _scorers(ws, prepared, size)
    spec = PrepareSpec(image_size=size)
    _, decode_s = stopwatch(lambda: [decode_file(path, spec) for path in files])
    decode_rate = len(files) / decode_s
    rows, readings, raw_figures = [], [], {"decode_per_s": decode_rate, "files": len(files)}
    rounds = 1 if ws.sizes.quick else ROUNDS
    for name, scorer in scorers.items():
        measured = [_round(ws, scorer, files, images, size) for _ in range(rounds)]
        network_rate, whole_rate, steady_rate = np.median(measured, axis=0).tolist()
        share = (1 / decode_rate) / (1 / decode_rate + 1 / network_rate)
        ratio = steady_rate / network_rate
        rows.append([name, network_rate, decode_rate, whole_rate, steady_rate, ratio, pct(share)])
        readings.append(
            verdict(f"{name}: steady end to end vs network alone", 100 * ratio, 100 * TARGET, "%")
            + f"; decoding is {pct(share)} of the serial work per cell"
            + _bound(network_rate, decode_rate)
        )
        raw_figures[name] = {"rounds (network, end to end, steady img/s)": measured}
    return Section(
        TITLE,
        f"{len(files)} synthetic 450 px BMP cells at {size} px, batches of {BATCH}, all "
        f"{torch.get_num_threads()} threads. Network alone: the scorer on the prepared cells "
        "(already in memory). Decoding alone: `decode_file` (read, decode, cell box, window, "
        f"downscale) in one process. End to end: `predict_paths` with {DEFAULT_WORKERS} loader "
        "process (predict's default), CSV written: over all files (start included), and "
        "steady (all files less half of them, the start cancelled out). The three run back to "
        f"back in {rounds} round(s); medians. Untrained weights: speed does not depend on them.",
        [
            "model",
            "network img/s",
            "decode img/s (1 process)",
            "predict end to end img/s",
            "predict steady img/s",
            "steady / network",
            "decode share",
        ],
        rows,
        readings,
        raw_figures,
    )


def _scorers(ws: Workspace, prepared: Path, size: int) -> dict[str, Scorer]:
    """The PyTorch scorer of an untrained resnet18 and its INT8 ONNX model."""
    net = build_classifier("resnet18")
    fp32, int8 = ws.root / "predict-fp32.onnx", ws.root / "predict.int8.onnx"
    export(net.eval(), size, str(fp32))
    quantize_onnx(fp32, int8, prepared)
    return {"PyTorch (.ckpt)": TorchScorer(net, device="cpu"), "INT8 ONNX": OnnxScorer(int8)}


def _round(
    ws: Workspace, scorer: Scorer, files: list[Path], images: np.ndarray, size: int
) -> tuple[float, float, float]:
    """One round, back to back: the network's img/s, predict's over all files (start
    included), and predict's steady img/s (all files less half of them)."""
    network = _network_rate(scorer, images)
    half, whole = (
        _predict_seconds(ws, scorer, files[:n], size) for n in (len(files) // 2, len(files))
    )
    return network, len(files) / whole, (len(files) - len(files) // 2) / (whole - half)


def _predict_seconds(ws: Workspace, scorer: Scorer, files: list[Path], size: int) -> float:
    """Wall seconds of ``predict_paths`` over ``files`` with the default loader."""
    out = ws.scratch("predict") / "predictions.csv"
    _, seconds = stopwatch(
        lambda: predict_paths(
            scorer, files, out, image_size=size, batch_size=BATCH, workers=DEFAULT_WORKERS
        )
    )
    return seconds


def _network_rate(scorer: Scorer, images: np.ndarray) -> float:
    """Images/s of ``scorer`` over ``images`` in batches of :data:`BATCH` (one warm-up batch)."""
    scorer(images[:BATCH])
    start = time.perf_counter()
    for first in range(0, len(images), BATCH):
        scorer(images[first : first + BATCH])
    return len(images) / (time.perf_counter() - start)


def _bound(network: float, decode: float) -> str:
    """What bounds the end-to-end rate, in words."""
    if decode < network:
        return (
            f"; one decoding process ({decode:,.0f} img/s) is slower than the network "
            f"({network:,.0f} img/s): decoding bounds it (more `--workers` on more cores)"
        )
    return (
        f"; both share {torch.get_num_threads()} cores: the network's threads and the decoding "
        "process compete for them"
    )
