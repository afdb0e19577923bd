"""The paired comparison of two models and the guard against a model ranking backwards."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from MLstatkit import Delong_test
from scipy.special import expit
from scipy.stats import norm

from leukemia_mlops.evaluation.metrics import binary_metrics, choose_threshold
from leukemia_mlops.evaluation.paired import (
    NO_DIFFERENCE,
    Scores,
    aligned_test_cells,
    comparison_report,
    paired_intervals,
    tuning_comparison,
    verdict,
)
from leukemia_mlops.evaluation.ranking_guard import INVERTED, inverted_ranking
from leukemia_mlops.evaluation.seeds import expected_max, probability_better, seed_spread
from leukemia_mlops.models.metrics import MONITOR

BOOTSTRAP = {"n_resamples": 2000, "confidence": 0.95, "seed": 0, "min_subjects": 5}


def two_models(n: int, subject_effect: float = 0.0, seed: int = 0):
    """Labels, subjects (``n // 10`` cells each) and two correlated models' probabilities; a
    subject effect of each model shifts every cell of a subject alike (clustered cells: a
    model that fails on a subject fails on all its cells)."""
    rng = np.random.default_rng(seed)
    n_subjects = n // 10
    subject_label = np.arange(n_subjects) % 2
    subjects = np.repeat(np.arange(n_subjects), 10)
    labels = subject_label[subjects]
    shared = rng.normal(0, 1, n)

    def model(signal: float) -> np.ndarray:
        effect = subject_effect * rng.normal(0, 1, n_subjects)[subjects]
        return expit(signal * labels + shared + effect + rng.normal(0, 0.6, n))

    a, b = model(1.2), model(0.9)
    return labels, subjects, a, b


def delong_interval(labels, a, b) -> tuple[float, float, float]:
    """AUROC(a) - AUROC(b) and its 95% normal interval from DeLong's paired test."""
    z, _, auc_a, auc_b = Delong_test(labels, a, b, return_ci=False, return_auc=True)
    difference = auc_a - auc_b
    se = abs(difference / z)
    half = norm.ppf(0.975) * se
    return difference, difference - half, difference + half


def test_paired_interval_agrees_with_delong_on_independent_cells():
    """Each cell its own subject (no clustering): the subject bootstrap of the AUROC
    difference matches DeLong's paired interval, an independent computation."""
    labels, _, a, b = two_models(1000)
    cells = np.arange(labels.size)
    intervals = paired_intervals(Scores("a", a, 0.5), Scores("b", b, 0.5), labels, cells, BOOTSTRAP)
    point, low, high = delong_interval(labels, a, b)
    auroc = intervals["auroc"]
    assert auroc.point == pytest.approx(point, abs=1e-9)
    assert (auroc.pct_low, auroc.pct_high) == pytest.approx((low, high), abs=0.008)
    assert (auroc.bca_low, auroc.bca_high) == pytest.approx((low, high), abs=0.008)


def test_clustered_cells_widen_the_subject_interval_beyond_delongs():
    """DeLong treats cells as independent; with a subject effect the subject bootstrap,
    which resamples subjects, is wider, as clustered data demand."""
    labels, subjects, a, b = two_models(1000, subject_effect=1.5)
    intervals = paired_intervals(
        Scores("a", a, 0.5), Scores("b", b, 0.5), labels, subjects, BOOTSTRAP
    )
    _, low, high = delong_interval(labels, a, b)
    assert intervals["auroc"].pct_high - intervals["auroc"].pct_low > 1.3 * (high - low)


def test_identical_models_differ_by_nothing_and_get_no_verdict():
    labels, subjects, a, _ = two_models(400)
    report = comparison_report(
        Scores("CNN", a, 0.5),
        Scores("detector", a, 0.5),
        pd.DataFrame({"subject": subjects, "label": labels, "prob_a": a, "prob_b": a}),
        BOOTSTRAP,
    )
    for name in ("auroc", "f1_weighted", "balanced_accuracy"):
        assert report[name]["bca_low"] <= 0 <= report[name]["bca_high"]
        assert report[name]["point"] == 0
    assert report["verdict"] == NO_DIFFERENCE


def test_a_clearly_better_model_wins_whichever_side_it_is_on():
    labels, subjects, a, _ = two_models(400)
    noise = np.random.default_rng(1).uniform(0, 1, labels.size)  # a model that guesses
    cells = pd.DataFrame({"subject": subjects, "label": labels, "prob_a": a, "prob_b": noise})
    report = comparison_report(
        Scores("CNN", a, 0.5), Scores("detector", noise, 0.5), cells, BOOTSTRAP
    )
    assert report["auroc"]["bca_low"] > 0
    assert report["verdict"] == "CNN better"
    swapped = cells.rename(columns={"prob_a": "prob_b", "prob_b": "prob_a"})
    report = comparison_report(
        Scores("CNN", noise, 0.5), Scores("detector", a, 0.5), swapped, BOOTSTRAP
    )
    assert report["verdict"] == "detector better"


def test_verdict_needs_an_interval():
    from leukemia_mlops.evaluation.bootstrap import Interval

    nan = float("nan")
    assert verdict(Interval(0.3, nan, nan, nan, nan, 0), "a", "b") == NO_DIFFERENCE


def predictions(paths: list[str], probs: list[float], labels: list[int]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "path": paths,
            "subject": ["s"] * len(paths),
            "split": "test",
            "label": labels,
            "prob_all": probs,
        }
    )


