"""A model's raw P(ALL) made calibrated, and the conformal prediction set of each cell.

The evaluate stage fits both on the validation split (``evaluation.calibration`` and
``evaluation.conformal``); ``predict`` applies them with what it finds beside the validated
threshold. Temperature scaling divides the logit of P(ALL) by one number T, which is monotone:
the ranking (AUROC) is unchanged and a threshold on raw P(ALL) maps to
``calibrate(threshold, T)`` on the calibrated one (:func:`calibrated_threshold`).

A conformal set holds each class whose nonconformity ``1 - p(class)`` is at most that class's
quantile: ``ALL``, ``HEM``, ``ALL+HEM`` (abstain: both are plausible at the error level) or
``none``, the empty set (neither is: P(ALL) lies between the two classes' typical validation
scores, which happens when both quantiles are small, i.e. a model sure of most validation
cells; no answer either).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from leukemia_mlops.errors import InputError
from leukemia_mlops.labels import ALL, CLASS_NAMES, HEM

#: Probabilities are kept this far from 0 and 1 before the logit, so that a saturated float32
#: P(ALL) of exactly 1.0 still has a finite log-odds.
EPS = 1e-12
#: A prediction set's name by its (HEM in it, ALL in it) membership; ``none``: the empty set.
SET_NAMES = {
    (False, True): CLASS_NAMES[ALL],
    (True, False): CLASS_NAMES[HEM],
    (True, True): f"{CLASS_NAMES[ALL]}+{CLASS_NAMES[HEM]}",
    (False, False): "none",
}


def logit(probs: np.ndarray) -> np.ndarray:
    """log(p / (1 - p)) in float64, p clipped to [EPS, 1 - EPS]."""
    p = np.clip(np.asarray(probs, dtype=np.float64), EPS, 1 - EPS)
    return np.log(p) - np.log1p(-p)


def calibrate(probs: np.ndarray, temperature: float) -> np.ndarray:
    """P(ALL) with its logit divided by ``temperature`` (NaN stays NaN: a cell not scored)."""
    check_temperature(temperature, "temperature")
    return 1 / (1 + np.exp(-logit(probs) / temperature))


def calibrated_threshold(threshold: float, temperature: float) -> float:
    """A threshold on raw P(ALL) as the same decision on calibrated P(ALL)."""
    return float(calibrate(np.array([threshold]), temperature)[0])


def check_temperature(value: object, where: str) -> float:
    """``value`` as a temperature (a finite number > 0), or an InputError naming ``where``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < np.inf:
        raise InputError(f"{where} holds no valid temperature (got {value!r})")
    return float(value)


def prediction_sets(probs: np.ndarray, quantiles: Mapping[str, float]) -> np.ndarray:
    """``(n, 2)`` membership, columns in label order (HEM, ALL): a class is in a cell's set when
    ``1 - p(class) <= quantiles[class name]``; ``probs`` are calibrated P(ALL)."""
    p = np.asarray(probs, dtype=np.float64)
    # 1 - p(HEM) is p itself.
    return np.stack([p <= quantiles[CLASS_NAMES[HEM]], 1 - p <= quantiles[CLASS_NAMES[ALL]]], 1)


def set_names(members: np.ndarray) -> list[str]:
    """Each row of :func:`prediction_sets` by name (:data:`SET_NAMES`)."""
    return [SET_NAMES[(bool(hem), bool(all_))] for hem, all_ in members]


class Calibration(NamedTuple):
    """What the evaluate stage fitted on validation for a model: its temperature and, where
    known, its conformal quantiles by class name (None: no sets)."""

    temperature: float
    quantiles: dict[str, float] | None = None

    def probs(self, raw: np.ndarray) -> np.ndarray:
        """Calibrated P(ALL) of the model's raw P(ALL)."""
        return calibrate(raw, self.temperature)

    def sets(self, calibrated: np.ndarray) -> list[str]:
        """Each cell's conformal set by name ("" where its P(ALL) is NaN, or without quantiles)."""
        p = np.asarray(calibrated, dtype=np.float64)
        if self.quantiles is None:
            return [""] * p.size
        names = set_names(prediction_sets(p, self.quantiles))
        return ["" if np.isnan(value) else name for value, name in zip(p, names, strict=True)]
