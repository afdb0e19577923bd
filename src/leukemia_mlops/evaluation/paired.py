"""The comparison of two models on the same test cells: paired differences and a verdict.

Each model gets its own interval elsewhere; two overlapping intervals say nothing about the
difference, because both models are scored on the same subjects and their errors correlate.
Here every bootstrap replicate draws one set of subjects (stratified by class, as for a single
model) and scores both models on it, so the interval of ``metric(a) - metric(b)`` carries that
correlation. Subjects are the resampled unit, so the interval respects the clustering of cells
within a subject, which DeLong's paired test (the cell-level reference the tests check the
point estimate against) ignores.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from leukemia_mlops.evaluation.bootstrap import Interval, subject_intervals, subject_labels
from leukemia_mlops.evaluation.metrics import BinaryMetrics, validated_arrays

#: The differences reported, first the one the verdict follows (threshold-free, smooth).
DIFFERENCES = ("auroc", "f1_weighted", "balanced_accuracy")
VERDICT_METRIC = "auroc"
NO_DIFFERENCE = "no difference shown at this sample size"


class Scores(NamedTuple):
    """One model's probabilities of ALL for the compared cells and its decision threshold."""

    name: str
    probs: np.ndarray
    threshold: float


def paired_intervals(
    a: Scores,
    b: Scores,
    labels: np.ndarray,
    subjects: np.ndarray,
    bootstrap: Mapping[str, Any],
) -> dict[str, Interval]:
    """Stratified subject-bootstrap intervals of ``metric(a) - metric(b)`` for each of
    :data:`DIFFERENCES`, both models scored on the same resampled subjects in every replicate.
    ``bootstrap`` holds :func:`subject_intervals`' keyword arguments."""
    p_a, y = validated_arrays(a.probs, labels)
    p_b, _ = validated_arrays(b.probs, labels)
    subject_names, subject = np.unique(np.asarray(subjects), return_inverse=True)
    label_of = subject_labels(y, subject, subject_names.size)
    metric_a, metric_b = BinaryMetrics(a.threshold), BinaryMetrics(b.threshold)

    def score(counts: np.ndarray) -> dict[str, np.ndarray]:
        weights = counts[:, subject]
        scored_a = metric_a.weighted(p_a, y, weights)
        scored_b = metric_b.weighted(p_b, y, weights)
        return {name: scored_a[name] - scored_b[name] for name in DIFFERENCES}

    return subject_intervals(score, label_of, **bootstrap)


def verdict(difference: Interval, a: str, b: str) -> str:
    """What the interval of ``a - b`` supports: ``"<a> better"``, ``"<b> better"`` or
    :data:`NO_DIFFERENCE` (the interval holds 0, or there is no interval)."""
    if difference.bca_low > 0:
        return f"{a} better"
    if difference.bca_high < 0:
        return f"{b} better"
    return NO_DIFFERENCE


def aligned_test_cells(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """Both models' test predictions (``predictions.csv`` tables) joined cell by cell, with
    columns ``label``, ``subject``, ``prob_a`` and ``prob_b``; refuses tables of other cells."""
    keep = ["path", "subject", "label", "prob_all"]
    test_a = a.loc[a["split"] == "test", keep].set_index("path")
    test_b = b.loc[b["split"] == "test", keep].set_index("path")
    if set(test_a.index) != set(test_b.index):
        raise ValueError("the two models were not scored on the same test cells")
    joined = test_a.merge(test_b, left_index=True, right_index=True, suffixes=("_a", "_b"))
    if (joined["label_a"] != joined["label_b"]).any():
        raise ValueError("the two prediction tables disagree on a test cell's label")
    return pd.DataFrame(
        {
            "subject": joined["subject_a"].to_numpy(),
            "label": joined["label_a"].to_numpy(),
            "prob_a": joined["prob_all_a"].to_numpy(),
            "prob_b": joined["prob_all_b"].to_numpy(),
        }
    )


def comparison_report(
    a: Scores, b: Scores, cells: pd.DataFrame, bootstrap: Mapping[str, Any]
) -> dict[str, Any]:
    """The paired differences ``a - b`` with percentile and BCa bounds, and the verdict."""
    intervals = paired_intervals(
        a._replace(probs=cells["prob_a"].to_numpy()),
        b._replace(probs=cells["prob_b"].to_numpy()),
        cells["label"].to_numpy(),
        cells["subject"].to_numpy(),
        bootstrap,
    )
    report: dict[str, Any] = {"a": a.name, "b": b.name, "difference": f"{a.name} - {b.name}"}
    for name, ci in intervals.items():
        report[name] = {"point": ci.point, "pct_low": ci.pct_low, "pct_high": ci.pct_high}
        report[name] |= {f"{ci.adjusted}_low": ci.bca_low, f"{ci.adjusted}_high": ci.bca_high}
        report[name] |= {"n_valid": ci.n_valid, "bc_reason": ci.bc_reason}
    decisive = intervals[VERDICT_METRIC]
    report["verdict"] = verdict(decisive, a.name, b.name)
    method = {"bca": "BCa", "bc": "BC"}[decisive.adjusted]
    report["verdict_by"] = f"the {method} 95% interval of the {VERDICT_METRIC} difference"
    return report


#: What two tuning campaigns must share to count as alike (each family has its own space).
SHARED_BUDGET = ("n_trials", "trial_epochs", "sampler")


def tuning_comparison(budgets: Mapping[str, Mapping[str, Any] | None]) -> dict[str, Any]:
    """How each compared model was tuned (name -> its sweep's budget; None: not tuned) and
    whether alike: the same trials, epochs of a trial and sampler. ``note`` says what differs."""
    untuned = [name for name, budget in budgets.items() if not budget]
    differ = [
        key
        for key in SHARED_BUDGET
        if len({repr(budget.get(key)) for budget in budgets.values() if budget}) > 1
    ]
    if untuned:
        note = f"not tuned: {', '.join(untuned)}"
    elif differ:
        note = f"tuned unlike: their {', '.join(differ)} differ"
    else:
        first = next(iter(budgets.values()))
        note = (
            f"tuned alike: {first['n_trials']} trials of {first['trial_epochs']} epochs each, "
            "one sampler, each family its own search space"
        )
    return {"alike": not (untuned or differ), "note": note, "budgets": dict(budgets)}
