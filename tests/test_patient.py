"""Patient-level diagnosis: the rules, a balanced threshold, exact intervals."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest

from leukemia_mlops.errors import ConfigError, InputError
from leukemia_mlops.evaluation.bootstrap import Cells
from leukemia_mlops.evaluation.patient import (
    RULES,
    check_rule,
    choose_subject_threshold,
    clopper_pearson,
    patient_report,
    subject_scores,
)


def test_threshold_maximises_balanced_accuracy_not_accuracy():
    """Two HEM subjects among ten. Plain accuracy ties at 0.9 between calling only HEM 0 right
    (t in (0, 0.5)) and only ALL 0.5 wrong (t in (1, 2)); balanced accuracy prefers the second
    (0.9375 against 0.75)."""
    scores = np.array([0.0, 1.0, 0.5, 2, 3, 4, 5, 6, 7, 8])
    labels = np.array([0, 0, 1, 1, 1, 1, 1, 1, 1, 1])
    assert choose_subject_threshold(scores, labels, neutral=0.0) == 1.5


def test_ties_go_nearest_the_neutral_score():
    scores, labels = np.array([-3.0, -1.0, 2.0, 4.0]), np.array([0, 0, 1, 1])
    assert choose_subject_threshold(scores, labels, neutral=0.0) == 0.0
    assert choose_subject_threshold(scores, labels, neutral=3.0) == 0.5


@pytest.mark.parametrize(("k", "n"), [(0, 4), (3, 4), (4, 4), (5, 11), (17, 17), (1, 28)])
def test_clopper_pearson_matches_scipy(k, n):
    expected = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    assert clopper_pearson(k, n) == pytest.approx((expected.low, expected.high), abs=1e-12)


def test_clopper_pearson_known_values():
    # All of 6 right: the lower bound solves p**6 = 0.025.
    assert clopper_pearson(6, 6) == pytest.approx((0.025 ** (1 / 6), 1.0))
    assert np.isnan(clopper_pearson(0, 0)).all()


def test_rules_score_each_subject_from_its_cells():
    probs = np.array([0.9, 0.6, 0.2, 0.5, 0.1])
    cells = Cells(probs, np.array([1, 1, 1, 0, 0]), np.array(["A", "A", "A", "B", "B"]))
    expected = {
        "mean_log_odds": [np.mean(np.log(probs[:3] / (1 - probs[:3]))), np.log(1 / 9) / 2],
        "mean_p": [(0.9 + 0.6 + 0.2) / 3, 0.3],
        "majority": [2 / 3, 0.0],
    }
    for name, scores in expected.items():
        table = subject_scores(cells, RULES[name], cell_threshold=0.5)
        assert table["subject"].tolist() == ["A", "B"] and table["n_cells"].tolist() == [3, 2]
        np.testing.assert_allclose(table["score"], scores)
    with pytest.raises(ConfigError, match=r"evaluate\.patient_rule"):
        check_rule("median")


def test_report_counts_subjects_and_uses_validation_subjects():
    rng = np.random.default_rng(0)

    def split(n_all: int, n_hem: int, shift: float) -> Cells:
        labels = np.repeat(np.r_[np.ones(n_all, int), np.zeros(n_hem, int)], 20)
        subjects = np.repeat(np.arange(n_all + n_hem).astype(str), 20)
        z = rng.normal(0, 1, labels.size) + 2 * (labels - 0.5) + shift
        return Cells(1 / (1 + np.exp(-z)), labels, subjects)

    val, test = split(6, 4, 0.0), split(17, 11, 0.0)
    report, table = patient_report(val, test, "mean_log_odds", 0.5)
    assert report["n_all_subjects"] == 17 and report["n_hem_subjects"] == 11
    assert report["sensitivity"] == 1.0 and report["specificity"] == 1.0
    assert report["sensitivity_low"] == pytest.approx(0.025 ** (1 / 17))
    assert list(table.columns) == ["subject", "split", "label", "n_cells", "score", "prediction"]
    assert (table["split"] == "val").sum() == 10 and (table["split"] == "test").sum() == 28
    # Shifting every test score does not move the threshold: validation alone chose it.
    shifted, _ = patient_report(val, split(17, 11, -3.0), "mean_log_odds", 0.5)
    assert shifted["threshold"] == report["threshold"] and shifted["sensitivity"] < 1
    with pytest.raises(InputError, match="both classes"):
        patient_report(split(3, 0, 0.0), test, "mean_log_odds", 0.5)
