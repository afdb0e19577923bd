"""The guard against a model that ranks the classes backwards.

An AUROC below 0.5 is a bug until proven otherwise: inverted labels, a swapped class index or a
scorer reading the wrong output. Every evaluation report is checked, and what it finds goes into
``metrics.json`` (``warnings``), the log and the MLflow run, so that no headline prints such a
model next to the others as if it were a result.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

INVERTED = "ranks the classes the wrong way round: labels or scoring inverted?"
#: The report sections checked: the validation split has no interval, the test split does
#: where it has enough subjects.
SECTIONS = {"val_selection": "validation", "test": "test"}


def inverted_ranking(report: Mapping[str, Any]) -> list[str]:
    """One warning per split whose AUROC lies below 0.5: on validation its point estimate; on
    test its BCa interval's upper bound where there is an interval, else its point estimate."""
    warnings = []
    for section, split in SECTIONS.items():
        scores = report.get(section) or {}
        auroc, high = scores.get("auroc"), scores.get("auroc_bca_high")
        if auroc is None:
            continue
        below = high < 0.5 if high is not None else auroc < 0.5
        if below:
            bounds = "" if high is None else f" (BCa 95% upper bound {high:.3f})"
            warnings.append(f"{split} AUROC {auroc:.3f}{bounds}: {INVERTED}")
    return warnings
