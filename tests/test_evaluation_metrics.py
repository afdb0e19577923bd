"""Evaluation numbers: hand-computed metric values, threshold choice, subject votes, bootstrap."""

from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest
import scipy.stats
import torch
from scipy.special import ndtr, ndtri

from leukemia_mlops.evaluation.bootstrap import (
    bootstrap_ci,
    interval_columns,
    subject_intervals,
    too_few_subjects,
)
from leukemia_mlops.evaluation.metrics import (
    BinaryMetrics,
    binary_metrics,
    choose_threshold,
    metrics_from_counts,
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


# The bootstrap settings the tests share unless they say otherwise.
bootstrap = functools.partial(bootstrap_ci, confidence=0.95, seed=0, min_subjects=5)


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


def test_p_all_ece_zero_when_every_bin_is_calibrated():
    # Each probability sits in its own 1/15-wide bin with exactly that share of ALL cells.
    probs = np.repeat([0.1, 0.25, 0.5, 0.75], [10, 4, 2, 4])
    labels = np.array([1] + [0] * 9 + [1, 0, 0, 0] + [1, 0] + [1, 1, 1, 0])
    assert binary_metrics(probs, labels)["p_all_ece"] == pytest.approx(0.0, abs=1e-12)


def test_p_all_ece_of_overconfident_bin():
    probs, labels = np.full(10, 0.9), np.array([1, 0] * 5)
    assert binary_metrics(probs, labels)["p_all_ece"] == pytest.approx(0.4)


def _numpy_top_label_ece(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """sum_b |B_b| / n * |acc(B_b) - conf(B_b)| over equal-width bins of max(p, 1 - p), the
    call made at 0.5 (no edge handling: the data here avoid bin edges)."""
    confidence = np.maximum(probs, 1 - probs)
    right = (probs > 0.5) == labels
    bins = np.floor(confidence * n_bins).astype(int)
    gaps = [
        (bins == b).mean() * abs(right[bins == b].mean() - confidence[bins == b].mean())
        for b in np.unique(bins)
    ]
    return float(sum(gaps))


def test_top_label_ece_is_the_confidence_ece_not_p_all_calibration():
    """4 cells at P(ALL) 0.9 (3 ALL), 4 at 0.1 (all HEM), 2 at 0.65 (1 ALL). P(ALL) bins:
    (4 * 0.15 + 4 * 0.1 + 2 * 0.15) / 10 = 0.13. Confidence bins: 0.9 holds 8 cells, 7 called
    right (0.025 off), 0.65 holds 2, 1 right (0.15 off): (8 * 0.025 + 2 * 0.15) / 10 = 0.05."""
    probs = np.repeat([0.9, 0.1, 0.65], [4, 4, 2])
    labels = np.array([1, 1, 1, 0, 0, 0, 0, 0, 1, 0])
    assert _numpy_top_label_ece(probs, labels) == pytest.approx(0.05)
    for threshold in (0.5, 0.7):  # the confusion metrics' threshold does not move it
        result = binary_metrics(probs, labels, threshold)
        assert result["top_label_ece"] == pytest.approx(0.05, abs=1e-6)
        assert result["p_all_ece"] == pytest.approx(0.13, abs=1e-6)


def test_top_label_ece_equals_a_numpy_computation():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 2, 500)
    probs = 1 / (1 + np.exp(-rng.normal(2.0 * (2 * labels - 1), 1.5)))
    expected = _numpy_top_label_ece(probs, labels)
    assert binary_metrics(probs, labels)["top_label_ece"] == pytest.approx(expected, abs=1e-6)


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


def test_choose_threshold_is_as_good_as_a_grid_search_with_binary_metrics():
    """No threshold on a 0.001 grid (which holds every 2-decimal probability) scores higher."""
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 60)
    probs = np.round(np.clip(rng.normal(0.4 + 0.2 * labels, 0.2), 0, 1), 2)
    grid = np.linspace(0, 1, 1001)
    for metric in ("f1_weighted", "balanced_accuracy", "accuracy"):
        best = max(binary_metrics(probs, labels, t)[metric] for t in grid)
        chosen = choose_threshold(probs, labels, metric)
        assert binary_metrics(probs, labels, chosen)[metric] == pytest.approx(best, abs=1e-6)


