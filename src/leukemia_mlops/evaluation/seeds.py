"""How much of a comparison is the seed: spread over training seeds, P(A > B), expected max.

Bouthillier et al. (MLSys 2021) show that the variation between training runs can rival the
differences a comparison reports, and recommend deciding by the probability that one method
beats the other over randomised runs; Dodge et al. (EMNLP 2019) report the expected best
validation score against the number of tuning trials. These are their estimators, over the
per-seed results that ``lmo-compare-seeds`` collects.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd


def probability_better(a: Sequence[float], b: Sequence[float]) -> float:
    """P(A > B) over every pair of one run of A and one of B (ties count half): the
    Mann-Whitney estimate Bouthillier et al. recommend deciding by."""
    x, y = np.asarray(a, float)[:, None], np.asarray(b, float)[None, :]
    return float(((x > y) + 0.5 * (x == y)).mean())


def expected_max(values: Sequence[float], n: int) -> float:
    """Dodge et al.'s expected best of ``n`` trials drawn with replacement from ``values``
    (the trials a study ran): ``sum_i v_(i) * ((i/N)^n - ((i-1)/N)^n)`` over sorted values."""
    ordered = np.sort(np.asarray(values, float))
    if ordered.size == 0 or n < 1:
        raise ValueError("expected_max needs at least one value and n >= 1")
    share = np.arange(ordered.size + 1) / ordered.size
    return float((ordered * (share[1:] ** n - share[:-1] ** n)).sum())


def seed_spread(results: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per model: ``metric``'s mean, standard deviation (ddof 1), min and max over seeds,
    beside the mean width of one run's subject-bootstrap interval (``<metric>_width``), so a
    reader sees whether seeds or subjects dominate the uncertainty."""
    grouped = results.groupby("model", sort=False)
    return pd.DataFrame(
        {
            "seeds": grouped["seed"].nunique(),
            "mean": grouped[metric].mean(),
            "sd": grouped[metric].std(ddof=1),
            "min": grouped[metric].min(),
            "max": grouped[metric].max(),
            "bootstrap_width": grouped[f"{metric}_width"].mean(),
        }
    )