def test_cells_are_paired_by_path_not_by_row_order():
    a = predictions(["x", "y"], [0.9, 0.2], [1, 0])
    b = predictions(["y", "x"], [0.4, 0.7], [0, 1])
    cells = aligned_test_cells(a, b)
    assert cells["prob_a"].tolist() == [0.9, 0.2]
    assert cells["prob_b"].tolist() == [0.7, 0.4]
    with pytest.raises(ValueError, match="same test cells"):
        aligned_test_cells(a, predictions(["x", "z"], [0.1, 0.2], [1, 0]))


def report(val_auroc: float, test_auroc: float, high: float | None) -> dict:
    return {
        "val_selection": {"auroc": val_auroc},
        "test": {"auroc": test_auroc, "auroc_bca_high": high},
    }


def test_the_guard_flags_a_model_ranking_backwards_on_either_split():
    assert inverted_ranking(report(0.8, 0.9, 0.95)) == []
    [val] = inverted_ranking(report(0.37, 0.9, 0.95))
    assert val.startswith("validation AUROC 0.370") and INVERTED in val
    # Test: the interval must lie wholly below 0.5 where there is one.
    assert inverted_ranking(report(0.8, 0.45, 0.55)) == []
    [test] = inverted_ranking(report(0.8, 0.391, 0.449))
    assert test.startswith("test AUROC 0.391 (BCa 95% upper bound 0.449)")
    # Without an interval (too few subjects), the point estimate decides.
    assert len(inverted_ranking(report(0.8, 0.45, None))) == 1


def test_probability_better_counts_pairs_and_halves_ties():
    assert probability_better([0.9, 0.8], [0.7, 0.6]) == 1.0
    assert probability_better([0.7, 0.6], [0.9, 0.8]) == 0.0
    assert probability_better([0.8, 0.6], [0.7, 0.6]) == pytest.approx((1 + 1 + 0 + 0.5) / 4)


def test_expected_max_matches_its_definition_and_simulation():
    values = [0.6, 0.7, 0.9]
    assert expected_max(values, 1) == pytest.approx(np.mean(values))
    # Best of two draws: 0.9 unless both draws miss it (4/9), then 0.7 unless both are 0.6.
    assert expected_max(values, 2) == pytest.approx(0.9 * 5 / 9 + 0.7 * 3 / 9 + 0.6 / 9)
    draws = np.random.default_rng(0).choice(values, size=(200_000, 4)).max(axis=1)
    assert expected_max(values, 4) == pytest.approx(draws.mean(), abs=0.002)
    assert expected_max(values, 50) == pytest.approx(0.9, abs=1e-6)


