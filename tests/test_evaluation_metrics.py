"""Evaluation numbers: hand-computed metric values, threshold choice, subject votes, bootstrap."""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest
import torch

from leukemia_mlops.evaluation.bootstrap import bootstrap_ci
from leukemia_mlops.evaluation.metrics import (
    BinaryMetrics,
    binary_metrics,
    choose_threshold,
    metrics_from_counts,
    subject_metrics,
    weighted_binary_metrics,
)

# 4 ALL cells, 6 HEM cells. At threshold 0.5:
#              predicted ALL  predicted HEM
#   actual ALL      TP = 3         FN = 1      (0.9, 0.8, 0.6 | 0.3)
#   actual HEM      FP = 2         TN = 4      (0.7, 0.55 | 0.4, 0.2, 0.1, 0.05)
HAND_LABELS = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
HAND_PROBS = np.array([0.9, 0.8, 0.6, 0.3, 0.7, 0.4, 0.2, 0.1, 0.05, 0.55])
TP, FN, FP, TN = 3, 1, 2, 4


def _f1(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall)


def _hand_expected() -> dict[str, float]:
    """The confusion-matrix metrics from their definitions, per class then support-weighted."""
    f1_all = _f1(TP / (TP + FP), TP / (TP + FN))
    f1_hem = _f1(TN / (TN + FN), TN / (TN + FP))
    sensitivity, specificity = TP / (TP + FN), TN / (TN + FP)
    return {
        "f1_weighted": (f1_all * (TP + FN) + f1_hem * (TN + FP)) / 10,
        "accuracy": (TP + TN) / 10,
        "balanced_accuracy": (sensitivity + specificity) / 2,
        "sensitivity": sensitivity,
        "specificity": specificity,
        "precision": TP / (TP + FP),
    }


def _assert_metrics_close(actual: dict, expected: dict, tol: float = 1e-6) -> None:
    for name, value in expected.items():
        np.testing.assert_allclose(actual[name], value, atol=tol, rtol=0, err_msg=name)


def _cohort(n_subjects: int, cells_per_subject: int, seed: int) -> tuple[np.ndarray, ...]:
    """Cells whose scores share a per-subject offset, as stained batches of real subjects do."""
    rng = np.random.default_rng(seed)
    subject_label = np.arange(n_subjects) % 2
    offset = rng.normal(0, 0.12, n_subjects)
    subjects = np.repeat(np.arange(n_subjects), cells_per_subject)
    labels = subject_label[subjects]
    logits = 1.4 * (2 * labels - 1) + 4 * offset[subjects] + rng.normal(0, 1.2, subjects.size)
    probs = np.round(1 / (1 + np.exp(-logits)), 3)  # rounding creates tied scores
    return probs, labels, subjects.astype(str)


def test_confusion_metrics_match_hand_computation():
    expected = _hand_expected()
    assert expected["f1_weighted"] == pytest.approx(232 / 330)
    _assert_metrics_close(binary_metrics(HAND_PROBS, HAND_LABELS), expected)
    _assert_metrics_close(metrics_from_counts(TP, FP, FN, TN), expected, tol=1e-12)


def test_accepts_tensors():
    from_tensors = binary_metrics(torch.tensor(HAND_PROBS), torch.tensor(HAND_LABELS))
    assert from_tensors == binary_metrics(HAND_PROBS, HAND_LABELS)


def test_auroc_counts_correctly_ordered_pairs():
    # Positives outrank 6 + 6 + 5 + 3 of the 4 * 6 negative pairings.
    assert binary_metrics(HAND_PROBS, HAND_LABELS)["auroc"] == pytest.approx(20 / 24)


def test_auroc_of_perfect_and_reversed_ranking():
    probs = np.linspace(0.05, 0.95, 10)
    labels = (probs > 0.5).astype(int)
    assert binary_metrics(probs, labels)["auroc"] == pytest.approx(1.0)
    assert binary_metrics(probs, labels)["auprc"] == pytest.approx(1.0)
    assert binary_metrics(probs, 1 - labels)["auroc"] == pytest.approx(0.0)


def test_ece_zero_when_every_bin_is_calibrated():
    # Each probability sits in its own 1/15-wide bin with exactly that share of ALL cells.
    probs = np.repeat([0.1, 0.25, 0.5, 0.75], [10, 4, 2, 4])
    labels = np.array([1] + [0] * 9 + [1, 0, 0, 0] + [1, 0] + [1, 1, 1, 0])
    assert binary_metrics(probs, labels)["ece"] == pytest.approx(0.0, abs=1e-12)


def test_ece_of_overconfident_bin():
    probs, labels = np.full(10, 0.9), np.array([1, 0] * 5)
    assert binary_metrics(probs, labels)["ece"] == pytest.approx(0.4)


