"""Patient-level diagnosis: each subject's cells aggregated into one score and called ALL above
a threshold chosen on the validation subjects.

A rule (:data:`RULES`) is the mean over a subject's cells of one per-cell quantity of the
calibrated P(ALL): its log-odds (``mean_log_odds``, the default: a product of the cells'
likelihood ratios), the probability itself (``mean_p``) or the call at the cell threshold
(``majority``, the share of cells called ALL). The subject threshold maximises the balanced
accuracy of the validation subjects, so that the class with more subjects does not choose it
alone. The test subjects' sensitivity and specificity get exact (Clopper-Pearson) intervals:
a handful of subjects is far too few for a normal approximation.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from scipy.stats import beta

from leukemia_mlops.data.naming import NAME_FORMAT, CellNameError, parse_cell_name
from leukemia_mlops.errors import ConfigError, InputError
from leukemia_mlops.evaluation.bootstrap import Cells
from leukemia_mlops.inference.calibrated import logit
from leukemia_mlops.labels import ALL, CLASS_NAMES, HEM

DEFAULT_RULE = "mean_log_odds"
CONFIDENCE = 0.95
INTERVAL = "Clopper-Pearson exact 95%"


class Rule(NamedTuple):
    """A subject's score: the mean of ``cell_value(calibrated p, cell threshold)`` over its
    cells; ``neutral`` is the score of no evidence either way (threshold ties go nearest it)."""

    cell_value: Callable[[np.ndarray, float], np.ndarray]
    neutral: float


RULES = {
    "mean_log_odds": Rule(lambda p, _: logit(p), 0.0),
    "mean_p": Rule(lambda p, _: p, 0.5),
    "majority": Rule(lambda p, t: (p > t).astype(np.float64), 0.5),
}


def check_rule(name: str) -> Rule:
    """The rule named ``name``, or a ConfigError listing the rules."""
    if name not in RULES:
        raise ConfigError(f"evaluate.patient_rule must be one of {sorted(RULES)}, got {name!r}")
    return RULES[name]


def subject_scores(cells: Cells, rule: Rule, cell_threshold: float) -> pd.DataFrame:
    """One row per subject, sorted: [subject, label, n_cells, score]."""
    table = pd.DataFrame(
        {
            "subject": cells.subjects,
            "label": cells.labels,
            "value": rule.cell_value(np.asarray(cells.probs, np.float64), cell_threshold),
        }
    )
    by_subject = table.groupby("subject", sort=True)
    if (by_subject["label"].nunique() > 1).any():
        raise InputError("every cell of a subject must carry that subject's label")
    return by_subject.agg(
        label=("label", "first"), n_cells=("label", "size"), score=("value", "mean")
    ).reset_index()


def choose_subject_threshold(scores: np.ndarray, labels: np.ndarray, neutral: float) -> float:
    """The threshold (ALL above it) maximising balanced accuracy over these subjects.

    Candidates: the midpoints between consecutive distinct scores, the highest score (all
    HEM) and ``neutral``; ties go to the candidate nearest ``neutral`` (the lower if two are
    equally near).
    """
    y = np.asarray(labels)
    if not ((y == ALL).any() and (y == HEM).any()):
        raise InputError("the validation split needs subjects of both classes")
    distinct = np.unique(scores)
    candidates = np.union1d(np.r_[(distinct[:-1] + distinct[1:]) / 2, distinct[-1]], neutral)
    called = scores[None, :] > candidates[:, None]
    sensitivity = called[:, y == ALL].mean(axis=1)
    specificity = (~called[:, y == HEM]).mean(axis=1)
    balanced = (sensitivity + specificity) / 2
    best = candidates[balanced >= balanced.max() - 1e-12]
    return float(best[np.argmin(np.abs(best - neutral))])


def clopper_pearson(k: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The exact two-sided interval of a proportion of ``k`` in ``n`` (NaN bounds when n = 0)."""
    if n == 0:
        return np.nan, np.nan
    tail = (1 - confidence) / 2
    low = beta.ppf(tail, k, n - k + 1) if k > 0 else 0.0
    high = beta.ppf(1 - tail, k + 1, n - k) if k < n else 1.0
    return float(low), float(high)