def test_seed_spread_sets_seeds_beside_the_bootstrap_width():
    runs = pd.DataFrame(
        {
            "model": ["model"] * 3 + ["detector"] * 3,
            "seed": [0, 1, 2] * 2,
            "test_auroc": [0.80, 0.82, 0.84, 0.70, 0.75, 0.80],
            "test_auroc_width": [0.1, 0.12, 0.14, 0.2, 0.2, 0.2],
        }
    )
    spread = seed_spread(runs, "test_auroc")
    assert list(spread.index) == ["model", "detector"]
    assert spread.loc["model", "sd"] == pytest.approx(0.02)
    assert spread.loc["detector", "mean"] == pytest.approx(0.75)
    assert spread.loc["model", "bootstrap_width"] == pytest.approx(0.12)
    assert spread.loc["detector", "seeds"] == 3


def test_the_monitored_metric_picks_the_better_checkpoint_where_f1_at_half_does_not():
    """Two checkpoints of one run, as training sees them after two epochs: the later one ranks
    cells better but its probabilities still sit below 0.5 (the head's calibration lags, as on
    5 validation subjects it does from epoch to epoch). Weighted F1 at 0.5 prefers the earlier
    one; AUROC, the monitor, prefers the later one, which is better on held-out cells at any
    threshold chosen on validation."""
    rng = np.random.default_rng(0)

    def cells(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        labels = rng.integers(0, 2, n)
        earlier = expit(0.8 * (2 * labels - 1) + rng.normal(0, 1.0, n))
        later = expit(2.0 * (2 * labels - 1) + rng.normal(0, 1.0, n) - 2.5)  # shifted low
        return labels, earlier, later

    labels, earlier, later = cells(150)
    by_f1 = {name: binary_metrics(p, labels)["f1_weighted"] for name, p in
             (("earlier", earlier), ("later", later))}  # fmt: skip
    by_monitor = {name: binary_metrics(p, labels)["auroc"] for name, p in
                  (("earlier", earlier), ("later", later))}  # fmt: skip
    assert max(by_f1, key=by_f1.get) == "earlier"
    assert max(by_monitor, key=by_monitor.get) == "later"
    test_labels, test_earlier, test_later = cells(5000)
    scores = {
        name: binary_metrics(test_p, test_labels, choose_threshold(val_p, labels))["f1_weighted"]
        for name, val_p, test_p in (
            ("earlier", earlier, test_earlier),
            ("later", later, test_later),
        )
    }
    assert scores["later"] > scores["earlier"] + 0.05
    assert MONITOR == "val/auroc"


BUDGET = {"n_trials": 3, "trial_epochs": 4, "sampler": {"_target_": "TPESampler", "seed": 42}}


def test_two_campaigns_of_the_same_budget_are_tuned_alike():
    tuning = tuning_comparison({"CNN": BUDGET, "detector": {**BUDGET, "search_space": "yolo"}})
    assert tuning["alike"] is True
    assert tuning["note"].startswith("tuned alike: 3 trials of 4 epochs each")


@pytest.mark.parametrize("key", ["n_trials", "trial_epochs", "sampler"])
def test_a_budget_that_differs_is_named(key):
    tuning = tuning_comparison({"CNN": BUDGET, "detector": {**BUDGET, key: None}})
    assert tuning["alike"] is False
    assert tuning["note"] == f"tuned unlike: their {key} differ"


def test_an_untuned_model_is_named():
    tuning = tuning_comparison({"CNN": BUDGET, "detector": None})
    assert (tuning["alike"], tuning["note"]) == (False, "not tuned: detector")
