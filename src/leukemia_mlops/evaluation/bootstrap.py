"""Subject-level (cluster) bootstrap confidence intervals, stratified by class.

Cells of one subject share staining, imaging session and disease state, so they are not
independent draws: resampling cells would report intervals far narrower than the evidence
supports. Here each resample draws subjects with replacement and keeps all cells of every
drawn subject, which is the unit the test set actually samples. The draw is stratified: HEM
subjects and ALL subjects are resampled separately, each class keeping its subject count, so
no resample lacks a class (the test set was built with fixed class counts, too).

Two intervals come from the same resamples: the percentile interval (``pct``) and the
bias-corrected and accelerated (BCa) one, whose acceleration is a jackknife over subjects; where
that acceleration is undefined the second is bias-corrected only (BC) and named so. Both follow
``scipy.stats.bootstrap`` with one sample per class (the tests hold them equal on unclustered
data); the method is re-implemented because SciPy resamples observations, not clusters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple, Protocol, runtime_checkable

import numpy as np
from scipy.special import ndtr, ndtri

from leukemia_mlops.evaluation.metrics import ArrayLike, validated_arrays
from leukemia_mlops.labels import CLASS_NAMES

MetricFn = Callable[[np.ndarray, np.ndarray], dict[str, float]]
#: The parts of an interval a report writes beside its point (see :func:`interval_columns`).
INTERVAL_KEYS = ("pct_low", "pct_high", "bca_low", "bca_high", "n_valid")
# Cap on the cells x resamples weight matrix one vectorised batch may hold (float64 values).
_BATCH_CELLS = 2_000_000


class Interval(NamedTuple):
    """A point estimate, its percentile and BCa intervals, and how many resamples defined them.

    NaN bounds mean no interval (too few subjects, or no resample where the metric is defined).
    ``bc_reason`` says why the adjusted bounds are bias-corrected only (BC): BCa's acceleration
    is undefined when a leave-one-subject-out value is; None for a true BCa interval.
    """

    point: float
    pct_low: float
    pct_high: float
    bca_low: float
    bca_high: float
    n_valid: int
    bc_reason: str | None = None

    @property
    def adjusted(self) -> str:
        """The adjusted interval's method, the prefix of its bounds' names: ``bca`` or ``bc``."""
        return "bca" if self.bc_reason is None else "bc"


class Cells(NamedTuple):
    """Scored cells of one split: each cell's P(ALL), label and subject."""

    probs: np.ndarray
    labels: np.ndarray
    subjects: np.ndarray


def interval_columns(intervals: dict[str, Interval]) -> dict[str, float | str]:
    """Each interval as ``name`` and ``name_<part>`` for every part of :data:`INTERVAL_KEYS`;
    a bias-corrected-only interval's bounds are ``name_bc_low``/``name_bc_high`` instead, with
    ``name_bc_reason`` saying why."""
    columns: dict[str, float | str] = {}
    for name, ci in intervals.items():
        columns[name] = ci.point
        for part in INTERVAL_KEYS:
            columns[f"{name}_{part.replace('bca', ci.adjusted)}"] = getattr(ci, part)
        if ci.bc_reason is not None:
            columns[f"{name}_bc_reason"] = ci.bc_reason
    return columns


@runtime_checkable
class WeightedMetric(Protocol):
    """A metric function that can also score many cell weightings at once (the fast path)."""

    def __call__(self, probs: ArrayLike, labels: ArrayLike) -> dict[str, float]: ...

    def weighted(
        self, probs: ArrayLike, labels: ArrayLike, weights: np.ndarray
    ) -> dict[str, np.ndarray]: ...


def subjects_per_class(labels: np.ndarray, subjects: np.ndarray) -> dict[str, int]:
    """How many distinct subjects each class has; ``subjects`` holds each cell's subject."""
    return {
        name: int(np.unique(subjects[labels == label]).size)
        for label, name in enumerate(CLASS_NAMES)
    }


