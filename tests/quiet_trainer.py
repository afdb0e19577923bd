"""A Lightning trainer for test fixtures: CPU, no logger, checkpoints, bars or summary."""

import pytorch_lightning as pl

QUIET = {
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "accelerator": "cpu",
}


def quiet_trainer(**settings) -> pl.Trainer:
    """``pl.Trainer(**settings)`` that logs, checkpoints and prints nothing."""
    return pl.Trainer(**{**QUIET, **settings})
