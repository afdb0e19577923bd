"""A callback that signals its own process once, at the end of training epoch ``epoch``, as
SLURM or torchrun would signal a rank to preempt it."""

from __future__ import annotations

import os

import pytorch_lightning as pl


class SignalSelf(pl.Callback):
    def __init__(self, signum: int, epoch: int = 0) -> None:
        self.signum, self.epoch = signum, epoch

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            os.kill(os.getpid(), self.signum)