def test_choose_threshold_follows_the_labels_not_the_cell_order():
    # Whether the threshold ignores the test split is checked end to end in test_evaluate.py.
    probs, labels, _ = _cohort(6, 20, seed=1)
    chosen = choose_threshold(probs, labels)
    shuffled = np.random.default_rng(0).permutation(probs.size)
    assert choose_threshold(probs[shuffled], labels[shuffled]) == chosen
    assert choose_threshold(probs, 1 - labels) != chosen


def test_choose_threshold_rejects_threshold_free_metric():
    with pytest.raises(ValueError):
        choose_threshold(HAND_PROBS, HAND_LABELS, metric="auroc")


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


#: float32 bin edge 9/15, just below 0.6: a float32 network's output can sit on it.
FLOAT32_EDGE = float(torch.linspace(0, 1, 16, dtype=torch.float32)[9])


@pytest.mark.parametrize(
    ("edge", "wrong", "right"),
    [
        (11 / 15, 0.7, 0.75),  # just below float64's edge 11/15, on float32's
        (FLOAT32_EDGE, 0.55, 0.62),  # float32's edge, below float64's edge 9/15
    ],
)
def test_weighted_top_label_ece_bins_confidences_in_float32_as_torchmetrics(edge, wrong, right):
    """A confidence on a bin edge as torchmetrics' top-label form bins it (in float32) opens
    the bin of the ``right`` call; binned in float64 it would join the ``wrong`` call's bin
    below and give another ECE. Every cell is ALL, so P(ALL) ``1 - wrong`` is a wrong call."""
    probs, labels = np.array([edge, 1 - wrong, right]), np.ones(3, dtype=int)
    weighted = weighted_binary_metrics(probs, labels, np.ones((1, 3)))["top_label_ece"]
    expected = (wrong + 2 * (1 - (edge + right) / 2)) / 3
    assert binary_metrics(probs, labels)["top_label_ece"] == pytest.approx(expected, abs=1e-6)
    np.testing.assert_allclose(weighted, [expected], atol=1e-6, rtol=0)


def test_vectorised_bootstrap_equals_looped_bootstrap():
    probs, labels, subjects = _cohort(10, 15, seed=6)

    def looped(p: np.ndarray, y: np.ndarray) -> dict[str, float]:
        return binary_metrics(p, y, 0.4)

    fast = bootstrap(probs, labels, subjects, BinaryMetrics(0.4), n_resamples=40, seed=3)
    slow = bootstrap(probs, labels, subjects, looped, n_resamples=40, seed=3)
    assert fast.keys() == slow.keys()
    for name in fast:
        *bounds, reason = fast[name]
        np.testing.assert_allclose(bounds, slow[name][:-1], atol=1e-6, rtol=0, err_msg=name)
        assert reason == slow[name].bc_reason, name


