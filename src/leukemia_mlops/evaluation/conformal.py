"""Split-conformal prediction sets, class-conditional (Mondrian), calibrated on validation.

A cell's nonconformity for a class is ``1 - p(class)`` (calibrated probabilities). For each
class the validation cells of that class give the quantile ``q`` of their nonconformity at
the finite-sample rank ``ceil((n + 1)(1 - alpha))`` of n; a test cell's set holds each class
whose nonconformity is at most its ``q`` (``inference.calibrated.prediction_sets``). Under
exchangeability of validation and test cells of a class, a cell of that class has its class
in its set with probability at least ``1 - alpha``: per cell, marginal within each class, not
per patient (cells of one subject are not exchangeable with another subject's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

from leukemia_mlops.errors import ConfigError, InputError
from leukemia_mlops.evaluation.bootstrap import Cells, bootstrap_ci, interval_columns
from leukemia_mlops.evaluation.metrics import (
    ArrayLike,
    UnitWeightCall,
    validated_arrays,
)
from leukemia_mlops.inference.calibrated import prediction_sets
from leukemia_mlops.labels import CLASS_NAMES

GUARANTEE = (
    "per cell, marginal within each class, under exchangeability of validation and test cells; "
    "not per patient"
)


def check_alpha(alpha: float) -> float:
    """``alpha`` as an error level in (0, 1), or a ConfigError."""
    if not 0 < alpha < 1:
        raise ConfigError(f"evaluate.alpha must be in (0, 1), got {alpha}")
    return alpha


def class_quantiles(probs: ArrayLike, labels: ArrayLike, alpha: float) -> dict[str, float]:
    """Each class's nonconformity quantile on these (validation) cells, by class name.

    The rank ``ceil((n + 1)(1 - alpha))`` is computed exactly (``alpha`` as the rational its
    float is); beyond n the class is always in the set (quantile 1, the largest score).
    """
    p, y = validated_arrays(probs, labels)
    level = 1 - Fraction(check_alpha(alpha))
    quantiles = {}
    for label, name in enumerate(CLASS_NAMES):
        scores = np.sort(1 - np.where(y == 1, p, 1 - p)[y == label])
        if scores.size == 0:
            raise InputError(f"no {name} cells to calibrate the conformal sets on")
        rank = math.ceil((scores.size + 1) * level)
        quantiles[name] = float(scores[rank - 1]) if rank <= scores.size else 1.0
    return quantiles


@dataclass(frozen=True)
class ConformalMetrics(UnitWeightCall):
    """Coverage of each class (its cells whose set holds it), the abstention rate (sets of both
    classes) and the empty rate, with the weighted form the bootstrap vectorises."""

    quantiles: dict[str, float]

    def weighted(
        self, probs: ArrayLike, labels: ArrayLike, weights: np.ndarray
    ) -> dict[str, np.ndarray]:
        p, y = validated_arrays(probs, labels)
        w = np.asarray(weights, dtype=np.float64)
        members = prediction_sets(p, self.quantiles)
        covered = members[np.arange(y.size), y]
        size = members.sum(axis=1)
        total = w.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):  # a class without cells: NaN
            rates = {
                f"coverage_{name}": w @ (covered & (y == label)) / (w @ (y == label))
                for label, name in enumerate(CLASS_NAMES)
            }
        return {
            **rates,
            "abstention_rate": w @ (size == 2) / total,
            "empty_rate": w @ (size == 0) / total,
        }


def conformal_report(
    val: Cells, test: Cells, alpha: float, bootstrap: dict[str, Any]
) -> dict[str, Any]:
    """The ``conformal`` section: quantiles from the validation cells, the test cells' coverage
    per class and abstention rate with subject-bootstrap intervals (probabilities calibrated)."""
    quantiles = class_quantiles(val.probs, val.labels, alpha)
    metric = ConformalMetrics(quantiles)
    intervals = bootstrap_ci(test.probs, test.labels, test.subjects, metric, **bootstrap)
    return {
        "alpha": alpha,
        "mondrian": True,
        "fitted_on": "validation",
        "quantile": quantiles,
        **interval_columns(intervals),
        "guarantee": GUARANTEE,
    }
