"""Where a run's files live: the run directory, the evaluation reports and the MLflow store.

The pipeline trains the model of each config key in :data:`PIPELINE_MODELS` (either family)
into the run directory ``<paths.models_dir>/<key>``, which holds ``checkpoints/{best,last}.ckpt``,
``run.json`` (the MLflow run id, the config hash and the status), ``config.yaml`` and, once
finished, ``metrics.json`` and ``history.csv``. The evaluate stage writes each one's report to
``<paths.reports_dir>/eval/<key>`` and their headline to ``<paths.reports_dir>/metrics.json``.
Train, evaluate, export and predict find them here.
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
        return self.root / "metrics.json"

    @property
    def history(self) -> Path:
        return self.root / "history.csv"

    def read_state(self) -> dict[str, Any]:
        """The run's ``run.json``, empty when there is none."""
        return json.loads(self.state.read_text()) if self.state.is_file() else {}

    def mlflow_run_id(self) -> str | None:
        """The MLflow run this directory's training logged into, if recorded."""
        return self.read_state().get("mlflow_run_id")


def model_run(cfg: DictConfig, key: str) -> RunFiles:
    """The run directory the pipeline trains the model configured under ``key`` into."""
    return RunFiles(Path(cfg.paths.models_dir) / key)


def eval_dir(cfg: DictConfig, key: str) -> Path:
    """Where the evaluate stage writes the report of the model configured under ``key``."""
    return Path(cfg.paths.reports_dir) / "eval" / key


def evaluation_reports(cfg: DictConfig) -> list[Path]:
    """The evaluate stage's ``metrics.json`` of every pipeline model (existing or not)."""
    return [eval_dir(cfg, key) / "metrics.json" for key in PIPELINE_MODELS]


def headline_file(cfg: DictConfig) -> Path:
    """The pipeline's DVC metrics file: the headline numbers of every evaluated model."""
    return Path(cfg.paths.reports_dir) / "metrics.json"


def training_report(cfg: DictConfig, key: str, suffix: str) -> Path:
    """The train stage's copy of a run's ``metrics.json`` (suffix ``.json``) or ``history.csv``
    (suffix ``_history.csv``) for the model configured under ``key``."""
    return Path(cfg.paths.reports_dir) / f"train_{key}{suffix}"


def learning_curves_file(cfg: DictConfig) -> Path:
    """The evaluate stage's plot of both pipeline models' validation AUROC by epoch and time."""
    return Path(cfg.paths.reports_dir) / "learning_curves.png"


def comparison_file(cfg: DictConfig) -> Path:
    """The evaluate stage's paired comparison of the two pipeline models."""
    return Path(cfg.paths.reports_dir) / "model_vs_detector.json"


def store_uri(cfg: DictConfig) -> str:
    """The MLflow tracking URI the config names (``logger.mlflow``, ``paths.mlruns_dir``)."""
    return tracking_uri(cfg.logger.mlflow.tracking_uri, cfg.paths.mlruns_dir)
