"""End to end: one training trial as ``dvc repro``'s train stage runs it, timed whole."""

from __future__ import annotations

import json

import pandas as pd

from bench.report import Section
from bench.timing import stopwatch
from bench.workspace import Workspace
from leukemia_mlops.data.prepare import MANIFEST_FILE
from leukemia_mlops.training.run import run_training

TITLE = "End to end: one training trial"


def run(ws: Workspace) -> Section:
    size, epochs = ws.image_size, ws.sizes.trial_epochs
    prepared = ws.prepared(ws.train_spec, size)
    overrides = [f"trainer.max_epochs={epochs}"] if epochs else []
    cfg = ws.config(prepared, size, *overrides)
    run_dir = ws.root / "trial"
    best, seconds = stopwatch(lambda: run_training(cfg, run_dir))
    ran = len(pd.read_csv(run_dir / "history.csv"))
    precision = json.loads((run_dir / "metrics.json").read_text())["precision"]
    splits = pd.read_parquet(prepared / MANIFEST_FILE)["split"].value_counts()
    train, val = int(splits.get("train", 0)), int(splits.get("val", 0))
    what = f"{epochs} epoch(s)" if epochs else "epochs"
    data = "the configured" if ws.sizes.train_images is None else "a smaller"
    rows = [
        [
            cfg.model.get("backbone", cfg.model.get("variant")),
            f"{ran} of {cfg.trainer.max_epochs}",
            train,
            val,
            precision,
            seconds,
            seconds / ran,
            best,
        ]
    ]
    return Section(
        TITLE,
        f"`run_training` with the configured model, {what} and callbacks (early stopping, "
        "backbone warm-up, checkpoints, MLflow logging and model logging) on "
        f"{data} synthetic data set, prepared at {size} px. `dvc repro` as a whole (data, "
        "sweep, evaluation) is too long for a benchmark; data generation and prepare are "
        "excluded.",
        [
            "model",
            "epochs",
            "train images",
            "val images",
            "precision",
            "wall s",
            "s / epoch",
            "best val F1",
        ],
        rows,
        [
            f"one trial takes {seconds:.0f} s; there is no baseline: the trial is the stage "
            "itself (a sweep of n trials costs about n times this)."
        ],
        {"seconds": seconds, "epochs": ran, "best_f1": best, "precision": precision},
    )
