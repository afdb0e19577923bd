"""INT8 ONNX: static quantization of an exported model, calibrated on training cells and checked
against its fp32 export on test cells.

ONNX Runtime's recipe for x86 CPUs: ``quant_pre_process`` (shape inference and graph
optimisation; ONNX's shape inference, as ONNX Runtime's symbolic one cannot follow the
detector's box decoding), then ``quantize_static`` in the QDQ format with per-channel int8
weights and uint8 activations (U8S8), whose ranges come from a :class:`CellReader` over cells of the
*training* split only, fed exactly as the model's scorer feeds its network. U8S8, not the
S8S8 default: ONNX Runtime 1.32 fuses every QDQ convolution and residual add of resnet18 into
``QLinearConv``/``QLinearAdd`` only with uint8 activations (S8S8 left 11 of 20 convolutions
in float, slower than fp32). Without VNNI, U8S8 products can saturate, so weights then use 7
bits (``reduce_range``); the CPU's VNNI is recorded with the settings. A detector has only its
convolutions quantized: its box decoding (sigmoids, exponentials and the concatenation of
three scales) in int8 ranked test cells at AUROC 0.63 instead of fp32's 0.89; with float
decoding the gap was 0.001. The quantized
model is then scored on the *test* split beside the fp32 one: test weighted F1 (at the model's
validated threshold) and AUROC, through the project's metric functions, must agree within
:data:`INT8_TOLERANCE`. A model that misses is still written, flagged in its metadata
(``int8_parity_ok`` false) and logged as a warning, never silently.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from leukemia_mlops.data.datamodule import CachedSplit
from leukemia_mlops.data.identity import read_identity
from leukemia_mlops.errors import ConfigError, InputError, MissingInputError
from leukemia_mlops.evaluation.metrics import binary_metrics
from leukemia_mlops.inference.detection import YoloScorer
from leukemia_mlops.inference.loading import ONNX_THRESHOLD_KEY, load_scorer, onnx_metadata
from leukemia_mlops.inference.predict import FALLBACK_THRESHOLD
from leukemia_mlops.inference.scorers import OnnxScorer, to_network_input

log = logging.getLogger(__name__)

CALIBRATION_SPLIT, PARITY_SPLIT = "train", "test"
#: The largest difference of test weighted F1 and of test AUROC allowed between fp32 and INT8.
INT8_TOLERANCE = 0.01
#: Training cells the activation ranges are calibrated on (spread evenly over the split).
CALIBRATION_CELLS = 256
#: CPU flags of the int8 dot-product instructions (VNNI, AMX).
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
#: ONNX metadata keys the INT8 export adds (JSON values).
QUANTIZATION_KEY, CALIBRATION_KEY, PARITY_KEY, PARITY_OK_KEY = (
    "int8_quantization",
    "int8_calibration",
    "int8_parity",
    "int8_parity_ok",
)
_BATCH = 32


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


@dataclass(frozen=True)
class Parity:
    """fp32 vs INT8 on the parity split: each metric's two values and their gap."""

    split: str
    cells: int
    threshold: float
    f1_weighted_fp32: float
    f1_weighted_int8: float
    auroc_fp32: float
    auroc_int8: float
    tolerance: float

    @property
    def f1_gap(self) -> float:
        return abs(self.f1_weighted_int8 - self.f1_weighted_fp32)

    @property
    def auroc_gap(self) -> float:
        return abs(self.auroc_int8 - self.auroc_fp32)

    @property
    def ok(self) -> bool:
        """Both gaps within the tolerance (a NaN gap is not)."""
        return bool(self.f1_gap <= self.tolerance and self.auroc_gap <= self.tolerance)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "f1_gap": self.f1_gap, "auroc_gap": self.auroc_gap}


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
    scorer: OnnxScorer | YoloScorer, cells: CachedSplit, batch: int = _BATCH
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
    tolerance: float = INT8_TOLERANCE,
) -> dict[str, Any]:
    """Write the INT8 model of the fp32 ONNX export ``fp32_path`` to ``out_path`` and return
    its report (settings, calibration set, parity); see the module docstring.
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
    if not 0 <= tolerance < 1:
        raise ConfigError(f"tolerance must be in [0, 1), got {tolerance}")
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
    parity = measure_parity(fp32, load_scorer(out_path), prepared_dir, fp32_path, tolerance)
    calibration_record = {
        "split": CALIBRATION_SPLIT,
        "cells": len(calibration),
        "data_identity": identity.digest,
        "source": identity.source,
    }
    metadata = {
        **onnx_metadata(fp32_path),
        QUANTIZATION_KEY: json.dumps(settings),
        CALIBRATION_KEY: json.dumps(calibration_record),
        PARITY_KEY: json.dumps(parity.as_dict()),
        PARITY_OK_KEY: json.dumps(parity.ok),
    }
    _set_metadata(out_path, metadata)
    _log_parity(out_path, parity)
    return {
        "path": str(out_path),
        "fp32": str(fp32_path),
        "quantization": settings,
        "calibration": calibration_record,
        "parity": parity.as_dict(),
        "parity_ok": parity.ok,
    }


def measure_parity(
    fp32: OnnxScorer | YoloScorer,
    int8: OnnxScorer | YoloScorer,
    prepared_dir: str | Path,
    fp32_path: str | Path,
    tolerance: float,
) -> Parity:
    """Test weighted F1 (at the model's validated threshold, else 0.5) and AUROC of both."""
    cells = split_cells(prepared_dir, PARITY_SPLIT)
    known = onnx_metadata(fp32_path).get(ONNX_THRESHOLD_KEY)
    threshold = FALLBACK_THRESHOLD if known is None else float(known)
    scores = {}
    for name, scorer in (("fp32", fp32), ("int8", int8)):
        starts = range(0, len(cells), _BATCH)
        batches = (np.asarray(cells.images[cells.rows[s : s + _BATCH]]) for s in starts)
        probs = np.concatenate([scorer(batch) for batch in batches])
        scores[name] = binary_metrics(probs, cells.labels, threshold)
    return Parity(
        PARITY_SPLIT,
        len(cells),
        threshold,
        scores["fp32"]["f1_weighted"],
        scores["int8"]["f1_weighted"],
        scores["fp32"]["auroc"],
        scores["int8"]["auroc"],
        tolerance,
    )


def _set_metadata(path: Path, metadata: dict[str, str]) -> None:
    import onnx

    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, metadata)
    onnx.save(model, str(path))


def _log_parity(path: Path, parity: Parity) -> None:
    gaps = (
        f"test weighted F1 {parity.f1_weighted_fp32:.4f} -> {parity.f1_weighted_int8:.4f}, "
        f"AUROC {parity.auroc_fp32:.4f} -> {parity.auroc_int8:.4f} on {parity.cells} cells"
    )
    if parity.ok:
        log.info("INT8 parity within %s: %s (%s)", parity.tolerance, gaps, path)
    else:
        log.warning(
            "INT8 model misses parity (F1 gap %.4f, AUROC gap %.4f > %s): %s; written anyway, "
            "flagged %s=false: %s",
            parity.f1_gap,
            parity.auroc_gap,
            parity.tolerance,
            gaps,
            PARITY_OK_KEY,
            path,
        )
