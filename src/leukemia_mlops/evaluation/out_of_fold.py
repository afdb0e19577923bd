"""Out-of-fold P(ALL) for every labelled training and validation cell of the prepare cache.

The cells are split into folds of whole subjects, stratified by class
(:func:`subject_folds`): a subject's cells look alike, so a fold that held some of them
while another trained on the rest would score them in-sample. Each fold's model is trained by
the project's own training run (:func:`~leukemia_mlops.training.run.run_training`) on a view
of the cache (:func:`fold_view`): the other folds as ``train``, the held-out fold as ``val``.
Its last epoch's weights (never a checkpoint chosen on the held-out fold) then score the
held-out cells. The folds' runs, checkpoints and MLflow store live in a scratch folder that the
caller discards; the cache itself is only read.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from leukemia_mlops.data.datamodule import CellDataset
from leukemia_mlops.data.identity import read_identity, write_identity
from leukemia_mlops.data.prepare import IMAGES_FILE, MANIFEST_FILE
from leukemia_mlops.errors import ConfigError, InputError, MissingInputError
from leukemia_mlops.evaluation.evaluate import score_split
from leukemia_mlops.inference.loading import load_module
from leukemia_mlops.inference.scorers import TorchScorer
from leukemia_mlops.tracking.run_files import RunFiles
from leukemia_mlops.tracking.store import local_store_uri

log = logging.getLogger(__name__)

#: The splits of the cache the audit reads: every labelled cell outside the test split.
AUDITED_SPLITS = ("train", "val")
#: A fold view's split for cells that are neither trained on nor held out (test, unlabelled).
UNUSED = "unused"


@dataclass(frozen=True)
class FoldSpec:
    """How the out-of-fold models are trained: ``folds`` subject folds, ``max_epochs`` each
    (no early stopping: the held-out fold must choose nothing), ``seed`` for the folds."""

    folds: int
    max_epochs: int
    seed: int

    def __post_init__(self) -> None:
        if self.folds < 2:
            raise ConfigError(f"audit.folds must be >= 2, got {self.folds}")
        if self.max_epochs < 1:
            raise ConfigError(f"audit.max_epochs must be >= 1, got {self.max_epochs}")


def audited_cells(prepared_dir: str | Path) -> pd.DataFrame:
    """The manifest rows of the audited splits (their cache row as the index)."""
    manifest_file = Path(prepared_dir) / MANIFEST_FILE
    if not manifest_file.is_file():
        raise MissingInputError(f"no prepared data in {prepared_dir}: run the prepare stage")
    manifest = pd.read_parquet(manifest_file)
    return manifest[manifest["split"].isin(AUDITED_SPLITS)]


def subject_folds(labels: np.ndarray, subjects: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """A fold number per cell: whole subjects per fold, each fold with both classes' subjects
    in about the cells' class proportions (scikit-learn's ``StratifiedGroupKFold``)."""
    from sklearn.model_selection import StratifiedGroupKFold

    per_class = [len(set(subjects[labels == label])) for label in (0, 1)]
    if min(per_class) < folds:
        raise InputError(
            f"{folds} subject folds need {folds} subjects of each class; the training and "
            f"validation splits hold {per_class[1]} ALL and {per_class[0]} HEM subjects"
        )
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    fold = np.empty(len(labels), dtype=np.int64)
    for number, (_, held_out) in enumerate(splitter.split(labels, labels, subjects)):
        fold[held_out] = number
    return fold


def fold_view(
    prepared_dir: Path, cells: pd.DataFrame, fold: np.ndarray, held_out: int, out: Path
) -> Path:
    """A cache folder for one fold: the same images (a link), a manifest whose ``split`` is
    ``val`` for the held-out fold, ``train`` for the other folds and :data:`UNUSED` for every
    other row, and the cache's identity (the data it was made from)."""
    manifest = pd.read_parquet(prepared_dir / MANIFEST_FILE)
    split = pd.Series(UNUSED, index=manifest.index, dtype="string")
    split[cells.index] = np.where(fold == held_out, "val", "train")
    out.mkdir(parents=True, exist_ok=True)
    manifest.assign(split=split).to_parquet(out / MANIFEST_FILE, index=False)
    os.symlink((prepared_dir / IMAGES_FILE).resolve(), out / IMAGES_FILE)
    write_identity(out, read_identity(prepared_dir))
    return out


def fold_config(cfg: DictConfig, spec: FoldSpec, view: Path, scratch: Path) -> DictConfig:
    """The training config of one fold: the stage's model, data and trainer settings on the
    fold's view, ``spec.max_epochs`` epochs without early stopping, logged into the scratch
    store and without a logged model."""
    store = scratch / "mlruns"
    changes = {
        "paths": {"mlruns_dir": str(store)},
        "datamodule": {"prepared_dir": str(view)},
        "trainer": {"max_epochs": spec.max_epochs},
        "callbacks": {"early_stopping": {"patience": spec.max_epochs}},
        # Named, so that neither $MLFLOW_TRACKING_URI nor the user's server receives them.
        "logger": {"mlflow": {"tracking_uri": local_store_uri(store), "log_model": False}},
    }
    return OmegaConf.merge(cfg, changes)


def out_of_fold_probs(
    cfg: DictConfig, spec: FoldSpec, cells: pd.DataFrame, scratch: Path, batch_size: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """P(ALL) of every row of ``cells`` from the fold model that never trained on its subject,
    and the fold of each row."""
    from leukemia_mlops.training.run import run_training

    prepared_dir = Path(cfg.datamodule.prepared_dir)
    labels = cells["label"].to_numpy(np.int64)
    fold = subject_folds(labels, cells["subject"].astype(str).to_numpy(), spec.folds, spec.seed)
    probs = np.full(len(cells), np.nan)
    for held_out in range(spec.folds):
        view = fold_view(prepared_dir, cells, fold, held_out, scratch / f"fold_{held_out}" / "data")
        run_dir = scratch / f"fold_{held_out}" / "run"
        log.info(
            "audit fold %d/%d: training on %d cells",
            held_out + 1,
            spec.folds,
            int((fold != held_out).sum()),
        )
        run_training(fold_config(cfg, spec, view, scratch), run_dir)
        model = load_module(RunFiles(run_dir).last_checkpoint)
        scorer = TorchScorer(model.cell_logit_network(), mixed_precision=False)
        scored = score_split(scorer, f"fold {held_out}", CellDataset(view, "val"), batch_size)
        probs[fold == held_out] = scored.probs
    return probs, fold