def test_single_class_gives_nan_for_undefined_metrics_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        only_hem = binary_metrics(np.array([0.1, 0.7, 0.3]), np.zeros(3, dtype=int))
    for name in ("auroc", "auprc", "sensitivity", "balanced_accuracy"):
        assert np.isnan(only_hem[name]), name
    assert only_hem["specificity"] == pytest.approx(2 / 3)
    assert only_hem["accuracy"] == pytest.approx(2 / 3)


def test_precision_nan_when_nothing_called_all():
    result = binary_metrics(np.array([0.1, 0.2, 0.3, 0.4]), np.array([0, 1, 0, 1]))
    assert np.isnan(result["precision"])
    assert result["sensitivity"] == 0.0


@pytest.mark.parametrize(
    ("probs", "labels"),
    [([0.2, 1.3], [0, 1]), ([0.2, np.nan], [0, 1]), ([0.2, 0.8], [0, 2]), ([0.2], [0, 1])],
)
def test_rejects_invalid_inputs(probs, labels):
    with pytest.raises(ValueError):
        binary_metrics(np.array(probs), np.array(labels))


def test_choose_threshold_separates_separable_data():
    probs = np.array([0.05, 0.1, 0.2, 0.3])
    labels = np.array([0, 0, 1, 1])
    threshold = choose_threshold(probs, labels)
    assert threshold == pytest.approx(0.1)
    assert binary_metrics(probs, labels, threshold)["f1_weighted"] == 1.0


def test_choose_threshold_prefers_half_among_equally_good():
    probs = np.array([0.1, 0.2, 0.35, 0.6, 0.7, 0.9])
    labels = np.array([0, 0, 0, 1, 1, 1])
    assert choose_threshold(probs, labels) == 0.5


def test_choose_threshold_matches_exhaustive_search_with_binary_metrics():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 60)
    probs = np.round(np.clip(rng.normal(0.4 + 0.2 * labels, 0.2), 0, 1), 2)
    for metric in ("f1_weighted", "balanced_accuracy", "accuracy"):
        candidates = np.union1d(probs, 0.5)
        scores = np.array([binary_metrics(probs, labels, t)[metric] for t in candidates])
        winners = candidates[np.isclose(scores, scores.max(), atol=1e-6, rtol=0)]
        expected = winners[np.argmin(np.abs(winners - 0.5))]
        assert choose_threshold(probs, labels, metric) == pytest.approx(expected), metric


def test_choose_threshold_depends_only_on_its_data():
    val_probs, val_labels, _ = _cohort(6, 20, seed=1)
    chosen = choose_threshold(val_probs, val_labels)
    shuffled = np.random.default_rng(0).permutation(val_probs.size)
    test_probs, test_labels, _ = _cohort(6, 20, seed=2)
    binary_metrics(test_probs, test_labels, chosen)
    test_probs[:] = 1 - test_probs  # other data changing must not matter
    assert choose_threshold(val_probs, val_labels) == chosen
    assert choose_threshold(val_probs[shuffled], val_labels[shuffled]) == chosen


def test_choose_threshold_rejects_threshold_free_metric():
    with pytest.raises(ValueError):
        choose_threshold(HAND_PROBS, HAND_LABELS, metric="auroc")


def test_subject_metrics_majority_vote():
    # A: 3/4 blast; B: 1/2 blast (a tie is called ALL); C (healthy): 2/3 blast; D (healthy): 0/2.
    subjects = np.array(["A"] * 4 + ["B"] * 2 + ["C"] * 3 + ["D"] * 2)
    labels = np.array([1] * 6 + [0] * 5)
    probs = np.array([0.9, 0.8, 0.7, 0.2, 0.6, 0.4, 0.9, 0.8, 0.1, 0.3, 0.2])
    table, summary = subject_metrics(probs, labels, subjects, threshold=0.5)
    assert list(table.columns) == ["subject", "label", "n_cells", "blast_share", "diagnosis"]
    assert table["subject"].tolist() == ["A", "B", "C", "D"]
    assert table["n_cells"].tolist() == [4, 2, 3, 2]
    np.testing.assert_allclose(table["blast_share"], [0.75, 0.5, 2 / 3, 0.0])
    assert table["diagnosis"].tolist() == [1, 1, 1, 0]
    # Subjects: TP = 2 (A, B), FP = 1 (C), TN = 1 (D), FN = 0.
    f1_all, f1_hem = _f1(2 / 3, 1.0), _f1(1.0, 1 / 2)
    expected = {
        "accuracy": 3 / 4,
        "sensitivity": 1.0,
        "specificity": 1 / 2,
        "f1_weighted": (2 * f1_all + 2 * f1_hem) / 4,
    }
    assert summary == pytest.approx(expected)


def test_subject_metrics_rejects_mixed_subject_labels():
    with pytest.raises(ValueError, match="subject's label"):
        subject_metrics(np.array([0.2, 0.8]), np.array([0, 1]), np.array(["A", "A"]), 0.5)


