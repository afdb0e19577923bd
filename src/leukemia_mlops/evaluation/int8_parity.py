"""Whether an INT8 model scores as its fp32 export does: test weighted F1 and AUROC.

Both ONNX models score every cell of the prepare cache's *test* split, and the project's metric
functions (:func:`~.metrics.binary_metrics`, weighted F1 at the model's validated threshold,
else 0.5) must agree within :data:`INT8_TOLERANCE`; the share of cells both label alike at that
threshold is reported beside them. The figures go into the INT8 model's
metadata (``int8_parity``, ``int8_parity_ok``) and the log. A model that misses is kept,
flagged ``int8_parity_ok`` false and logged as a warning: never silently.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from leukemia_mlops.errors import ConfigError
from leukemia_mlops.evaluation.metrics import binary_metrics
from leukemia_mlops.inference.loading import ONNX_THRESHOLD_KEY, load_scorer, onnx_metadata
from leukemia_mlops.inference.predict import FALLBACK_THRESHOLD
from leukemia_mlops.inference.quantize import BATCH, quantize_onnx, set_metadata, split_cells
from leukemia_mlops.inference.scorers import Scorer

log = logging.getLogger(__name__)

PARITY_SPLIT = "test"
#: The largest difference of test weighted F1 and of test AUROC allowed between fp32 and INT8.
INT8_TOLERANCE = 0.01
#: ONNX metadata keys of the parity check (JSON values).
PARITY_KEY, PARITY_OK_KEY = "int8_parity", "int8_parity_ok"


@dataclass(frozen=True)
class Parity:
    """fp32 vs INT8 on the parity split: each metric's two values, and the tolerance."""

    split: str
    cells: int
    threshold: float
    f1_weighted_fp32: float
    f1_weighted_int8: float
    auroc_fp32: float
    auroc_int8: float
    tolerance: float
    label_agreement: float  # share of cells both call alike at the threshold (reported only)

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


def export_int8(
    fp32_path: str | Path,
    out_path: str | Path,
    prepared_dir: str | Path,
    calibration_cells: int | None = None,
    tolerance: float = INT8_TOLERANCE,
) -> dict[str, Any]:
    """``lmo-export --int8`` after the fp32 export: quantize (``inference.quantize``), check
    parity, record it; returns the settings, the calibration set and the parity."""
    if not 0 <= tolerance < 1:
        raise ConfigError(f"tolerance must be in [0, 1), got {tolerance}")
    quantized = quantize_onnx(fp32_path, out_path, prepared_dir, calibration_cells)
    parity = check_parity(fp32_path, out_path, prepared_dir, tolerance)
    return {
        "path": str(out_path),
        **quantized,
        "parity": parity.as_dict(),
        "parity_ok": parity.ok,
    }


def check_parity(
    fp32_path: str | Path, int8_path: str | Path, prepared_dir: str | Path, tolerance: float
) -> Parity:
    """Measure :class:`Parity` on the test split, write it into the INT8 model's metadata and
    log it (a warning where it misses)."""
    parity = measure_parity(fp32_path, int8_path, prepared_dir, tolerance)
    held = onnx_metadata(int8_path)
    set_metadata(
        Path(int8_path),
        {**held, PARITY_KEY: json.dumps(parity.as_dict()), PARITY_OK_KEY: json.dumps(parity.ok)},
    )
    _log(Path(int8_path), parity)
    return parity


def measure_parity(
    fp32_path: str | Path, int8_path: str | Path, prepared_dir: str | Path, tolerance: float
) -> Parity:
    """Test weighted F1 (at the validated threshold, else 0.5) and AUROC of both models."""
    cells = split_cells(prepared_dir, PARITY_SPLIT)
    known = onnx_metadata(fp32_path).get(ONNX_THRESHOLD_KEY)
    threshold = FALLBACK_THRESHOLD if known is None else float(known)
    scores, calls = {}, {}
    for name, path in (("fp32", fp32_path), ("int8", int8_path)):
        scorer: Scorer = load_scorer(path)
        starts = range(0, len(cells), BATCH)
        batches = (np.asarray(cells.images[cells.rows[s : s + BATCH]]) for s in starts)
        probs = np.concatenate([scorer(batch) for batch in batches])
        scores[name] = binary_metrics(probs, cells.labels, threshold)
        calls[name] = probs > threshold
    return Parity(
        PARITY_SPLIT,
        len(cells),
        threshold,
        scores["fp32"]["f1_weighted"],
        scores["int8"]["f1_weighted"],
        scores["fp32"]["auroc"],
        scores["int8"]["auroc"],
        tolerance,
        float((calls["fp32"] == calls["int8"]).mean()),
    )


def _log(path: Path, parity: Parity) -> None:
    gaps = (
        f"test weighted F1 {parity.f1_weighted_fp32:.4f} -> {parity.f1_weighted_int8:.4f}, "
        f"AUROC {parity.auroc_fp32:.4f} -> {parity.auroc_int8:.4f} on {parity.cells} cells, "
        f"{parity.label_agreement:.1%} of them labelled alike"
    )
    if parity.ok:
        log.info("INT8 parity within %s: %s (%s)", parity.tolerance, gaps, path)
        return
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
