"""Subject-level (cluster) bootstrap confidence intervals.

Cells of one subject share staining, imaging session and disease state, so they are not
independent draws: resampling cells would report intervals far narrower than the evidence
supports. Here each resample draws subjects with replacement and keeps all cells of every
drawn subject, which is the unit the test set actually samples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple, Protocol, runtime_checkable

import numpy as np

from leukemia_mlops.evaluation.metrics import ArrayLike, validated_arrays

MetricFn = Callable[[np.ndarray, np.ndarray], dict[str, float]]
# Cap on the cells x resamples weight matrix one vectorised batch may hold (float64 values).
_BATCH_CELLS = 2_000_000


class Interval(NamedTuple):
    """A point estimate, its percentile interval, and how many resamples defined the metric.

    A NamedTuple: `ci.low`, `ci[1]` and `point, low, high, n_valid = ci` all work.
    """

    point: float
    low: float
    high: float
    n_valid: int


@runtime_checkable
class WeightedMetric(Protocol):
    """A metric function that can also score many cell weightings at once (the fast path)."""

    def __call__(self, probs: ArrayLike, labels: ArrayLike) -> dict[str, float]: ...

    def weighted(
        self, probs: ArrayLike, labels: ArrayLike, weights: np.ndarray
    ) -> dict[str, np.ndarray]: ...


def _draw_subjects(n_subjects: int, n_resamples: int, seed: int) -> np.ndarray:
    """(n_resamples, n_subjects) subject indices, each row a draw with replacement."""
    return np.random.default_rng(seed).integers(0, n_subjects, size=(n_resamples, n_subjects))


def _draw_counts(draws: np.ndarray) -> np.ndarray:
    """How often each subject was drawn in each resample, shape (n_resamples, n_subjects)."""
    n_resamples, n_subjects = draws.shape
    flat = (draws + n_subjects * np.arange(n_resamples)[:, None]).ravel()
    return np.bincount(flat, minlength=draws.size).reshape(n_resamples, n_subjects)


def _weighted_samples(
    metric_fn: WeightedMetric, p: np.ndarray, y: np.ndarray, subject: np.ndarray, draws: np.ndarray
) -> Iterator[dict[str, np.ndarray]]:
    """Score resamples in batches as cell weights: a cell weighs its subject's draw count."""
    counts = _draw_counts(draws)
    batch = max(1, _BATCH_CELLS // p.size)
    for start in range(0, len(counts), batch):
        yield metric_fn.weighted(p, y, counts[start : start + batch][:, subject])


def _looped_samples(
    metric_fn: MetricFn, p: np.ndarray, y: np.ndarray, subject: np.ndarray, draws: np.ndarray
) -> Iterator[dict[str, np.ndarray]]:
    """Score each resample by building it explicitly: works for any metric function."""
    cells_of = [np.flatnonzero(subject == s) for s in range(draws.shape[1])]
    for row in draws:
        cells = np.concatenate([cells_of[s] for s in row])
        yield {name: np.atleast_1d(v) for name, v in metric_fn(p[cells], y[cells]).items()}


def _interval(point: float, samples: np.ndarray, confidence: float) -> Interval:
    """Percentile interval over the resamples where the metric is defined (not NaN)."""
    valid = samples[~np.isnan(samples)]
    if valid.size == 0:
        return Interval(point, float("nan"), float("nan"), 0)
    tail = (1 - confidence) / 2
    low, high = np.quantile(valid, [tail, 1 - tail])
    return Interval(point, float(low), float(high), int(valid.size))


def bootstrap_ci(
    probs: ArrayLike,
    labels: ArrayLike,
    subjects: ArrayLike,
    metric_fn: MetricFn | WeightedMetric,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Interval]:
    """Cluster-bootstrap percentile intervals for every metric `metric_fn` returns.

    The point estimate is `metric_fn` on the full data. Resamples where a metric is undefined
    (NaN, e.g. AUROC when only one class was drawn) are dropped for that metric; `n_valid`
    says how many remained. A `WeightedMetric` such as `BinaryMetrics` is scored vectorised;
    any other callable `(probs, labels) -> dict` is scored one resample at a time.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be positive, got {n_resamples}")
    p, y = validated_arrays(probs, labels)
    subject_ids = np.asarray(subjects)
    if subject_ids.shape != y.shape:
        raise ValueError(f"subjects shape {subject_ids.shape} does not match labels {y.shape}")
    subject_names, subject = np.unique(subject_ids, return_inverse=True)
    draws = _draw_subjects(len(subject_names), n_resamples, seed)
    scorer = _weighted_samples if isinstance(metric_fn, WeightedMetric) else _looped_samples
    batches = list(scorer(metric_fn, p, y, subject, draws))
    point = metric_fn(p, y)
    return {
        name: _interval(value, np.concatenate([b[name] for b in batches]), confidence)
        for name, value in point.items()
    }
