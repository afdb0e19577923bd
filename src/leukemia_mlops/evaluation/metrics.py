"""Cell-level metrics for ALL (label 1, the positive class) vs HEM (label 0).

`binary_metrics` is the reference: every value comes from torchmetrics' functional API so the
numbers match what the training loop logs. `metrics_from_counts` and `weighted_binary_metrics`
compute the same values for many thresholds or resamples at once (threshold search, bootstrap);
the tests hold them equal to `binary_metrics`.

A cell is called ALL when its probability is strictly greater than the threshold, as torchmetrics
does. Ratios that are undefined on the data (sensitivity without ALL cells, AUROC with one class)
are NaN rather than torchmetrics' silent 0, so they cannot pass for a real result.

Two calibration errors, both L1 over 15 equal-width bins, answer different questions:
``top_label_ece`` is the top-label (confidence) ECE papers report: each cell's confidence
max(p, 1 - p) against whether its argmax call (ALL when p > 0.5, whatever threshold the other
metrics use) is right. ``p_all_ece`` is the calibration error of P(ALL) itself: each bin's mean
P(ALL) against its observed share of ALL cells.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch
from torchmetrics.functional.classification import (
    binary_accuracy,
    binary_auroc,
    binary_average_precision,
    binary_calibration_error,
    binary_precision,
    multiclass_calibration_error,
    multiclass_f1_score,
    multiclass_recall,
)

from leukemia_mlops.errors import InputError

ArrayLike = np.ndarray | torch.Tensor
ECE_BINS = 15
CONFUSION_METRICS = (
    "f1_weighted",
    "accuracy",
    "balanced_accuracy",
    "sensitivity",
    "specificity",
    "precision",
)


def _to_numpy(values: ArrayLike) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def as_labels(labels: ArrayLike) -> np.ndarray:
    """1-D int64 labels, checked to be 0/1 so a stray class index cannot skew the counts."""
    y = _to_numpy(labels)
    if y.ndim != 1 or y.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D array, got shape {y.shape}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 (HEM) or 1 (ALL)")
    return y.astype(np.int64)


def validated_arrays(probs: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Float64 probabilities and int64 labels of equal length.

    Probabilities outside [0, 1] are rejected: torchmetrics would silently treat them as logits.
    """
    y = as_labels(labels)
    p = _to_numpy(probs).astype(np.float64)
    if p.shape != y.shape:
        raise ValueError(f"probs shape {p.shape} does not match labels shape {y.shape}")
    if not (np.isfinite(p).all() and (p >= 0).all() and (p <= 1).all()):
        raise ValueError("probs must be probabilities of ALL in [0, 1]")
    return p, y


def binary_metrics(probs: ArrayLike, labels: ArrayLike, threshold: float = 0.5) -> dict[str, float]:
    """All cell-level metrics at one decision threshold, through torchmetrics.

    `f1_weighted` (per-class F1 weighted by class support) is the C-NMC challenge metric.
    """
    p_np, y_np = validated_arrays(probs, labels)
    p, y = torch.from_numpy(p_np), torch.from_numpy(y_np)
    preds = (p > threshold).long()
    recall = multiclass_recall(preds, y, num_classes=2, average="none", zero_division=np.nan)
    values = {
        "f1_weighted": multiclass_f1_score(preds, y, num_classes=2, average="weighted"),
        "accuracy": binary_accuracy(preds, y),
        "balanced_accuracy": recall.mean(),
        "sensitivity": recall[1],
        "specificity": recall[0],
        "precision": binary_precision(preds, y, zero_division=np.nan),
        **_ranking_metrics(p, y),
        "top_label_ece": top_label_ece(p, y),
        "p_all_ece": p_all_ece(p, y),
    }
    return {name: float(value) for name, value in values.items()}


def top_label_ece(p: torch.Tensor, y: torch.Tensor, n_bins: int = ECE_BINS) -> torch.Tensor:
    """Top-label (confidence) ECE: torchmetrics' multiclass form on the rows [1 - p, p], so the
    call is the argmax (ALL when p > 0.5; HEM on a tie) and the confidence max(p, 1 - p)."""
    two_class = torch.stack([1 - p, p], dim=1)
    return multiclass_calibration_error(two_class, y, num_classes=2, n_bins=n_bins, norm="l1")


