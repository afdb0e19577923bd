"""Report figures: valid PNG files and the DVC tables behind them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from leukemia_mlops.evaluation.plots import (
    confusion_matrix_plot,
    image_grid,
    pr_curve_plot,
    reliability_plot,
    roc_curve_plot,
)

REPO = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(0)
LABELS = RNG.integers(0, 2, 200)
PROBS = np.round(np.clip(RNG.normal(0.35 + 0.3 * LABELS, 0.2), 0, 1), 2)


def _assert_png(path: Path) -> None:
    assert path.stat().st_size > 0
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()


def test_confusion_matrix_png(tmp_path):
    path = confusion_matrix_plot(LABELS, (PROBS > 0.5).astype(int), tmp_path / "cm" / "cm.png")
    assert path == tmp_path / "cm" / "cm.png"
    _assert_png(path)


def test_confusion_matrix_rejects_probabilities_as_predictions(tmp_path):
    with pytest.raises(ValueError):
        confusion_matrix_plot(LABELS, PROBS, tmp_path / "cm.png")


def test_roc_curve_table_and_png(tmp_path):
    table = roc_curve_plot(PROBS, LABELS, tmp_path / "roc.png")
    _assert_png(tmp_path / "roc.png")
    assert list(table.columns) == ["fpr", "tpr", "threshold"]
    assert (np.diff(table["fpr"]) >= 0).all()
    assert (np.diff(table["tpr"]) >= 0).all()
    assert table.iloc[0][["fpr", "tpr"]].tolist() == [0.0, 0.0]
    assert table.iloc[-1][["fpr", "tpr"]].tolist() == [1.0, 1.0]


def test_pr_curve_table_and_png(tmp_path):
    table = pr_curve_plot(PROBS, LABELS, tmp_path / "pr.png")
    _assert_png(tmp_path / "pr.png")
    assert list(table.columns) == ["recall", "precision", "threshold"]
    assert (np.diff(table["recall"]) <= 0).all()
    assert table["threshold"].isna().sum() == 1
    assert table.iloc[-1][["recall", "precision"]].tolist() == [0.0, 1.0]


def test_reliability_table_and_png(tmp_path):
    probs = np.append(PROBS, 1.0)  # a probability of exactly 1 falls in the last bin
    labels = np.append(LABELS, 1)
    table = reliability_plot(probs, labels, tmp_path / "rel.png", n_bins=10)
    _assert_png(tmp_path / "rel.png")
    assert list(table.columns) == ["bin_center", "mean_p_all", "observed_all_share", "count"]
    assert len(table) == 10
    assert table["count"].sum() == probs.size
    np.testing.assert_allclose(table["bin_center"], np.arange(0.05, 1, 0.1))
    filled = table[table["count"] > 0]
    half_width = 0.05 + 1e-12
    assert ((filled["mean_p_all"] - filled["bin_center"]).abs() <= half_width).all()
    assert table.loc[table["count"] == 0, "observed_all_share"].isna().all()


def test_reliability_bins_hand_case(tmp_path):
    probs = np.array([0.1, 0.15, 0.8, 0.9])
    labels = np.array([0, 1, 1, 1])
    table = reliability_plot(probs, labels, tmp_path / "rel.png", n_bins=2)
    assert table["count"].tolist() == [2, 2]
    np.testing.assert_allclose(table["mean_p_all"], [0.125, 0.85])
    np.testing.assert_allclose(table["observed_all_share"], [0.5, 1.0])


def test_dvc_reliability_plot_draws_the_tables_columns(tmp_path):
    """The top-level DVC plot of ``reliability.csv`` names columns ``reliability_plot`` writes."""
    plots = yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]
    (spec,) = [entry["Reliability (test)"] for entry in plots if "Reliability (test)" in entry]
    table = reliability_plot(PROBS, LABELS, tmp_path / "rel.png")
    assert spec["x"] in table.columns
    assert set(spec["y"].values()) <= set(table.columns)


def test_image_grid_mixes_grey_and_colour(tmp_path):
    images = [RNG.random((32, 32)) for _ in range(3)]
    images += [RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(2)]
    path = image_grid(images, [f"cell {i}" for i in range(5)], tmp_path / "grid.png", ncols=4)
    _assert_png(path)
    with Image.open(path) as image:
        assert image.width > image.height  # 4 columns by 2 rows


def test_image_grid_needs_one_title_per_image(tmp_path):
    with pytest.raises(ValueError, match="title"):
        image_grid([np.zeros((4, 4))], ["a", "b"], tmp_path / "grid.png")