def _proportion(name: str, hits: np.ndarray) -> dict[str, float]:
    k, n = int(hits.sum()), int(hits.size)
    low, high = clopper_pearson(k, n)
    return {name: k / n if n else np.nan, f"{name}_low": low, f"{name}_high": high}


def patient_report(
    val: Cells, test: Cells, rule_name: str, cell_threshold: float
) -> tuple[dict[str, Any], pd.DataFrame]:
    """The ``patient`` section and the per-subject table of both splits (calibrated
    probabilities; ``cell_threshold`` on the same scale, for the ``majority`` rule): [subject,
    split, label, n_cells, score, prediction]."""
    rule = check_rule(rule_name)
    tables = {
        split: subject_scores(cells, rule, cell_threshold).assign(split=split)
        for split, cells in (("val", val), ("test", test))
    }
    threshold = choose_subject_threshold(
        tables["val"]["score"].to_numpy(), tables["val"]["label"].to_numpy(), rule.neutral
    )
    table = pd.concat(tables.values(), ignore_index=True)
    table["prediction"] = (table["score"] > threshold).astype(np.int64)
    table = table[["subject", "split", "label", "n_cells", "score", "prediction"]]
    tested = table[table["split"] == "test"]
    called = tested["prediction"].to_numpy()
    truth = tested["label"].to_numpy()
    return {
        "rule": rule_name,
        "threshold": threshold,
        "threshold_chosen_on": "validation subjects",
        **_proportion("sensitivity", called[truth == ALL] == ALL),
        "n_all_subjects": int((truth == ALL).sum()),
        **_proportion("specificity", called[truth == HEM] == HEM),
        "n_hem_subjects": int((truth == HEM).sum()),
        "interval": INTERVAL,
    }, table


def file_subjects(files: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The subject and label each C-NMC file name carries (``""`` and -1 where it carries
    none); an InputError when no name carries one."""
    subjects, labels = [], []
    for file in files:
        try:
            name = parse_cell_name(Path(file).name)
        except CellNameError:
            subjects.append("")
            labels.append(-1)
        else:
            subjects.append(name.subject)
            labels.append(name.label)
    if not any(subjects):
        raise InputError(
            f"--by-subject: no file name carries a subject (C-NMC names: {NAME_FORMAT}.bmp)"
        )
    return np.array(subjects, dtype=object), np.array(labels, dtype=np.int64)


def diagnose_files(
    files: list[str],
    probs: np.ndarray,
    cell_threshold: float,
    patient: dict[str, Any] | None,
) -> pd.DataFrame:
    """One row per subject named by the files (``predict --by-subject``): [subject,
    label_in_names, n_cells, rule, score, threshold, diagnosis].

    ``probs`` are the files' P(ALL) as ``predict`` wrote it; files not scored (NaN) and files
    whose names carry no subject are left out. ``patient`` is the evaluation's ``patient``
    section (its rule and validated threshold); None: the default rule and no diagnosis.
    """
    subjects, labels = file_subjects(files)
    kept = (subjects != "") & ~np.isnan(probs)
    rule = patient["rule"] if patient else DEFAULT_RULE
    cells = Cells(probs[kept], labels[kept], subjects[kept])
    table = subject_scores(cells, check_rule(rule), cell_threshold)
    threshold = patient["threshold"] if patient else np.nan
    called = np.where(table["score"] > threshold, CLASS_NAMES[ALL], CLASS_NAMES[HEM])
    return pd.DataFrame(
        {
            "subject": table["subject"],
            "label_in_names": [CLASS_NAMES[label] for label in table["label"]],
            "n_cells": table["n_cells"],
            "rule": rule,
            "score": table["score"],
            "threshold": threshold,
            "diagnosis": called if patient else "",
        }
    )