def _assert_same_metrics(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        np.testing.assert_allclose(actual[name], expected[name], atol=1e-6, rtol=0, err_msg=name)


def test_weighted_metrics_equal_binary_metrics_on_repeated_cells():
    probs, labels, _ = _cohort(8, 25, seed=5)
    probs[:4] = [1.0, 0.0, 0.5, 2 / 15]  # edges: clip values, the threshold, an ECE bin edge
    rng = np.random.default_rng(0)
    weights = rng.integers(0, 3, size=(4, probs.size))
    weights[3, labels == 1] = 0  # a weighting with one class only
    batched = weighted_binary_metrics(probs, labels, weights, threshold=0.5)
    for row, w in enumerate(weights):
        reference = binary_metrics(np.repeat(probs, w), np.repeat(labels, w), 0.5)
        _assert_same_metrics({k: v[row] for k, v in batched.items()}, reference)
    unit = weighted_binary_metrics(probs, labels, np.ones((1, probs.size)), threshold=0.3)
    _assert_same_metrics({k: v[0] for k, v in unit.items()}, binary_metrics(probs, labels, 0.3))


def test_vectorised_bootstrap_equals_looped_bootstrap():
    probs, labels, subjects = _cohort(10, 15, seed=6)

    def looped(p: np.ndarray, y: np.ndarray) -> dict[str, float]:
        return binary_metrics(p, y, 0.4)

    fast = bootstrap_ci(probs, labels, subjects, BinaryMetrics(0.4), n_resamples=40, seed=3)
    slow = bootstrap_ci(probs, labels, subjects, looped, n_resamples=40, seed=3)
    assert fast.keys() == slow.keys()
    for name in fast:
        np.testing.assert_allclose(fast[name], slow[name], atol=1e-6, rtol=0, err_msg=name)


def test_interval_contains_point_estimate():
    probs, labels, subjects = _cohort(30, 40, seed=7)
    for name, (point, low, high, n_valid) in bootstrap_ci(
        probs, labels, subjects, BinaryMetrics(), n_resamples=300
    ).items():
        assert low <= point <= high, name
        assert n_valid == 300, name


def test_interval_narrows_with_more_subjects():
    def width(n_subjects: int) -> dict[str, float]:
        probs, labels, subjects = _cohort(n_subjects, 20, seed=8)
        ci = bootstrap_ci(probs, labels, subjects, BinaryMetrics(), n_resamples=400)
        return {name: ci[name].high - ci[name].low for name in ("f1_weighted", "auroc")}

    few, many = width(8), width(80)
    for name in few:
        assert many[name] < 0.75 * few[name], name


def test_same_seed_same_interval():
    probs, labels, subjects = _cohort(12, 20, seed=9)
    first = bootstrap_ci(probs, labels, subjects, BinaryMetrics(), n_resamples=200, seed=4)
    again = bootstrap_ci(probs, labels, subjects, BinaryMetrics(), n_resamples=200, seed=4)
    other = bootstrap_ci(probs, labels, subjects, BinaryMetrics(), n_resamples=200, seed=5)
    assert first == again
    assert first["f1_weighted"] != other["f1_weighted"]


def test_resamples_subjects_not_cells():
    # One subject holds every cell: resampling subjects always redraws the same data, so the
    # interval collapses to the point. Resampling its 400 cells would give accuracy 0.7 +- ~0.045.
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    probs = np.where(rng.random(400) < 0.7, 0.3 + 0.4 * labels, 0.7 - 0.4 * labels)
    one = bootstrap_ci(probs, labels, np.zeros(400), BinaryMetrics(), n_resamples=200)
    assert one["accuracy"].low == one["accuracy"].high == one["accuracy"].point

    # Two subjects: all of A's ALL cells are right, all of B's HEM cells wrong. Subject draws
    # are AA / AB / BB, so accuracy spans 0 to 1; a cell bootstrap would stay near 0.5.
    labels = np.repeat([1, 0], 200)
    probs = np.full(400, 0.9)
    subjects = np.repeat(["A", "B"], 200)
    two = bootstrap_ci(probs, labels, subjects, BinaryMetrics(), n_resamples=500)
    assert (two["accuracy"].low, two["accuracy"].point, two["accuracy"].high) == (0.0, 0.5, 1.0)


def test_undefined_resamples_are_dropped_and_counted():
    labels = np.repeat([1, 0], 50)
    probs = np.linspace(0.99, 0.01, 100)
    subjects = np.repeat(["A", "B"], 50)
    ci = bootstrap_ci(probs, labels, subjects, BinaryMetrics(), n_resamples=1000)
    # Only resamples drawing both subjects (about half) have both classes.
    assert 400 < ci["auroc"].n_valid < 600
    assert ci["auroc"].low == ci["auroc"].high == 1.0
    assert ci["accuracy"].n_valid == 1000


def test_bootstrap_is_fast():
    probs, labels, subjects = _cohort(30, 67, seed=10)
    start = time.perf_counter()
    bootstrap_ci(probs, labels, subjects, BinaryMetrics(), n_resamples=1000)
    assert time.perf_counter() - start < 5.0
