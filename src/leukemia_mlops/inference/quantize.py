"""INT8 ONNX: static quantization of an exported model, calibrated on training cells.

ONNX Runtime's recipe for x86 CPUs: ``quant_pre_process`` (graph optimisation with ONNX's
shape inference: ONNX Runtime's symbolic one cannot follow the detector's box decoding), then
``quantize_static`` in the QDQ format with per-channel int8 weights and uint8 activations
(U8S8), whose ranges come from a :class:`CellReader` over cells of the *training* split only,
fed exactly as the model's scorer feeds its network. U8S8, not the S8S8 default: ONNX Runtime
1.32 fuses every QDQ convolution and residual add of resnet18 into ``QLinearConv`` and
``QLinearAdd`` only with uint8 activations (S8S8 left 11 of 20 convolutions in float, no
faster than fp32). Without VNNI, U8S8 products can saturate, so weights then use 7 bits
(``reduce_range``); the CPU's VNNI is recorded with the settings. A detector has only its
convolutions quantized: its box decoding (sigmoids, exponentials, the concatenation of three
scales) in int8 ranked test cells at AUROC 0.63 instead of fp32's 0.89; with float decoding
the gap was 0.002.

The parity check against fp32 on the test split is the evaluation's
(``evaluation.int8_parity``), which ``lmo-export --int8`` runs on the model written here.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from leukemia_mlops.data.datamodule import CachedSplit
from leukemia_mlops.data.identity import read_identity
from leukemia_mlops.errors import ConfigError, InputError, MissingInputError
from leukemia_mlops.inference.detection import YoloScorer
from leukemia_mlops.inference.loading import load_scorer, onnx_metadata
from leukemia_mlops.inference.scorers import OnnxScorer, to_network_input

CALIBRATION_SPLIT = "train"
#: Training cells the activation ranges are calibrated on (spread evenly over the split).
CALIBRATION_CELLS = 256
#: CPU flags of the int8 dot-product instructions (VNNI, AMX).
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
#: ONNX metadata keys of the quantization (JSON values).
QUANTIZATION_KEY, CALIBRATION_KEY = "int8_quantization", "int8_calibration"
BATCH = 32


def cpu_has_vnni() -> bool:
    """Whether this CPU has int8 dot-product instructions (``/proc/cpuinfo`` flags)."""
    cpuinfo = Path("/proc/cpuinfo")
    return cpuinfo.exists() and bool(VNNI_FLAGS & set(cpuinfo.read_text().split()))


def quantization_settings(vnni: bool, detector: bool) -> dict[str, Any]:
    """The settings of ``quantize_static`` (ONNX Runtime's names), recorded with the model;
    ``op_types_to_quantize`` None: every type ONNX Runtime quantizes."""
    return {
        "preprocess": "quant_pre_process(skip_symbolic_shape=True)",
        "quant_format": "QDQ",
        "per_channel": True,
        "weight_type": "QInt8",
        "activation_type": "QUInt8",
        "calibrate_method": "MinMax",
        "reduce_range": not vnni,
        "op_types_to_quantize": ["Conv"] if detector else None,
        "cpu_vnni": vnni,
    }


def split_cells(prepared_dir: str | Path, split: str, limit: int | None = None) -> CachedSplit:
    """A split of the prepare cache, required to hold cells; ``limit`` keeps that many rows
    spread evenly over it (deterministic)."""
    cells = CachedSplit(prepared_dir, split)
    if len(cells) == 0:
        raise InputError(f"the {split} split of {prepared_dir} holds no cells")
    if limit is not None and limit < len(cells):
        keep = np.unique(np.linspace(0, len(cells) - 1, limit).astype(np.int64))
        cells.rows, cells.labels = cells.rows[keep], cells.labels[keep]
    return cells


def network_batches(
    scorer: OnnxScorer | YoloScorer, cells: CachedSplit, batch: int = BATCH
) -> Iterator[np.ndarray]:
    """The network inputs of ``cells`` in batches, exactly as ``scorer`` feeds its network
    (a detector's letterboxed first)."""
    for start in range(0, len(cells), batch):
        images = np.asarray(cells.images[cells.rows[start : start + batch]])
        if isinstance(scorer, YoloScorer):
            images = np.stack([scorer.letterbox(image)[0] for image in images])
        yield to_network_input(images)


class CellReader:
    """ONNX Runtime's calibration data reader over batches of network inputs."""

    def __init__(self, input_name: str, batches: Iterator[np.ndarray]):
        self.input_name, self.batches = input_name, batches

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        return None if batch is None else {self.input_name: batch}


def quantize_onnx(
    fp32_path: str | Path,
    out_path: str | Path,
    prepared_dir: str | Path,
    calibration_cells: int | None = None,
) -> dict[str, Any]:
    """Write the INT8 model of the fp32 ONNX export ``fp32_path`` to ``out_path``, its
    metadata the fp32 one's plus the settings and the calibration set, which it returns.
    ``calibration_cells``: None for :data:`CALIBRATION_CELLS`."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    calibration_cells = CALIBRATION_CELLS if calibration_cells is None else calibration_cells
    if calibration_cells < 1:
        raise ConfigError(f"calibration_cells must be >= 1, got {calibration_cells}")
    if not Path(prepared_dir).is_dir():
        raise MissingInputError(f"no prepare cache at {prepared_dir} to calibrate on")
    identity = read_identity(prepared_dir)
    fp32 = load_scorer(fp32_path)
    settings = quantization_settings(cpu_has_vnni(), isinstance(fp32, YoloScorer))
    calibration = split_cells(prepared_dir, CALIBRATION_SPLIT, calibration_cells)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lmo-int8-") as scratch:
        prepared_model = Path(scratch) / "preprocessed.onnx"
        quant_pre_process(str(fp32_path), str(prepared_model), skip_symbolic_shape=True)
        reader = CellReader(fp32.network.input_name, network_batches(fp32, calibration))
        quantize_static(
            str(prepared_model),
            str(out_path),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            weight_type=QuantType.QInt8,
            activation_type=QuantType.QUInt8,
            calibrate_method=CalibrationMethod.MinMax,
            reduce_range=settings["reduce_range"],
            op_types_to_quantize=settings["op_types_to_quantize"],
        )
    calibration_record = {
        "split": CALIBRATION_SPLIT,
        "cells": len(calibration),
        "data_identity": identity.digest,
        "source": identity.source,
    }
    set_metadata(
        out_path,
        {
            **onnx_metadata(fp32_path),
            QUANTIZATION_KEY: json.dumps(settings),
            CALIBRATION_KEY: json.dumps(calibration_record),
        },
    )
    return {"quantization": settings, "calibration": calibration_record}


def set_metadata(path: Path, metadata: dict[str, str]) -> None:
    """Replace an ONNX model's metadata properties with ``metadata``."""
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, metadata)
    onnx.save(model, str(path))