def test_an_undefined_acceleration_gives_a_bc_interval_named_so():
    """A statistic undefined without subject 0 has an undefined jackknife value, so BCa's
    acceleration is undefined: the interval is bias-corrected only and its bounds say BC."""
    rng = np.random.default_rng(0)
    values = rng.normal(size=12)
    label_of = np.arange(12) % 2

    def score(counts: np.ndarray) -> dict[str, np.ndarray]:
        mean = (counts * values).sum(axis=1) / counts.sum(axis=1)
        return {"m": np.where(counts[:, 0] > 0, mean, np.nan)}

    [ci] = subject_intervals(
        score, label_of, n_resamples=200, confidence=0.95, seed=0, min_subjects=2
    ).values()
    assert ci.bc_reason is not None and ci.adjusted == "bc"
    assert ci.bca_low <= ci.point <= ci.bca_high  # the bias-corrected bounds
    # They are the BC interval written out: the bias correction z0 alone, no acceleration.
    draws = _reference_draws(label_of, 200, seed=0)
    theta = np.array([values[d].mean() if 0 in d else np.nan for d in draws])
    theta = theta[~np.isnan(theta)]
    z0 = ndtri((theta < ci.point).mean() + 0.5 * (theta == ci.point).mean())
    levels = ndtr(2 * z0 + ndtri(np.array([0.025, 0.975])))
    assert ci.n_valid == theta.size
    np.testing.assert_allclose((ci.bca_low, ci.bca_high), np.quantile(theta, levels), atol=1e-12)
    assert (ci.bca_low, ci.bca_high) != (ci.pct_low, ci.pct_high)  # the correction acted
    columns = interval_columns({"m": ci})
    assert {"m_bc_low", "m_bc_high", "m_bc_reason", "m_pct_low"} <= set(columns)
    assert not any(key.startswith("m_bca") for key in columns)


def test_interval_contains_point_estimate():
    probs, labels, subjects = _cohort(30, 40, seed=7)
    for name, ci in bootstrap(probs, labels, subjects, BinaryMetrics(), n_resamples=300).items():
        assert ci.pct_low <= ci.point <= ci.pct_high, name
        assert ci.bca_low <= ci.point <= ci.bca_high, name
        assert ci.n_valid == 300, name


def test_interval_narrows_with_more_subjects():
    def width(n_subjects: int) -> dict[str, float]:
        probs, labels, subjects = _cohort(n_subjects, 20, seed=8)
        ci = bootstrap(probs, labels, subjects, BinaryMetrics(), n_resamples=400)
        return {name: ci[name].pct_high - ci[name].pct_low for name in ("f1_weighted", "auroc")}

    few, many = width(10), width(80)
    for name in few:
        assert many[name] < 0.75 * few[name], name


def test_same_seed_same_interval():
    probs, labels, subjects = _cohort(12, 20, seed=9)
    first = bootstrap(probs, labels, subjects, BinaryMetrics(), n_resamples=200, seed=4)
    again = bootstrap(probs, labels, subjects, BinaryMetrics(), n_resamples=200, seed=4)
    other = bootstrap(probs, labels, subjects, BinaryMetrics(), n_resamples=200, seed=5)
    assert first == again
    assert first["f1_weighted"] != other["f1_weighted"]


def test_every_resample_keeps_each_class_subject_count():
    # 5 HEM subjects of 3 cells and 7 ALL subjects of 2 cells: a resample that kept both
    # classes' subject counts holds exactly 15 HEM and 14 ALL cells; any other draw would not.
    subjects = np.r_[np.repeat(np.arange(5), 3), np.repeat(np.arange(5, 12), 2)]
    labels = (subjects >= 5).astype(int)
    probs = np.linspace(0.01, 0.99, labels.size)

    def cells(p: np.ndarray, y: np.ndarray) -> dict[str, float]:
        return {"hem": float((y == 0).sum()), "all": float((y == 1).sum())}

    ci = bootstrap(probs, labels, subjects, cells, n_resamples=200)
    assert ci["hem"] == (15, 15, 15, 15, 15, 200, None)
    assert ci["all"] == (14, 14, 14, 14, 14, 200, None)


def test_resamples_subjects_not_cells():
    # Every subject has 7 right and 3 wrong cells, so every subject resample scores accuracy
    # 0.7 exactly. Resampling its 120 cells instead would give 0.7 +- ~0.08.
    subjects = np.repeat(np.arange(12), 10)
    labels = (subjects % 2).astype(int)
    right = np.tile(np.r_[np.ones(7), np.zeros(3)], 12).astype(bool)
    probs = np.where(right == labels.astype(bool), 0.9, 0.1)
    ci = bootstrap(probs, labels, subjects, BinaryMetrics(), n_resamples=200)
    assert ci["accuracy"][:6] == pytest.approx((0.7, 0.7, 0.7, 0.7, 0.7, 200))


