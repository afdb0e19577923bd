"""Report figures as PNG files, with the tables behind them for DVC plots.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot), so nothing needs a display
and no global figure state leaks between calls or threads.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torchmetrics.functional.classification import (
    binary_auroc,
    binary_average_precision,
    binary_confusion_matrix,
    binary_precision_recall_curve,
    binary_roc,
)

from leukemia_mlops.evaluation.metrics import (
    ArrayLike,
    as_labels,
    calibration_bin_index,
    p_all_ece,
    validated_arrays,
)
from leukemia_mlops.labels import CLASS_NAMES

_DPI = 120


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=_DPI, bbox_inches="tight")
    return path


def _tensors(probs: ArrayLike, labels: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    p, y = validated_arrays(probs, labels)
    return torch.from_numpy(p), torch.from_numpy(y)


def confusion_matrix_plot(labels: ArrayLike, preds: ArrayLike, path: str | Path) -> Path:
    """Counts of actual (rows) vs predicted (columns) class, annotated in each cell."""
    y, called = torch.from_numpy(as_labels(labels)), torch.from_numpy(as_labels(preds))
    counts = binary_confusion_matrix(called, y).numpy()
    figure = _figure(4, 3.6)
    ax = figure.subplots()
    image = ax.imshow(counts, cmap="Blues")
    figure.colorbar(image, ax=ax)
    for (row, col), count in np.ndenumerate(counts):
        dark = count > counts.max() / 2
        ax.text(col, row, str(count), ha="center", va="center", color="white" if dark else "black")
    ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=CLASS_NAMES, yticklabels=CLASS_NAMES)
    ax.set(xlabel="Predicted", ylabel="Actual", title="Confusion matrix")
    return _save(figure, path)


def _curve_axes(figure: Figure, xlabel: str, ylabel: str, title: str) -> Axes:
    ax = figure.subplots()
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    return ax


def roc_curve_plot(probs: ArrayLike, labels: ArrayLike, path: str | Path) -> pd.DataFrame:
    """ROC curve of ALL vs HEM; returns its points [fpr, tpr, threshold] (fpr nondecreasing)."""
    p, y = _tensors(probs, labels)
    fpr, tpr, thresholds = binary_roc(p, y)
    table = pd.DataFrame(
        {"fpr": fpr.double(), "tpr": tpr.double(), "threshold": thresholds.double()}
    )
    figure = _figure(4.5, 4.5)
    ax = _curve_axes(figure, "False positive rate (1 - specificity)", "Sensitivity", "ROC")
    ax.plot(table["fpr"], table["tpr"], label=f"AUROC = {float(binary_auroc(p, y)):.3f}")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="chance")
    ax.legend(loc="lower right")
    _save(figure, path)
    return table


def pr_curve_plot(probs: ArrayLike, labels: ArrayLike, path: str | Path) -> pd.DataFrame:
    """Precision-recall curve for ALL; returns [recall, precision, threshold].

    The last point (recall 0, precision 1) closes the curve and has no threshold (NaN).
    """
    p, y = _tensors(probs, labels)
    precision, recall, thresholds = binary_precision_recall_curve(p, y)
    closing = torch.full((1,), float("nan"), dtype=torch.float64)
    table = pd.DataFrame(
        {
            "recall": recall.double(),
            "precision": precision.double(),
            "threshold": torch.cat([thresholds.double(), closing]),
        }
    )
    figure = _figure(4.5, 4.5)
    ax = _curve_axes(figure, "Recall (sensitivity)", "Precision", "Precision-recall (ALL)")
    ap = float(binary_average_precision(p, y))
    ax.step(table["recall"], table["precision"], where="post", label=f"AP = {ap:.3f}")
    ax.axhline(float(y.double().mean()), linestyle="--", color="grey", label="prevalence")
    ax.legend(loc="lower left")
    _save(figure, path)
    return table


def _reliability_table(p: np.ndarray, y: np.ndarray, n_bins: int) -> pd.DataFrame:
    """Per equal-width bin of P(ALL): its mean P(ALL), observed ALL share and cell count.

    Bins match ``p_all_ece``'s except that the last is closed ([1 - 1/n, 1]) where torchmetrics
    keeps a probability of exactly 1.0 apart. Empty bins have NaN mean and share.
    """
    bins = np.minimum(calibration_bin_index(p, n_bins), n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    with np.errstate(invalid="ignore"):
        mean_p_all = np.bincount(bins, weights=p, minlength=n_bins) / count
        observed_all_share = np.bincount(bins, weights=y, minlength=n_bins) / count
    centers = (np.arange(n_bins) + 0.5) / n_bins
    return pd.DataFrame(
        {
            "bin_center": centers,
            "mean_p_all": mean_p_all,
            "observed_all_share": observed_all_share,
            "count": count,
        }
    )


def reliability_plot(
    probs: ArrayLike, labels: ArrayLike, path: str | Path, n_bins: int = 15
) -> pd.DataFrame:
    """Reliability diagram of P(ALL) with a cell-count histogram; returns the per-bin table.

    Per bin of P(ALL), ``observed_all_share`` is the share of ALL cells, the value a
    calibrated ``mean_p_all`` should equal; the title gives their ``p_all_ece``.
    """
    p, y = _tensors(probs, labels)
    table = _reliability_table(p.numpy(), y.numpy(), n_bins)
    ece = float(p_all_ece(p, y, n_bins))
    figure = _figure(4.5, 5.5)
    top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    top.bar(table["bin_center"], table["observed_all_share"], width=1 / n_bins, edgecolor="black")
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    top.set(
        ylim=(0, 1),
        ylabel="Observed ALL share",
        title=f"Reliability of P(ALL) (p_all_ece = {ece:.3f})",
    )
    top.legend(loc="upper left")
    bottom.bar(table["bin_center"], table["count"], width=1 / n_bins, color="grey")
    bottom.set(xlim=(0, 1), xlabel="Predicted P(ALL)", ylabel="Cells")
    _save(figure, path)
    return table


def image_grid(
    images: list[np.ndarray], titles: list[str], path: str | Path, ncols: int = 4
) -> Path:
    """A titled gallery (Grad-CAM or detection overlays); 2-D images are shown in grey."""
    if not images or len(images) != len(titles):
        raise ValueError(f"need one title per image: {len(images)} images, {len(titles)} titles")
    ncols = min(ncols, len(images))
    nrows = math.ceil(len(images) / ncols)
    figure = _figure(3 * ncols, 3 * nrows)
    axes = figure.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, image, title in zip(axes, images, titles, strict=False):
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None)
        ax.set_title(title, fontsize=9)
    return _save(figure, path)


def learning_curves_plot(histories: dict[str, pd.DataFrame], path: str | Path) -> Path:
    """Validation AUROC of every model against epoch and against training time, one plot per
    axis with every model on it (each ``history.csv`` as training writes it), the best epoch
    (the one kept) marked."""
    figure = _figure(10, 3.8)
    by_epoch, by_time = figure.subplots(1, 2, sharey=True)
    for name, history in histories.items():
        best = history["val/auroc"].idxmax()
        for axes, x in ((by_epoch, "epoch"), (by_time, "time_s")):
            if x not in history or history[x].isna().all():
                continue
            (line,) = axes.plot(history[x], history["val/auroc"], marker="o", label=name)
            axes.plot(
                history[x][best], history["val/auroc"][best], "*", ms=14, color=line.get_color()
            )
    by_epoch.set(xlabel="epoch", ylabel="validation AUROC", title="Learning curves (★ kept)")
    by_time.set(xlabel="training time (s, this machine)", title="... against training time")
    for axes in (by_epoch, by_time):
        axes.axhline(0.5, color="grey", ls=":", lw=1)
        axes.grid(alpha=0.3)
    by_epoch.legend()
    return _save(figure, path)


def subject_scores_plot(table: pd.DataFrame, threshold: float, rule: str, path: str | Path) -> Path:
    """Each subject's score by true class (test filled, validation hollow), the threshold the
    validation subjects chose as a line: how far each patient sits from its diagnosis."""
    figure = _figure(5, 3.6)
    ax = figure.subplots()
    offsets = {"val": -0.12, "test": 0.12}
    for split, rows in table.groupby("split"):
        hollow = split == "val"
        ax.scatter(
            rows["label"] + offsets.get(split, 0.0),
            rows["score"],
            s=14 + 4 * np.sqrt(rows["n_cells"]),
            facecolors="none" if hollow else "tab:blue",
            edgecolors="tab:blue",
            label=f"{split} subjects",
        )
    ax.axhline(threshold, linestyle="--", color="grey", label=f"threshold {threshold:.3g}")
    ax.set(xticks=[0, 1], xticklabels=CLASS_NAMES, xlim=(-0.6, 1.6), xlabel="True class")
    ax.set(ylabel=f"subject score ({rule})", title="Patient-level scores (marker size: cells)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(loc="best", fontsize="small")
    return _save(figure, path)
