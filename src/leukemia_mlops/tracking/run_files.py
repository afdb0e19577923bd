"""Where a run's files live: the run directory, the evaluation reports and the MLflow store.

The pipeline trains the model of each config key in :data:`PIPELINE_MODELS` (either family)
into the run directory ``<paths.models_dir>/<key>`` (:class:`RunFiles`). The evaluate stage
writes each one's report to ``<paths.reports_dir>/eval/<key>`` (:class:`EvalFiles`) and their
headline to ``<paths.reports_dir>/metrics.json``. Train, evaluate, export and predict find
them here; no other module spells a run or report file's name.

Three files are called ``metrics.json`` (DVC tracks them under these names):

- ``models/<key>/metrics.json`` (:attr:`RunFiles.metrics`): the training run's best and last
  validation metrics, copied by the train stage to ``reports/train_<key>.json``;
- ``reports/eval/<key>/metrics.json`` (:attr:`EvalFiles.metrics`): the evaluation report, the
  validated threshold and the test metrics with their intervals, which predict reads;
- ``reports/metrics.json`` (:func:`headline_file`): the pipeline's headline that
  ``dvc metrics show`` prints.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from leukemia_mlops.tracking.store import tracking_uri

#: The config keys of the models the pipeline trains, each into its own run directory:
#: ``model`` (the one the sweep tunes, any family) and ``detector`` (the YOLO compared with it).
PIPELINE_MODELS = ("model", "detector")
#: A run's folder of checkpoints: in its run directory and among its MLflow artifacts.
CHECKPOINTS = "checkpoints"
#: The name of each of the three metrics files (see above).
METRICS_FILE = "metrics.json"


@dataclass(frozen=True)
class RunFiles:
    """The files of one training run directory."""

    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    @property
    def best_checkpoint(self) -> Path:
        return self.checkpoints / "best.ckpt"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / "last.ckpt"

    @property
    def state(self) -> Path:
        """``run.json``: the MLflow run id, the config hash and the status."""
        return self.root / "run.json"

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        """The training run's best and last validation metrics, once finished."""
        return self.root / METRICS_FILE

    @property
    def history(self) -> Path:
        return self.root / "history.csv"

    def read_state(self) -> dict[str, Any]:
        """The run's ``run.json``, empty when there is none."""
        return json.loads(self.state.read_text()) if self.state.is_file() else {}

    def mlflow_run_id(self) -> str | None:
        """The MLflow run this directory's training logged into, if recorded."""
        return self.read_state().get("mlflow_run_id")


@dataclass(frozen=True)
class EvalFiles:
    """The files of one model's evaluation report folder."""

    root: Path

    @property
    def metrics(self) -> Path:
        """The evaluation report: the validated threshold, test metrics and their intervals."""
        return self.root / METRICS_FILE

    @property
    def predictions(self) -> Path:
        """One row per val and test cell: its label, probability and call."""
        return self.root / "predictions.csv"

    @property
    def subjects(self) -> Path:
        """One row per test subject: its label, cells, blast share and majority diagnosis."""
        return self.root / "subjects.csv"

    @property
    def gallery(self) -> Path:
        """What the model saw: Grad-CAM of test cells or a detector's test scenes."""
        return self.root / "gallery.png"

    @property
    def confusion_matrix(self) -> Path:
        return self.root / "confusion_matrix.png"

    def plot(self, name: str, suffix: str) -> Path:
        """The test split's plot ``name`` (``roc``, ``pr``, ...): its figure (``.png``) or its
        table (``.csv``)."""
        return self.root / f"{name}{suffix}"


@dataclass(frozen=True)
class SeedFiles:
    """The seed comparison's reports folder (``lmo-compare-seeds --out``, ``reports/seeds``)."""

    root: Path

    @property
    def runs(self) -> Path:
        """One row per model and seed."""
        return self.root / "runs.csv"

    @property
    def summary(self) -> Path:
        return self.root / "seeds.json"

    @property
    def tables(self) -> Path:
        """The summary's Markdown tables."""
        return self.root / "seeds.md"

    def evaluation(self, key: str, seed: int) -> Path:
        """The evaluation report folder (:class:`EvalFiles`) of ``key``'s run with ``seed``."""
        return self.root / key / f"seed_{seed}"


