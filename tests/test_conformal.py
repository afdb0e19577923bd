"""Mondrian split-conformal sets: the finite-sample quantile, crepes' sets, the coverage."""

from __future__ import annotations

import numpy as np
import pytest
from crepes import ConformalClassifier

from leukemia_mlops.errors import ConfigError, InputError
from leukemia_mlops.evaluation.bootstrap import Cells
from leukemia_mlops.evaluation.conformal import (
    GUARANTEE,
    ConformalMetrics,
    class_quantiles,
    conformal_report,
)
from leukemia_mlops.evaluation.evaluate import EvaluateSpec
from leukemia_mlops.inference.calibrated import prediction_sets, set_names

ALPHA = 0.1


def cells(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Exchangeable cells: labels half and half, P(ALL) overlapping between the classes."""
    labels = rng.integers(0, 2, n)
    probs = 1 / (1 + np.exp(-(rng.normal(0, 1.5, n) + 2 * (labels - 0.5))))
    return probs, labels


def test_quantile_is_the_finite_sample_rank():
    # HEM nonconformity = p: 0.05, 0.1, ..., 0.95 (19 cells); rank ceil(20 * 0.9) = 18.
    hem = np.arange(1, 20) / 20
    # ALL nonconformity = 1 - p: 14 cells, rank ceil(15 * 0.9) = 14, the largest.
    all_ = 1 - np.arange(1, 15) / 100
    probs = np.r_[hem, all_]
    labels = np.r_[np.zeros(19, int), np.ones(14, int)]
    quantiles = class_quantiles(probs, labels, ALPHA)
    assert quantiles == pytest.approx({"HEM": 0.9, "ALL": 0.14})
    # 8 cells of a class: rank ceil(9 * 0.9) = 9 > 8, so the class is always in the set.
    few = class_quantiles(np.r_[np.full(8, 0.3), np.full(8, 0.7)], np.r_[[0] * 8, [1] * 8], ALPHA)
    assert few == {"HEM": 1.0, "ALL": 1.0}


@pytest.mark.parametrize(("n_hem", "n_all"), [(14, 23), (57, 38), (153, 101)])
def test_sets_match_crepes_mondrian(n_hem, n_all):
    """crepes' class-conditional sets from unsmoothed p-values (include a class when its
    p-value is at least alpha) equal ours whenever (n + 1) * alpha is no integer."""
    rng = np.random.default_rng(n_hem)
    labels = np.r_[np.zeros(n_hem, int), np.ones(n_all, int)]
    probs = 1 / (1 + np.exp(-(rng.normal(0, 1.5, labels.size) + 2 * (labels - 0.5))))
    test_probs, _ = cells(500, rng)
    scores = lambda p: np.stack([p, 1 - p], axis=1)  # noqa: E731 (1 - p(class), by label)
    conformal = ConformalClassifier().fit(scores(probs)[np.arange(labels.size), labels], labels)
    expected = np.stack(
        [
            conformal.predict_set(
                scores(test_probs), bins=np.full(500, label), confidence=1 - ALPHA, smoothing=False
            )[:, label]
            for label in (0, 1)
        ],
        axis=1,
    ).astype(bool)
    actual = prediction_sets(test_probs, class_quantiles(probs, labels, ALPHA))
    np.testing.assert_array_equal(actual, expected)


def test_coverage_per_class_is_at_least_one_minus_alpha():
    """Over many draws of 14 validation cells per class (rank ceil(15 * 0.9) = 14, expected
    coverage 14/15) each class's mean test coverage is at least 1 - alpha."""
    rng = np.random.default_rng(0)
    coverage = []
    for _ in range(400):
        labels = np.r_[np.zeros(14, int), np.ones(14, int)]
        probs = 1 / (1 + np.exp(-(rng.normal(0, 1.5, 28) + 2 * (labels - 0.5))))
        test_probs, test_labels = cells(400, rng)
        rates = ConformalMetrics(class_quantiles(probs, labels, ALPHA))(test_probs, test_labels)
        coverage.append([rates["coverage_HEM"], rates["coverage_ALL"]])
    mean = np.mean(coverage, axis=0)
    assert (mean >= 1 - ALPHA).all(), mean
    assert (mean <= 14 / 15 + 0.02).all(), mean  # not trivially covered either


def test_set_names_and_rates():
    members = prediction_sets(np.array([0.95, 0.05, 0.5, 0.5]), {"HEM": 0.6, "ALL": 0.6})
    assert set_names(members) == ["ALL", "HEM", "ALL+HEM", "ALL+HEM"]
    empty = prediction_sets(np.array([0.5]), {"HEM": 0.2, "ALL": 0.2})
    assert set_names(empty) == ["none"]
    rates = ConformalMetrics({"HEM": 0.6, "ALL": 0.6})(np.array([0.95, 0.05, 0.5]), [1, 1, 0])
    assert rates == pytest.approx(
        {"coverage_ALL": 0.5, "coverage_HEM": 1.0, "abstention_rate": 1 / 3, "empty_rate": 0.0}
    )


def test_report_is_calibrated_on_validation():
    rng = np.random.default_rng(5)
    val = Cells(*cells(300, rng), np.zeros(300))
    probs, labels = cells(300, rng)
    test = Cells(probs, labels, np.array([f"{y}-{i % 4}" for i, y in enumerate(labels)]))
    bootstrap = {"n_resamples": 30, "confidence": 0.95, "seed": 0, "min_subjects": 2}
    report = conformal_report(val, test, ALPHA, bootstrap)
    assert report["quantile"] == class_quantiles(val.probs, val.labels, ALPHA)
    assert report["guarantee"] == GUARANTEE and report["mondrian"] is True
    for name in ("coverage_ALL", "coverage_HEM", "abstention_rate"):
        assert report[f"{name}_bca_low"] <= report[f"{name}_bca_high"]


def test_bad_alpha_and_a_missing_class_are_one_line_errors():
    with pytest.raises(ConfigError, match=r"evaluate\.alpha"):
        class_quantiles([0.2, 0.8], [0, 1], 1.0)
    with pytest.raises(InputError, match="no HEM cells"):
        class_quantiles([0.8, 0.9], [1, 1], ALPHA)


@pytest.mark.parametrize(
    ("change", "message"),
    [({"alpha": 0.0}, "evaluate.alpha"), ({"patient_rule": "median"}, "evaluate.patient_rule")],
)
def test_the_evaluate_config_refuses_bad_values(change, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        EvaluateSpec(n_resamples=1, min_subjects=2, tta=False, seed=0, batch_size=1, **change)
