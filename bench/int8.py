"""INT8 vs fp32 ONNX Runtime vs PyTorch (resnet18), batch 1 and 64, and INT8's parity.

Speed: an untrained resnet18 (speed does not depend on the weights) exported as the project
exports, quantized by ``lmo-export --int8``'s code (``inference.quantize``) with a workspace
prepare cache, all three runtimes taking turns in alternating rounds on the same inputs.
Parity: the trained pipeline model (``models/model``) with the repository's prepare cache, when
both are there; else the section says so.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from bench.inference import export
from bench.machine import cpu_flags
from bench.report import Section, fmt, spread, verdict
from bench.timing import alternating_rounds
from bench.workspace import Workspace
from leukemia_mlops.evaluation.int8_parity import INT8_TOLERANCE, export_int8
from leukemia_mlops.inference.export import export_onnx
from leukemia_mlops.inference.quantize import cpu_has_vnni, quantize_onnx
from leukemia_mlops.models.backbones import build_classifier

TITLE = "INT8 vs fp32 ONNX Runtime vs PyTorch (resnet18)"
REPO = Path(__file__).resolve().parents[1]
TRAINED = REPO / "models/model/checkpoints/best.ckpt"
PREPARED = REPO / "data/prepared"
#: Synthetic images behind the workspace cache the speed model is calibrated on.
CALIBRATION_IMAGES = 200
#: The INT8 / fp32 ONNX target at batch 64 on a VNNI CPU.
TARGET = 2.0


def run(ws: Workspace) -> Section:
    size = ws.image_size
    prepared = ws.prepared(ws.synthetic_spec(CALIBRATION_IMAGES), size)
    net = build_classifier("resnet18").eval()
    fp32_path, int8_path = ws.root / "int8-speed-fp32.onnx", ws.root / "int8-speed.onnx"
    export(net, size, str(fp32_path))
    quantized = quantize_onnx(fp32_path, int8_path, prepared)
    sessions = {
        name: ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for name, path in (("fp32", fp32_path), ("int8", int8_path))
    }
    rows, readings, raw = [], [], {"quantization": quantized["quantization"]}
    rounds, round_s = (2, ws.sizes.budget_s) if ws.sizes.quick else (3, ws.sizes.budget_s / 2)
    for batch in (1, ws.sizes.infer_batches[-1]):
        images = torch.rand(batch, 3, size, size)
        feed = {"images": images.numpy()}

        def torch_call(images: torch.Tensor = images, batch: int = batch) -> int:
            with torch.inference_mode():
                net(images)
            return batch

        calls = {
            "PyTorch": torch_call,
            **{
                name: lambda s=session, f=feed, b=batch: (s.run(None, f), b)[1]
                for name, session in sessions.items()
            },
        }
        rates = alternating_rounds(calls, rounds, round_s)
        int8_vs_fp32 = rates["int8"].median / rates["fp32"].median
        rows.append(
            [
                batch,
                *(spread(r.median, r.low, r.high) for r in rates.values()),
                int8_vs_fp32,
                rates["int8"].median / rates["PyTorch"].median,
                rates["fp32"].median / rates["PyTorch"].median,
            ]
        )
        raw[f"batch {batch}"] = {name: rate.as_dict() for name, rate in rates.items()}
        if batch > 1:
            readings.append(verdict(f"batch {batch}: INT8 vs fp32 ONNX", int8_vs_fp32, TARGET))
    vnni = cpu_has_vnni()
    readings.append(
        f"CPU flags: {cpu_flags()}; VNNI {'present' if vnni else 'absent'} (the target applies "
        f"on a VNNI CPU); quantization: {json.dumps(quantized['quantization'])}"
    )
    parity = _trained_parity(ws)
    raw["parity"] = parity
    readings.append(_parity_reading(parity))
    return Section(
        TITLE,
        f"Images/s of the resnet18 classifier network at {size} px (`data.prepare.image_size`; "
        "quick runs use 64 px), "
        f"all {torch.get_num_threads()} threads, random inputs: PyTorch eval under "
        "`inference_mode` (fp32), the ONNX export run by ONNX Runtime's CPU provider (fp32), "
        "and its INT8 model from `lmo-export --int8`'s code (QDQ, per-channel int8 weights, "
        "uint8 activations, MinMax-calibrated on training cells). Untrained weights: speed does "
        f"not depend on them. The three take turns in {rounds} rounds of {fmt(round_s)} s each; "
        "median (min-max) img/s.",
        [
            "batch",
            "PyTorch img/s",
            "fp32 ONNX img/s",
            "INT8 ONNX img/s",
            "INT8 / fp32 ONNX",
            "INT8 / PyTorch",
            "fp32 ONNX / PyTorch",
        ],
        rows,
        readings,
        raw,
    )


def _trained_parity(ws: Workspace) -> dict | None:
    """INT8 parity of the trained pipeline model on the repository's cache, or None."""
    if not (TRAINED.is_file() and PREPARED.is_dir()):
        return None
    fp32, int8 = ws.root / "trained-fp32.onnx", ws.root / "trained.int8.onnx"
    export_onnx(TRAINED, fp32, None, PREPARED, default_size=int(_cache_size()))
    report = export_int8(fp32, int8, PREPARED)
    return {**report["parity"], "calibration": report["calibration"], "ok": report["parity_ok"]}


def _cache_size() -> int:
    from leukemia_mlops.data.identity import read_identity

    return read_identity(PREPARED).image_size


def _parity_reading(parity: dict | None) -> str:
    if parity is None:
        return (
            f"parity: no trained model here ({TRAINED.relative_to(REPO)} and "
            f"{PREPARED.relative_to(REPO)} are made by `make repro`); not measured"
        )
    gaps = np.array([parity["f1_gap"], parity["auroc_gap"]])
    return (
        f"parity of the trained `models/model` on {parity['cells']} test cells (calibrated on "
        f"{parity['calibration']['cells']} training cells of data identity "
        f"{parity['calibration']['data_identity'][:12]}): weighted F1 "
        f"{parity['f1_weighted_fp32']:.4f} fp32 vs {parity['f1_weighted_int8']:.4f} INT8, "
        f"AUROC {parity['auroc_fp32']:.4f} vs {parity['auroc_int8']:.4f}, "
        f"{parity['label_agreement']:.1%} of the cells labelled alike; largest gap "
        f"{gaps.max():.4f} (tolerance {INT8_TOLERANCE}): "
        f"**{'met' if parity['ok'] else 'not met'}**"
    )