def p_all_ece(p: torch.Tensor, y: torch.Tensor, n_bins: int = ECE_BINS) -> torch.Tensor:
    """Calibration error of P(ALL): per bin of P(ALL), |mean P(ALL) - observed ALL share|,
    weighted by the bin's share of cells (torchmetrics' binary form)."""
    return binary_calibration_error(p, y, n_bins=n_bins, norm="l1")


def _ranking_metrics(p: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor | float]:
    """AUROC and average precision; NaN when one class is absent and ranking means nothing."""
    if y.unique().numel() < 2:
        return {"auroc": float("nan"), "auprc": float("nan")}
    return {"auroc": binary_auroc(p, y), "auprc": binary_average_precision(p, y)}


def calibration_bin_index(probs: np.ndarray, n_bins: int = ECE_BINS) -> np.ndarray:
    """Each probability's bin exactly as torchmetrics' ECE assigns it, in the dtype of ``probs``
    (torchmetrics bins P(ALL) as given, float64 here, and top-label confidences in float32).

    Bins are [k/n, (k+1)/n); torchmetrics gives a probability of exactly 1.0 its own bin n.
    """
    p = torch.as_tensor(probs)
    edges = torch.linspace(0, 1, n_bins + 1, dtype=p.dtype)
    return (torch.bucketize(p, edges, right=True) - 1).numpy()


def _ratio(num: np.ndarray, den: np.ndarray, undefined: float = np.nan) -> np.ndarray:
    out = np.full(np.broadcast(num, den).shape, undefined)
    return np.divide(num, den, out=out, where=den > 0)


def metrics_from_counts(
    tp: ArrayLike, fp: ArrayLike, fn: ArrayLike, tn: ArrayLike
) -> dict[str, np.ndarray]:
    """The confusion-matrix metrics of `binary_metrics` for arrays of counts at once.

    Counts may be fractional (weighted cells). A class's F1 is 0 when it is absent from both
    labels and predictions, as in torchmetrics; it then carries no weight anyway.
    """
    tp, fp, fn, tn = (np.asarray(c, dtype=np.float64) for c in (tp, fp, fn, tn))
    sensitivity = _ratio(tp, tp + fn)
    specificity = _ratio(tn, tn + fp)
    f1_all = _ratio(2 * tp, 2 * tp + fp + fn, undefined=0.0)
    f1_hem = _ratio(2 * tn, 2 * tn + fn + fp, undefined=0.0)
    n = tp + fp + fn + tn
    return {
        "f1_weighted": (f1_all * (tp + fn) + f1_hem * (tn + fp)) / n,
        "accuracy": (tp + tn) / n,
        "balanced_accuracy": (sensitivity + specificity) / 2,
        "sensitivity": sensitivity,
        "specificity": specificity,
        "precision": _ratio(tp, tp + fp),
    }


def _confusion_indicators(preds: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(n, 4) one-hot of each cell's confusion cell in (tp, fp, fn, tn) order."""
    called, positive = preds.astype(bool), labels.astype(bool)
    cells = [called & positive, called & ~positive, ~called & positive, ~called & ~positive]
    return np.stack(cells, axis=1).astype(np.float64)


def weighted_binary_metrics(
    probs: ArrayLike, labels: ArrayLike, weights: np.ndarray, threshold: float = 0.5
) -> dict[str, np.ndarray]:
    """`binary_metrics` for many weightings of one data set at once.

    Row b of `weights` (shape (B, n)) counts cell i `weights[b, i]` times, so a bootstrap
    resample is one row and B resamples cost a few matrix products instead of B torchmetrics
    passes. Returns arrays of shape (B,).
    """
    p, y = validated_arrays(probs, labels)
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 2 or w.shape[1] != p.size:
        raise ValueError(f"weights must have shape (B, {p.size}), got {w.shape}")
    tp, fp, fn, tn = (w @ _confusion_indicators(p > threshold, y)).T
    confidence = np.maximum(p, 1 - p).astype(np.float32)  # as torchmetrics' top-label form
    right = ((p > 0.5) == y).astype(np.float64)
    return {
        **metrics_from_counts(tp, fp, fn, tn),
        **_weighted_ranking_metrics(p, y, w),
        "top_label_ece": _weighted_ece(confidence, right, w),
        "p_all_ece": _weighted_ece(p, y, w),
    }


def _weighted_ranking_metrics(p: np.ndarray, y: np.ndarray, w: np.ndarray) -> dict[str, np.ndarray]:
    """AUROC (Mann-Whitney, ties count half) and step-wise average precision per weighting."""
    order = np.argsort(-p, kind="stable")
    ranked = p[order]
    tie_starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])
    w_ranked = w[:, order]
    pos = np.add.reduceat(w_ranked * y[order], tie_starts, axis=1)
    neg = np.add.reduceat(w_ranked * (1 - y[order]), tie_starts, axis=1)
    n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
    tp, fp = np.cumsum(pos, axis=1), np.cumsum(neg, axis=1)
    neg_ranked_lower = n_neg[:, None] - fp
    pairs_won = (pos * (neg_ranked_lower + 0.5 * neg)).sum(axis=1)
    precision = _ratio(tp, tp + fp, undefined=0.0)
    both_classes = (n_pos > 0) & (n_neg > 0)
    return {
        "auroc": _ratio(pairs_won, np.where(both_classes, n_pos * n_neg, 0)),
        "auprc": _ratio((pos * precision).sum(axis=1), np.where(both_classes, n_pos, 0)),
    }