def test_percentile_interval_of_a_known_distribution():
    # 5 ALL subjects, one of them entirely missed: sensitivity is 1 - k/5 with k ~ Bin(5, 1/5)
    # the number of draws of that subject. P(k <= 2) = 0.942 and P(k <= 3) = 0.993, so the
    # 2.5% quantile of sensitivity is 1 - 3/5 and the 97.5% quantile 1 (P(k = 0) = 0.33).
    subjects = np.repeat(np.arange(10), 4)
    labels = (subjects < 5).astype(int)
    probs = np.where(labels == 1, 0.9, 0.1)
    probs[subjects == 0] = 0.2
    ci = bootstrap(probs, labels, subjects, BinaryMetrics(), n_resamples=2000)
    assert (ci["sensitivity"].point, ci["sensitivity"].pct_low, ci["sensitivity"].pct_high) == (
        pytest.approx(0.8),
        pytest.approx(0.4),
        1.0,
    )
    assert ci["specificity"][:5] == (1.0,) * 5  # HEM draws never mix in the missed ALL subject


def _auroc(hem: np.ndarray, all_: np.ndarray, axis: int = -1) -> np.ndarray:
    """Mann-Whitney AUROC, ties counted half, along the last axis (SciPy's vectorised form)."""
    diff = all_[..., :, None] - hem[..., None, :]
    return ((diff > 0) + 0.5 * (diff == 0)).mean(axis=(-2, -1))


def _balanced_accuracy(hem: np.ndarray, all_: np.ndarray, axis: int = -1) -> np.ndarray:
    return ((all_ > 0.5).mean(axis=-1) + (hem <= 0.5).mean(axis=-1)) / 2


def _sensitivity(hem: np.ndarray, all_: np.ndarray, axis: int = -1) -> np.ndarray:
    return (all_ > 0.5).mean(axis=-1)


@pytest.mark.parametrize(
    ("metric", "statistic"),
    [("auroc", _auroc), ("balanced_accuracy", _balanced_accuracy), ("sensitivity", _sensitivity)],
)
def test_intervals_equal_scipy_on_unclustered_data(metric, statistic):
    """With one cell per subject the stratified subject bootstrap is SciPy's two-sample one."""
    rng = np.random.default_rng(1)
    labels = np.r_[np.zeros(9, int), np.ones(12, int)]
    probs = np.round(np.clip(rng.normal(0.35 + 0.3 * labels, 0.2), 0, 1), 2)
    ci = bootstrap(probs, labels, np.arange(21), BinaryMetrics(), n_resamples=500, seed=7)
    samples = (probs[labels == 0], probs[labels == 1])
    for method, bounds in (("percentile", ci[metric][1:3]), ("BCa", ci[metric][3:5])):
        reference = scipy.stats.bootstrap(
            samples, statistic, n_resamples=500, method=method, rng=np.random.default_rng(7)
        )
        np.testing.assert_allclose(bounds, reference.confidence_interval, rtol=0, atol=1e-12)
    assert ci[metric].bca_low != ci[metric].pct_low  # the bias correction did act
    assert ci[metric].bc_reason is None  # a true BCa interval


def _reference_draws(label_of: np.ndarray, n_resamples: int, seed: int) -> list[np.ndarray]:
    """Each resample's subjects: per class in label order, as many draws as it has subjects."""
    rng = np.random.default_rng(seed)
    per_class = []
    for label in (0, 1):
        members = np.flatnonzero(label_of == label)
        per_class.append(members[rng.integers(0, members.size, (n_resamples, members.size))])
    return list(np.concatenate(per_class, axis=1))


