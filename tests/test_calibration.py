"""Temperature scaling: it recovers a planted temperature, and it is fitted on validation."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from leukemia_mlops.errors import InputError
from leukemia_mlops.evaluation.bootstrap import Cells
from leukemia_mlops.evaluation.calibration import (
    CalibrationMetrics,
    calibration_report,
    fit_temperature,
)
from leukemia_mlops.evaluation.evaluate import EvaluateSpec, Scored, threshold_report
from leukemia_mlops.evaluation.metrics import binary_metrics
from leukemia_mlops.inference.calibrated import (
    calibrate,
    calibrated_threshold,
    check_temperature,
    logit,
)

BOOTSTRAP = {"n_resamples": 50, "confidence": 0.95, "seed": 0, "min_subjects": 2}


def planted(temperature: float, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from calibrated log-odds, reported by a model ``temperature`` times too
    sharp: its raw P(ALL) and the labels."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 2, n)
    labels = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(np.int64)
    return 1 / (1 + np.exp(-z * temperature)), labels


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.5])
def test_fit_recovers_a_planted_temperature(temperature):
    probs, labels = planted(temperature, 20_000, seed=1)
    assert fit_temperature(probs, labels) == pytest.approx(temperature, rel=0.05)


def test_calibrate_divides_the_logit_and_keeps_the_order():
    probs = np.array([0.1, 0.4, 0.5, 0.9, 1.0])
    out = calibrate(probs, 2.0)
    np.testing.assert_allclose(logit(out), logit(probs) / 2)
    assert out[2] == 0.5 and np.all(np.diff(out) > 0)
    assert calibrated_threshold(0.9, 2.0) == pytest.approx(out[3])
    with pytest.raises(InputError, match="no valid temperature"):
        check_temperature(0.0, "metrics.json")


def test_calibration_metrics_match_the_cell_metrics():
    probs, labels = planted(2.0, 300, seed=2)
    values = CalibrationMetrics()(probs, labels)
    assert values["top_label_ece"] == pytest.approx(
        binary_metrics(probs, labels)["top_label_ece"], abs=1e-6
    )
    assert values["brier"] == pytest.approx(np.mean((probs - labels) ** 2))


def test_the_temperature_comes_from_validation_and_lowers_test_ece():
    """Validation and test from the same overconfident model: the report's T is validation's
    (not test's, which differs on another draw) and the test ECE falls after it."""
    val_probs, val_labels = planted(3.0, 2000, seed=3)
    test_probs, test_labels = planted(3.0, 1200, seed=4)
    subjects = np.array([f"{label}-{i % 6}" for i, label in enumerate(test_labels)])
    test = Cells(test_probs, test_labels, subjects)
    temperature = fit_temperature(val_probs, val_labels)
    report = calibration_report(temperature, test, BOOTSTRAP)
    assert report["temperature"] == temperature != fit_temperature(test_probs, test_labels)
    before, after = report["before"], report["after"]
    assert after["top_label_ece"] < before["top_label_ece"] / 2
    assert after["brier"] < before["brier"]
    for section in (before, after):
        for name in ("top_label_ece", "brier"):
            # ECE is biased upwards in resamples, so its point may sit below its interval.
            assert section[f"{name}_pct_low"] <= section[f"{name}_pct_high"]
            assert section[f"{name}_n_valid"] == BOOTSTRAP["n_resamples"]


def test_the_evaluate_report_fits_its_temperature_on_validation():
    """The evaluate stage's T is validation's, never the test split's it is reported on."""

    def scored(split: str, temperature: float, seed: int) -> Scored:
        probs, labels = planted(temperature, 600, seed)
        subjects = np.array([f"{label}-{i % 4}" for i, label in enumerate(labels)])
        return Scored(split, SimpleNamespace(labels=labels, subjects=subjects), probs)

    val, test = scored("val", 3.0, seed=3), scored("test", 1.5, seed=4)  # T 3 and T 1.5
    spec = EvaluateSpec(n_resamples=20, min_subjects=2, tta=False, seed=0, batch_size=8)

    metrics, _ = threshold_report(val, test, spec)

    assert metrics["temperature"] == fit_temperature(val.probs, val.data.labels)
    assert metrics["temperature"] != pytest.approx(fit_temperature(test.probs, test.data.labels))
    assert metrics["calibration"]["temperature"] == metrics["temperature"]
