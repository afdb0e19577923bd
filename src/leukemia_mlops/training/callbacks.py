"""Training callbacks."""

from __future__ import annotations

import random

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BaseFinetuning
from torch.optim import Optimizer


class BackboneWarmup(BaseFinetuning):
    """Train only the new head for ``warmup_epochs``, then the whole network.

    Both parameter groups (backbone and head, with their own learning rates) are in the
    optimizer from the start, so the learning-rate schedule covers both; frozen parameters
    simply get no gradient until the backbone is unfrozen.
    """

    def __init__(self, warmup_epochs: int = 1, train_bn: bool = False):
        super().__init__()
        if warmup_epochs < 0:
            raise ValueError(f"model.warmup_epochs must be >= 0, got {warmup_epochs}")
        self.warmup_epochs = warmup_epochs
        self.train_bn = train_bn

    def freeze_before_training(self, pl_module: pl.LightningModule) -> None:
        if self.warmup_epochs > 0:
            self.freeze(pl_module.backbone, train_bn=self.train_bn)

    def finetune_function(
        self, pl_module: pl.LightningModule, current_epoch: int, optimizer: Optimizer
    ) -> None:
        # ">=": a run resumed after the warm-up starts frozen again and must thaw at once.
        if 0 < self.warmup_epochs <= current_epoch:
            self.make_trainable(pl_module.backbone)


class EpochSeed(pl.Callback):
    """Reseed Python, NumPy and torch from ``(seed, epoch)`` as every training epoch starts.

    The model's own randomness (dropout, stochastic depth) then depends on the epoch alone,
    so a run resumed from a checkpoint replays its epochs exactly (the data side is
    :class:`~leukemia_mlops.data.sampling.SeededSampler`'s).
    """

    def __init__(self, seed: int):
        self.seed = seed

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state = np.random.SeedSequence([self.seed, trainer.current_epoch]).generate_state(1)
        epoch_seed = int(state[0])
        random.seed(epoch_seed)
        np.random.seed(epoch_seed)
        torch.manual_seed(epoch_seed)


class EpochHistory(pl.Callback):
    """Per-epoch metrics for the training-curve plot; kept in checkpoints, so resume-safe."""

    def __init__(self, keys: tuple[str, ...]):
        self.keys = keys
        self.rows: list[dict[str, float]] = []

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        row = {"epoch": trainer.current_epoch}
        row.update({k: float(metrics[k]) for k in self.keys if k in metrics})
        self.rows = [r for r in self.rows if r["epoch"] != row["epoch"]] + [row]

    def state_dict(self) -> dict:
        return {"rows": self.rows}

    def load_state_dict(self, state_dict: dict) -> None:
        self.rows = list(state_dict["rows"])
