"""The label audit: confident learning over out-of-fold probabilities ranks suspect labels.

Every labelled training and validation cell gets P(ALL) from a model that never saw its
subject (:mod:`~leukemia_mlops.evaluation.out_of_fold`). cleanlab's ``find_label_issues``
then flags the cells whose given label the out-of-sample probabilities contradict beyond the
noise the classes' confident joint estimates (``filter_by``), and every cell is ranked by its
self-confidence, the out-of-fold probability of its given label (rank 1: the least).

The audit reads the cache and writes reports only: ``label_issues.csv`` (every audited cell,
most suspect first), ``gallery.png`` (the top suspects with their given and predicted labels)
and a summary. It never changes a label: a flagged cell is one to look at, not an error.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from leukemia_mlops.data.identity import read_identity
from leukemia_mlops.data.prepare import IMAGES_FILE
from leukemia_mlops.errors import ConfigError
from leukemia_mlops.evaluation.out_of_fold import FoldSpec, audited_cells, out_of_fold_probs
from leukemia_mlops.evaluation.plots import image_grid
from leukemia_mlops.files import write_json, write_text
from leukemia_mlops.labels import CLASS_NAMES
from leukemia_mlops.tracking.run_files import AuditFiles

log = logging.getLogger(__name__)

#: cleanlab's ``filter_by`` methods that need nothing but the labels and probabilities.
FILTERS = (
    "prune_by_noise_rate",
    "prune_by_class",
    "both",
    "confident_learning",
    "predicted_neq_given",
)
#: The columns of ``label_issues.csv``, one row per audited cell.
COLUMNS = (
    "rank",
    "flagged",
    "path",
    "subject",
    "split",
    "fold",
    "given",
    "predicted",
    "prob_all",
    "self_confidence",
)
#: What the summary says the audit is, for whoever opens it.
MEANING = (
    "cells whose given label their out-of-fold P(ALL) contradicts (cleanlab confident "
    "learning); rank 1 is the least self-confident; flagged cells are to be reviewed, "
    "the data is unchanged"
)
OFF = (
    "the label audit is off (audit.enabled: false): run it with "
    "`dvc exp run -S audit.enabled=true` (or `lmo-audit audit.enabled=true`)"
)


@dataclass(frozen=True)
class AuditSpec:
    """The ``audit`` config group (defaults in ``conf/audit/``), checked when read."""

    enabled: bool = False
    folds: int = 3
    max_epochs: int = 3
    seed: int = 0
    filter_by: str = "prune_by_noise_rate"
    gallery: int = 12
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.filter_by not in FILTERS:
            raise ConfigError(f"audit.filter_by must be one of {FILTERS}, got {self.filter_by!r}")
        if self.gallery < 1:
            raise ConfigError(f"audit.gallery must be >= 1, got {self.gallery}")
        if self.batch_size < 1:
            raise ConfigError(f"audit.batch_size must be >= 1, got {self.batch_size}")
        self.fold_spec()  # checks the fold settings

    def fold_spec(self) -> FoldSpec:
        return FoldSpec(self.folds, self.max_epochs, self.seed)


def label_issues(labels: np.ndarray, prob_all: np.ndarray, filter_by: str) -> pd.DataFrame:
    """Per cell (in the given order): whether cleanlab flags its label, its self-confidence
    and its rank by self-confidence (1: the most suspect)."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    labels = np.asarray(labels, dtype=np.int64)
    pred_probs = np.column_stack([1 - prob_all, prob_all])  # column = label (HEM 0, ALL 1)
    flagged = find_label_issues(labels, pred_probs, filter_by=filter_by)
    confidence = get_label_quality_scores(labels, pred_probs, method="self_confidence")
    rank = np.empty(len(labels), dtype=np.int64)
    rank[np.argsort(confidence, kind="stable")] = np.arange(1, len(labels) + 1)
    return pd.DataFrame({"rank": rank, "flagged": flagged, "self_confidence": confidence})


def audit_table(
    cells: pd.DataFrame, prob_all: np.ndarray, fold: np.ndarray, filter_by: str
) -> pd.DataFrame:
    """``label_issues.csv``: every audited cell, most suspect first; the cache row as index."""
    labels = cells["label"].to_numpy(np.int64)
    issues = label_issues(labels, prob_all, filter_by).set_index(cells.index)
    names = np.array(CLASS_NAMES)
    table = issues.assign(
        path=cells["path"].astype(str),
        subject=cells["subject"].astype(str),
        split=cells["split"].astype(str),
        fold=fold,
        given=names[labels],
        predicted=names[(prob_all > 0.5).astype(np.int64)],
        prob_all=prob_all,
    )
    return table[list(COLUMNS)].sort_values("rank")


