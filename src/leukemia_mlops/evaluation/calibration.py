"""Temperature scaling of P(ALL): one scalar T fitted on validation, reported on test.

The logit of P(ALL) is divided by T, the value minimising the validation cells' negative
log-likelihood (searched on log T, so T stays positive). T > 1 softens an overconfident model,
T < 1 sharpens a timid one. The test report gives the top-label ECE (the one papers report)
and the Brier score before and after, with the stratified subject-bootstrap intervals of the
other test metrics. Fitting on the test split instead would grade the calibration on the data
that chose it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar

from leukemia_mlops.evaluation.bootstrap import Cells, bootstrap_ci, interval_columns
from leukemia_mlops.evaluation.metrics import (
    ArrayLike,
    UnitWeightCall,
    validated_arrays,
    weighted_binary_metrics,
)
from leukemia_mlops.inference.calibrated import calibrate, logit

#: The search range of T: a model 100x too sharp or too soft is beyond what one scalar repairs.
TEMPERATURE_BOUNDS = (1e-2, 1e2)


def fit_temperature(probs: ArrayLike, labels: ArrayLike) -> float:
    """The T minimising the mean negative log-likelihood of ``labels`` under
    ``calibrate(probs, T)`` (bounded Brent search on log T)."""
    p, y = validated_arrays(probs, labels)
    z = logit(p)

    def nll(log_t: float) -> float:
        s = z / math.exp(log_t)
        return float(np.mean(np.logaddexp(0, s) - y * s))

    low, high = (math.log(bound) for bound in TEMPERATURE_BOUNDS)
    found = minimize_scalar(nll, bounds=(low, high), method="bounded", options={"xatol": 1e-6})
    return math.exp(found.x)


@dataclass(frozen=True)
class CalibrationMetrics(UnitWeightCall):
    """Top-label ECE and Brier score, with the weighted form the bootstrap vectorises."""

    def weighted(
        self, probs: ArrayLike, labels: ArrayLike, weights: np.ndarray
    ) -> dict[str, np.ndarray]:
        p, y = validated_arrays(probs, labels)
        w = np.asarray(weights, dtype=np.float64)
        return {
            "top_label_ece": weighted_binary_metrics(p, y, w)["top_label_ece"],
            "brier": w @ (p - y) ** 2 / w.sum(axis=1),
        }


def calibration_report(
    temperature: float, test: Cells, bootstrap: dict[str, Any]
) -> dict[str, Any]:
    """The ``calibration`` section: T and the test split's ECE and Brier score before and after
    (``test.probs`` raw), each with its subject-bootstrap interval (``bootstrap``: the keyword
    arguments of :func:`bootstrap_ci`)."""
    after = calibrate(test.probs, temperature)
    return {
        "method": "temperature",
        "fitted_on": "validation",
        "temperature": temperature,
        **{
            name: interval_columns(
                bootstrap_ci(probs, test.labels, test.subjects, CalibrationMetrics(), **bootstrap)
            )
            for name, probs in (("before", test.probs), ("after", after))
        },
    }