def _clustered_bca(probs, labels, subjects, statistic, n_resamples: int, seed: int) -> np.ndarray:
    """A 95% stratified subject-bootstrap BCa interval, cell by cell: resamples and the
    leave-one-subject-out jackknife build their cell lists; SciPy's multi-sample acceleration."""
    names, subject = np.unique(subjects, return_inverse=True)
    cells = [np.flatnonzero(subject == i) for i in range(names.size)]
    label_of = np.array([labels[c[0]] for c in cells])

    def stat(chosen) -> float:
        index = np.concatenate([cells[i] for i in chosen])
        return float(statistic(probs[index][labels[index] == 0], probs[index][labels[index] == 1]))

    point = stat(range(names.size))
    theta = np.array([stat(d) for d in _reference_draws(label_of, n_resamples, seed)])
    jackknife = np.array([stat(np.delete(np.arange(names.size), i)) for i in range(names.size)])
    num = den = 0.0
    for label in (0, 1):
        values = jackknife[label_of == label]
        u = (values.size - 1) * (values.mean() - values)
        num += (u**3).sum() / values.size**3
        den += (u**2).sum() / values.size**2
    a = num / (6 * den**1.5)
    z0 = ndtri((theta < point).mean() + 0.5 * (theta == point).mean())
    z = z0 + ndtri(np.array([0.025, 0.975]))
    return np.quantile(theta, ndtr(z0 + z / (1 - a * z)))


@pytest.mark.parametrize(
    ("metric", "statistic"), [("auroc", _auroc), ("balanced_accuracy", _balanced_accuracy)]
)
def test_bca_equals_a_clustered_reference_with_many_cells_per_subject(metric, statistic):
    """Subjects of 1 to 6 cells with a shared offset: the BCa bounds are those of a jackknife
    that leaves out whole subjects (leaving out cells, or weighing subjects alike, differs)."""
    rng = np.random.default_rng(4)
    counts = rng.integers(1, 7, 16)
    subjects = np.repeat(np.arange(16), counts)
    labels = subjects % 2
    offset = rng.normal(0, 0.15, 16)[subjects]
    probs = np.round(
        np.clip(0.35 + 0.3 * labels + offset + rng.normal(0, 0.1, labels.size), 0, 1), 2
    )
    ci = bootstrap(probs, labels, subjects, BinaryMetrics(), n_resamples=300, seed=2)[metric]
    reference = _clustered_bca(probs, labels, subjects, statistic, n_resamples=300, seed=2)
    assert ci.bc_reason is None
    np.testing.assert_allclose((ci.bca_low, ci.bca_high), reference, rtol=0, atol=1e-9)
    assert ci.bca_low != ci.pct_low  # the adjustment acted


def test_a_class_with_too_few_subjects_gets_no_interval():
    probs, labels, subjects = _cohort(9, 10, seed=2)  # 5 HEM subjects, 4 ALL
    assert too_few_subjects({"HEM": 5, "ALL": 4}, 5) == (
        "too few subjects: 4 ALL, fewer than 5 per class"
    )
    assert too_few_subjects({"HEM": 5, "ALL": 5}, 5) is None
    ci = bootstrap(probs, labels, subjects, BinaryMetrics(), n_resamples=100)
    for name, (point, *bounds, n_valid, _) in ci.items():
        assert np.isnan(bounds).all() and n_valid == 0, name
        assert point == pytest.approx(binary_metrics(probs, labels)[name], abs=1e-6, nan_ok=True)
    allowed = bootstrap(probs, labels, subjects, BinaryMetrics(), n_resamples=100, min_subjects=4)
    assert allowed["accuracy"].n_valid == 100


def test_undefined_resamples_are_dropped_and_counted():
    # Only ALL subject 0 has cells called ALL, so precision is undefined in resamples that do
    # not draw it: (4/5)^5 = 33% of them. HEM cells are never called ALL: precision is 1.
    subjects = np.repeat(np.arange(10), 5)
    labels = (subjects < 5).astype(int)
    probs = np.where(subjects == 0, 0.9, 0.1)
    ci = bootstrap(probs, labels, subjects, BinaryMetrics(), n_resamples=1000)
    assert 600 < ci["precision"].n_valid < 740
    assert ci["precision"][:5] == (1.0,) * 5
    assert ci["accuracy"].n_valid == ci["sensitivity"].n_valid == 1000
