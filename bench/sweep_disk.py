"""Disk a sweep leaves behind per trial: before (every trial logged its model and kept its
checkpoints) and after (only the best trial keeps its checkpoint; no trial logs a model)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from bench.report import Section, fmt
from bench.workspace import Workspace

TITLE = "Sweep disk use: store and scratch growth per trial"
TRIALS = 3


def folder_mib(folder: Path) -> float:
    """Bytes of every file under ``folder`` (0 when missing), in MiB."""
    files = folder.rglob("*") if folder.is_dir() else []
    return sum(p.stat().st_size for p in files if p.is_file() and not p.is_symlink()) / 2**20


def train(args: list[str], cwd: Path) -> None:
    """``python -m leukemia_mlops.train`` with ``args``, tracking where ``args`` say (not where
    an earlier benchmark's ``mlflow.set_tracking_uri`` pointed this process); raises with its
    log on failure."""
    command = [sys.executable, "-m", "leukemia_mlops.train", *args]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{' '.join(args[:3])} failed:\n{done.stderr[-3000:]}")


def growth(ws: Workspace, name: str, args: list[str], scratch: str) -> tuple[float, float]:
    """MiB the store (``mlruns/``) and the Hydra scratch folder gained from one command."""
    work = ws.scratch(name)
    work.mkdir()
    mlruns = work / "mlruns"
    common = [
        f"paths.prepared_dir={ws.prepared(ws.train_spec, ws.image_size)}",
        f"paths.mlruns_dir={mlruns}",
        f"logger.mlflow.tracking_uri=sqlite:///{mlruns / 'mlflow.db'}",
        f"data.prepare.image_size={ws.image_size}",
        f"trainer.max_epochs={ws.sizes.trial_epochs or 1}",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "model=resnet18",
        f"hydra.run.dir={work / scratch}",
        f"hydra.sweep.dir={work / scratch}",
    ]
    train([*args, *common], work)
    return folder_mib(mlruns), folder_mib(work / scratch)


def run(ws: Workspace) -> Section:
    # Before: each trial was a training run that logged its model and kept its checkpoints.
    before = growth(ws, "sweep-before", ["logger.mlflow.log_model=true"], "run")
    sweep = [
        "-m",
        "hparams_search=cnn_optuna",
        f"hydra.sweeper.n_trials={TRIALS}",
        "hydra.sweeper.keep_models=1",
        "~hydra.sweeper.params.model",
    ]
    store, scratch = growth(ws, "sweep-after", sweep, "multirun")
    after = (store / TRIALS, scratch / TRIALS)
    rows = [
        ["before: every trial keeps its model and checkpoints", 1, *before],
        [f"after: a {TRIALS}-trial sweep, keep_models=1 (per trial)", TRIALS, *after],
    ]
    return Section(
        TITLE,
        f"resnet18 trials of {ws.sizes.trial_epochs or 1} epoch(s) at {ws.image_size} px on the "
        "training benchmarks' data, each command on a new store. *before*: one training run "
        "as every sweep trial used to be (MLflow model logged, best checkpoint logged, "
        "checkpoints left in its Hydra folder). *after*: a sweep through the project's sweeper "
        f"with `keep_models: 1`: {TRIALS} trials, whose growth is divided by {TRIALS}; the "
        "store then holds the best trial's checkpoint and every trial's metrics and params.",
        ["setting", "trials", "mlruns/ MiB per trial", "Hydra scratch MiB per trial"],
        rows,
        [
            f"store growth per trial: {fmt(before[0])} MiB before, {fmt(after[0])} MiB after "
            f"(x{fmt(before[0] / max(after[0], 1e-9))} less); the after figure spreads the one "
            f"kept checkpoint over {TRIALS} trials, so a longer sweep grows less per trial.",
            f"scratch growth per trial: {fmt(before[1])} MiB before, {fmt(after[1])} MiB after.",
        ],
        {"trials": TRIALS, "before_mib": before, "after_mib_per_trial": after},
    )