def _weighted_ece(scores: np.ndarray, hits: np.ndarray, w: np.ndarray) -> np.ndarray:
    """L1 calibration error of ``scores`` (claimed probabilities) against ``hits`` (0/1 events)
    per weighting: the sum over bins of |sum(score) - sum(hit)| / n."""
    in_bin = np.zeros((scores.size, ECE_BINS + 1))
    in_bin[np.arange(scores.size), calibration_bin_index(scores)] = 1.0
    gap = w @ (in_bin * scores[:, None]) - w @ (in_bin * hits[:, None])
    return np.abs(gap).sum(axis=1) / w.sum(axis=1)


class UnitWeightCall(ABC):
    """Metrics whose plain call is their weighted form at unit weights (one resample)."""

    def __call__(self, probs: ArrayLike, labels: ArrayLike) -> dict[str, float]:
        p, _ = validated_arrays(probs, labels)
        values = self.weighted(probs, labels, np.ones((1, p.size)))
        return {name: float(value[0]) for name, value in values.items()}

    @abstractmethod
    def weighted(
        self, probs: ArrayLike, labels: ArrayLike, weights: np.ndarray
    ) -> dict[str, np.ndarray]:
        """Each metric per row of ``weights`` (resamples x cells)."""


@dataclass(frozen=True)
class BinaryMetrics:
    """`binary_metrics` at a fixed threshold, with the weighted form the bootstrap vectorises."""

    threshold: float = 0.5

    def __call__(self, probs: ArrayLike, labels: ArrayLike) -> dict[str, float]:
        return binary_metrics(probs, labels, self.threshold)

    def weighted(
        self, probs: ArrayLike, labels: ArrayLike, weights: np.ndarray
    ) -> dict[str, np.ndarray]:
        return weighted_binary_metrics(probs, labels, weights, self.threshold)


def _counts_at_thresholds(
    p: np.ndarray, y: np.ndarray, thresholds: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(tp, fp, fn, tn) at every threshold from two sorted searches instead of a pass each."""
    pos, neg = np.sort(p[y == 1]), np.sort(p[y == 0])
    tp = pos.size - np.searchsorted(pos, thresholds, side="right")
    fp = neg.size - np.searchsorted(neg, thresholds, side="right")
    return tp, fp, pos.size - tp, neg.size - fp


def choose_threshold(probs: ArrayLike, labels: ArrayLike, metric: str = "f1_weighted") -> float:
    """The threshold maximising `metric` on these (validation) data.

    Candidates are the unique probabilities plus 0.5: with cells called ALL strictly above the
    threshold, they realise every distinct split except "all cells ALL". Ties go to the
    candidate nearest 0.5 (the lower one if two are equally near), so the result is
    deterministic and moves away from the default only when the data ask for it.
    """
    if metric not in CONFUSION_METRICS:
        raise ValueError(f"metric must be one of {CONFUSION_METRICS}, got {metric!r}")
    p, y = validated_arrays(probs, labels)
    candidates = np.union1d(p, 0.5)
    scores = metrics_from_counts(*_counts_at_thresholds(p, y, candidates))[metric]
    if np.isnan(scores).all():
        raise InputError(f"{metric} is undefined on these data (is a class missing?)")
    best = candidates[scores >= np.nanmax(scores) - 1e-12]
    return float(best[np.argmin(np.abs(best - 0.5))])