@dataclass(frozen=True)
class AuditFiles:
    """The label audit's reports: its folder (``reports/audit``) and its summary beside it
    (``reports/audit.json``, the DVC metrics file)."""

    root: Path

    @property
    def issues(self) -> Path:
        """Every audited cell, most suspect label first."""
        return self.root / "label_issues.csv"

    @property
    def gallery(self) -> Path:
        """The top suspects with their given and predicted labels."""
        return self.root / "gallery.png"

    @property
    def summary(self) -> Path:
        return self.root.with_name(f"{self.root.name}.json")


def model_run(cfg: DictConfig, key: str) -> RunFiles:
    """The run directory the pipeline trains the model configured under ``key`` into."""
    return RunFiles(Path(cfg.paths.models_dir) / key)


def seed_run(cfg: DictConfig, key: str, seed: int) -> RunFiles:
    """The run directory the seed comparison trains ``key`` into with ``seed``."""
    return RunFiles(Path(cfg.paths.models_dir) / "seeds" / key / f"seed_{seed}")


def eval_dir(cfg: DictConfig, key: str) -> Path:
    """Where the evaluate stage writes the report of the model configured under ``key``."""
    return Path(cfg.paths.reports_dir) / "eval" / key


def evaluation_reports(cfg: DictConfig) -> list[Path]:
    """The evaluate stage's ``metrics.json`` of every pipeline model (existing or not)."""
    return [EvalFiles(eval_dir(cfg, key)).metrics for key in PIPELINE_MODELS]


def audit_files(cfg: DictConfig) -> AuditFiles:
    """Where the audit stage writes its reports."""
    return AuditFiles(Path(cfg.paths.reports_dir) / "audit")


def data_report(cfg: DictConfig) -> Path:
    """The prepare stage's data report: counts per split and class, skipped files, settings."""
    return Path(cfg.paths.reports_dir) / "data.json"


def headline_file(cfg: DictConfig) -> Path:
    """The pipeline's DVC metrics file: the headline numbers of every evaluated model."""
    return Path(cfg.paths.reports_dir) / METRICS_FILE


def training_history_report(cfg: DictConfig, key: str) -> Path:
    """The train stage's copy of the ``history.csv`` of the model configured under ``key``."""
    return Path(cfg.paths.reports_dir) / f"train_{key}_history.csv"


def training_reports(cfg: DictConfig, key: str) -> dict[Path, Path]:
    """The train stage's copies of the run files of the model configured under ``key``: its
    ``metrics.json`` as ``train_<key>.json`` and its history; run file -> copy."""
    run = model_run(cfg, key)
    return {
        run.metrics: Path(cfg.paths.reports_dir) / f"train_{key}.json",
        run.history: training_history_report(cfg, key),
    }


def learning_curves_file(cfg: DictConfig) -> Path:
    """The evaluate stage's plot of both pipeline models' validation AUROC by epoch and time."""
    return Path(cfg.paths.reports_dir) / "learning_curves.png"


def comparison_file(cfg: DictConfig) -> Path:
    """The evaluate stage's paired comparison of the two pipeline models."""
    return Path(cfg.paths.reports_dir) / "model_vs_detector.json"


def sweep_reports(reports_dir: Path, key: str) -> tuple[Path, Path]:
    """The sweep stage's best parameters (``best_params.yaml``, ``best_<key>_params.yaml``) and
    summary (``sweep[_<key>].json``) for the model configured under ``key``."""
    infix = "" if key == "model" else f"_{key}"
    return reports_dir / f"best{infix}_params.yaml", reports_dir / f"sweep{infix}.json"


def store_uri(cfg: DictConfig) -> str:
    """The MLflow tracking URI the config names (``logger.mlflow``, ``paths.mlruns_dir``)."""
    return tracking_uri(cfg.logger.mlflow.tracking_uri, cfg.paths.mlruns_dir)