def summary(table: pd.DataFrame, spec: AuditSpec, data_identity: str) -> dict[str, Any]:
    """The audit's counts: cells, subjects and flagged cells (by given class), and how well
    the out-of-fold models rank the given labels (their AUROC; near 0.5, no audit to trust)."""
    from sklearn.metrics import roc_auc_score

    flagged = table[table["flagged"]]
    given_all = (table["given"] == CLASS_NAMES[1]).to_numpy()
    return {
        "enabled": True,
        "meaning": MEANING,
        "data_identity": data_identity,
        "cells": len(table),
        "subjects": int(table["subject"].nunique()),
        "folds": spec.folds,
        "max_epochs": spec.max_epochs,
        "seed": spec.seed,
        "filter_by": spec.filter_by,
        "flagged": len(flagged),
        "flagged_share": len(flagged) / len(table),
        "flagged_by_given": {name: int((flagged["given"] == name).sum()) for name in CLASS_NAMES},
        "out_of_fold_auroc": float(roc_auc_score(given_all, table["prob_all"])),
    }


def write_gallery(table: pd.DataFrame, prepared_dir: Path, count: int, path: Path) -> Path:
    """The ``count`` most suspect cells with their rank, given and predicted labels."""
    top = table.head(count)
    images = np.load(prepared_dir / IMAGES_FILE, mmap_mode="r")
    titles = [
        f"#{row.rank}{' flagged' if row.flagged else ''}: given {row.given}, "
        f"called {row.predicted}\nP(ALL)={row.prob_all:.2f} {Path(row.path).name}"
        for row in top.itertuples()
    ]
    return image_grid([np.asarray(images[row]) for row in top.index], titles, path)


def run_audit(cfg: Any, spec: AuditSpec, files: AuditFiles) -> dict[str, Any]:
    """Audit the labels of the cache ``cfg.datamodule.prepared_dir`` (``cfg``: a training
    config, as the train stage reads it) into ``files``; returns the summary. Off
    (``spec.enabled`` false), it writes the table's header and a summary saying so."""
    if not spec.enabled:
        write_text(files.issues, ",".join(COLUMNS) + "\n")
        files.gallery.unlink(missing_ok=True)
        report = {"enabled": False, "meaning": OFF}
        write_json(files.summary, report, sort_keys=False)
        return report
    prepared_dir = Path(cfg.datamodule.prepared_dir)
    cells = audited_cells(prepared_dir)
    with tempfile.TemporaryDirectory(prefix="audit-") as scratch:
        probs, fold = out_of_fold_probs(
            cfg, spec.fold_spec(), cells, Path(scratch), spec.batch_size
        )
    table = audit_table(cells, probs, fold, spec.filter_by)
    report = summary(table, spec, read_identity(prepared_dir).digest)
    write_text(files.issues, table.to_csv(index=False))
    write_gallery(table, prepared_dir, spec.gallery, files.gallery)
    write_json(files.summary, report, sort_keys=False)
    return report


#: The MLflow run name of an audit (its runs carry no test metrics: ``compare`` skips them).
RUN_NAME = "label-audit"


def log_audit(
    uri: str,
    experiment_id: str,
    report: dict[str, Any],
    files: AuditFiles,
    prepared_dir: str | Path,
    seconds: float,
) -> str:
    """Log an audit as an MLflow run: its settings as params, its counts as ``audit/*``
    metrics (and its time), its files as artifacts under ``audit/``, and the audited splits as
    dataset inputs; returns the run id."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    from leukemia_mlops.data.prepare import MANIFEST_FILE
    from leukemia_mlops.tracking.datasets import TRAINING_CONTEXTS, log_data_inputs
    from leukemia_mlops.tracking.provenance import git_commit

    client = MlflowClient(uri)
    tags = {"audit": "labels", "data_identity": report["data_identity"], "git_commit": git_commit()}
    run_id = client.create_run(experiment_id, tags=tags, run_name=RUN_NAME).info.run_id
    settings = ("folds", "max_epochs", "seed", "filter_by")
    numbers = {"flagged", "flagged_share", "out_of_fold_auroc", "cells", "subjects"}
    metrics = {f"audit/{key}": float(report[key]) for key in sorted(numbers)}
    metrics["audit/seconds"] = seconds
    client.log_batch(
        run_id,
        metrics=[Metric(key, value, 0, 0) for key, value in metrics.items()],
        params=[Param(key, str(report[key])) for key in settings],
    )
    for path in (files.issues, files.gallery, files.summary):
        client.log_artifact(run_id, str(path), "audit")
    identity = read_identity(prepared_dir)
    log_data_inputs(uri, run_id, Path(prepared_dir) / MANIFEST_FILE, identity, TRAINING_CONTEXTS)
    client.set_terminated(run_id)
    return run_id