def too_few_subjects(counts: dict[str, int], min_subjects: int) -> str | None:
    """Why no interval can be trusted (a class below ``min_subjects``), or None when it can."""
    short = [f"{n} {name}" for name, n in counts.items() if n < min_subjects]
    if not short:
        return None
    return f"too few subjects: {' and '.join(short)}, fewer than {min_subjects} per class"


def subject_labels(labels: np.ndarray, subject: np.ndarray, n_subjects: int) -> np.ndarray:
    """Each subject's label, checked to be the same for all its cells."""
    label_of = np.zeros(n_subjects, dtype=np.int64)
    label_of[subject] = labels
    if (label_of[subject] != labels).any():
        raise ValueError("every cell of a subject must carry that subject's label")
    return label_of


def _stratified_counts(label_of: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """(n_resamples, n_subjects) draw counts; each class redraws its own subjects.

    Classes are drawn in label order with ``rng.integers(0, n, (n_resamples, n))`` each, the
    draws ``scipy.stats.bootstrap`` makes for the samples ``(hem, all)`` with the same seed.
    """
    rng = np.random.default_rng(seed)
    counts = np.zeros((n_resamples, label_of.size), dtype=np.int64)
    rows = np.arange(n_resamples)[:, None]
    for label in range(len(CLASS_NAMES)):
        members = np.flatnonzero(label_of == label)
        draws = members[rng.integers(0, members.size, size=(n_resamples, members.size))]
        np.add.at(counts, (rows, draws), 1)
    return counts


def _weighted_samples(
    metric_fn: WeightedMetric, p: np.ndarray, y: np.ndarray, subject: np.ndarray, counts: np.ndarray
) -> Iterator[dict[str, np.ndarray]]:
    """Score weightings in batches: a cell weighs its subject's count in that row."""
    batch = max(1, _BATCH_CELLS // p.size)
    for start in range(0, len(counts), batch):
        yield metric_fn.weighted(p, y, counts[start : start + batch][:, subject])


def _looped_samples(
    metric_fn: MetricFn, p: np.ndarray, y: np.ndarray, subject: np.ndarray, counts: np.ndarray
) -> Iterator[dict[str, np.ndarray]]:
    """Score each weighting by building its cells explicitly: works for any metric function."""
    for row in counts:
        cells = np.repeat(np.arange(p.size), row[subject])
        yield {name: np.atleast_1d(v) for name, v in metric_fn(p[cells], y[cells]).items()}


def _acceleration(jackknife: np.ndarray, label_of: np.ndarray) -> float:
    """BCa acceleration from leave-one-subject-out values, summed over the class strata.

    SciPy's multi-sample formula. Without jackknife variation there is no skew to correct: 0.
    A jackknife value that is undefined (NaN) leaves it undefined: NaN.
    """
    if np.isnan(jackknife).any():
        return np.nan
    num = den = 0.0
    for label in range(len(CLASS_NAMES)):
        theta = jackknife[label_of == label]
        n = theta.size
        u = (n - 1) * (theta.mean() - theta)
        num += (u**3).sum() / n**3
        den += (u**2).sum() / n**2
    return num / (6 * den**1.5) if den > 0 else 0.0


def _interval(
    point: float,
    samples: np.ndarray,
    jackknife: np.ndarray,
    label_of: np.ndarray,
    confidence: float,
) -> Interval:
    """Percentile and BCa intervals over the resamples where the metric is defined (not NaN)."""
    valid = samples[~np.isnan(samples)]
    if valid.size == 0:
        return Interval(point, np.nan, np.nan, np.nan, np.nan, 0)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(valid, [alpha, 1 - alpha])
    a = _acceleration(jackknife, label_of)
    reason = None
    if np.isnan(a):
        reason = "BCa acceleration undefined: a leave-one-subject-out value is undefined"
        a = 0.0  # bias correction alone
    with np.errstate(invalid="ignore", divide="ignore"):
        z0 = ndtri(((valid < point).sum() + (valid <= point).sum()) / (2 * valid.size))
        z = z0 + ndtri(np.array([alpha, 1 - alpha]))
        levels = ndtr(z0 + z / (1 - a * z))
    adjusted = np.quantile(valid, levels) if np.isfinite(levels).all() else (np.nan, np.nan)
    bounds = (float(low), float(high), float(adjusted[0]), float(adjusted[1]))
    return Interval(point, *bounds, valid.size, reason)


def bootstrap_ci(
    probs: ArrayLike,
    labels: ArrayLike,
    subjects: ArrayLike,
    metric_fn: MetricFn | WeightedMetric,
    *,
    n_resamples: int,
    confidence: float,
    seed: int,
    min_subjects: int,
) -> dict[str, Interval]:
    """Stratified subject-bootstrap intervals for every metric ``metric_fn`` returns.

    The point estimate is ``metric_fn`` on the full data. Resamples where a metric is undefined
    (NaN, e.g. precision when no cell was called ALL) are dropped for that metric; ``n_valid``
    says how many remained. When a class has fewer than ``min_subjects`` subjects (see
    :func:`too_few_subjects`) no interval is computed: bounds NaN, ``n_valid`` 0. A
    ``WeightedMetric`` such as ``BinaryMetrics`` is scored vectorised; any other callable
    ``(probs, labels) -> dict`` one resample at a time.
    """
    p, y = validated_arrays(probs, labels)
    subject_ids = np.asarray(subjects)
    if subject_ids.shape != y.shape:
        raise ValueError(f"subjects shape {subject_ids.shape} does not match labels {y.shape}")
    subject_names, subject = np.unique(subject_ids, return_inverse=True)
    label_of = subject_labels(y, subject, subject_names.size)
    scorer = _weighted_samples if isinstance(metric_fn, WeightedMetric) else _looped_samples

    def score(counts: np.ndarray) -> dict[str, np.ndarray]:
        batches = list(scorer(metric_fn, p, y, subject, counts))
        return {name: np.concatenate([b[name] for b in batches]) for name in batches[0]}

    return subject_intervals(
        score,
        label_of,
        n_resamples=n_resamples,
        confidence=confidence,
        seed=seed,
        min_subjects=min_subjects,
    )


def subject_intervals(
    score: Callable[[np.ndarray], dict[str, np.ndarray]],
    label_of: np.ndarray,
    *,
    n_resamples: int,
    confidence: float,
    seed: int,
    min_subjects: int,
) -> dict[str, Interval]:
    """Stratified subject-bootstrap intervals of any statistic of subject-clustered data.

    ``label_of`` holds each subject's class; ``score`` maps ``(rows, subjects)`` draw counts
    to each statistic's value per row (a subject drawn twice counts twice). Cells, scenes or
    any other unit that belongs to one subject can be scored this way.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be positive, got {n_resamples}")
    if min_subjects < 2:
        raise ValueError(f"min_subjects must be >= 2 (the jackknife needs it), got {min_subjects}")
    # The point comes from the same arithmetic as the resamples, so BCa's bias term compares
    # like with like (torchmetrics' float32 values would sit off the float64 resamples).
    point = {name: float(v[0]) for name, v in score(np.ones((1, label_of.size), np.int64)).items()}
    counts = subjects_per_class(label_of, np.arange(label_of.size))
    if too_few_subjects(counts, min_subjects):
        return {name: Interval(v, np.nan, np.nan, np.nan, np.nan, 0) for name, v in point.items()}
    samples = score(_stratified_counts(label_of, n_resamples, seed))
    jackknife = score(1 - np.eye(label_of.size, dtype=np.int64))
    return {
        name: _interval(value, samples[name], jackknife[name], label_of, confidence)
        for name, value in point.items()
    }
