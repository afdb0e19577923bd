"""Training callbacks."""

from __future__ import annotations

import os
import random
import time
from typing import Any

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim import Optimizer

from leukemia_mlops.errors import ConfigError


class BackboneWarmup(pl.Callback):
    """Train only the new head for ``warmup_epochs``, then the whole network.

    The backbone is held still by dropping its gradients before every optimizer step, not by
    ``requires_grad=False``: DDP leaves out for good the parameters that need no gradient when
    it wraps the model, so a backbone frozen that way would never have its gradients averaged
    after the thaw and the replicas would drift apart. Every parameter therefore stays in DDP's
    reducer; during the warm-up the optimizer just never sees the backbone's gradients, so the
    backbone gets no update, no weight decay and no optimizer state, whatever the learning-rate
    schedule says. Its batch-norm layers run in eval mode during the warm-up, so the frozen
    backbone is one fixed function: it normalises with its running statistics in training as in
    validation, and the head is validated on the features it learnt from. (Lightning's
    ``BaseFinetuning.freeze`` normalises with batch statistics in training instead; on a backbone
    trained from scratch, whose running statistics are still their initial values, validation
    then saw other features, and the warm-up epoch ranked cells backwards: val AUROC 0.25.)
    Both follow from the epoch alone, so a resumed run is frozen or thawed as it should be.
    """

    def __init__(self, warmup_epochs: int):
        if warmup_epochs < 0:
            raise ConfigError(f"model.warmup_epochs must be >= 0, got {warmup_epochs}")
        self.warmup_epochs = warmup_epochs

    def _warming_up(self, trainer: pl.Trainer) -> bool:
        return trainer.current_epoch < self.warmup_epochs

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        frozen = self._warming_up(trainer)
        for module in pl_module.backbone.modules():
            if isinstance(module, _BatchNorm):
                module.train(not frozen)  # validation restores each module's mode after it

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        if self._warming_up(trainer):
            for param in pl_module.backbone.parameters():
                param.grad = None


class StopAfterEpochs(pl.Callback):
    """End training after ``epochs`` epochs while ``trainer.max_epochs`` stays the run's budget.

    A sweep trial with it is the first ``epochs`` epochs of the run it tunes: the learning-rate
    schedule, which spans ``trainer.max_epochs``, is the full run's, so a trial does not reward
    a learning rate that only suits a schedule annealed to zero within the trial.
    """

    def __init__(self, epochs: int):
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ConfigError(f"sweep.max_epochs must be a whole number >= 1, got {epochs!r}")
        self.epochs = epochs

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


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


#: The history's columns that measure the machine (seconds), not the model.
TIMING_COLUMNS = ("epoch_s", "time_s")


class EpochHistory(pl.Callback):
    """Per-epoch metrics for the training-curve plot; kept in checkpoints, so resume-safe.

    Each epoch's seconds (training and validation) are measured too, for the learning curves
    against training time. They depend on the machine and its load, so they stay out of the
    checkpoint, whose bytes must not: an epoch trained before a resume has no time.
    """

    def __init__(self, keys: tuple[str, ...]):
        self.keys = keys
        self.rows: list[dict[str, float]] = []
        self.seconds: dict[int, float] = {}
        self._started: float | None = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        row = {"epoch": trainer.current_epoch}
        row.update({k: float(metrics[k]) for k in self.keys if k in metrics})
        self.rows = [r for r in self.rows if r["epoch"] != row["epoch"]] + [row]
        if self._started is not None:
            self.seconds[trainer.current_epoch] = time.perf_counter() - self._started

    def table(self) -> pd.DataFrame:
        """The rows with ``epoch_s`` (the epoch's seconds) and ``time_s`` (seconds of training
        up to the epoch's end); NaN for epochs this process did not train."""
        table = pd.DataFrame(self.rows)
        if table.empty:
            return table
        epoch_s, time_s = TIMING_COLUMNS
        table[epoch_s] = table["epoch"].map(self.seconds).astype(float)
        table[time_s] = table[epoch_s].cumsum(skipna=False)
        return table

    def state_dict(self) -> dict:
        return {"rows": self.rows}

    def load_state_dict(self, state_dict: dict) -> None:
        self.rows = list(state_dict["rows"])


class RelocatableCheckpoint(ModelCheckpoint):
    """A :class:`ModelCheckpoint` whose saved state names its files relative to its folder.

    Lightning stores absolute paths in every checkpoint, so the same training in two clones
    wrote different bytes and DVC saw a changed ``models/`` output. Here the paths are
    relative to ``dirpath`` on save and made absolute again on load (resume).

    It also saves ``last.ckpt`` after every validation: Lightning 2.6 saves it only in a step
    where a top-k checkpoint was saved, so after the monitored metric's best epoch a killed run
    would resume from that epoch, not from its last one.
    """

    _PATH_KEYS = ("best_model_path", "kth_best_model_path", "last_model_path")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_missed(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_missed(trainer)

    def _save_last_if_missed(self, trainer: pl.Trainer) -> None:
        """Save ``last.ckpt`` unless this step saved a checkpoint already."""
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update({key: self._relative(state[key]) for key in self._PATH_KEYS})
        state["best_k_models"] = {self._relative(k): v for k, v in state["best_k_models"].items()}
        state["dirpath"] = "."
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        if state.get("dirpath") == ".":
            state.update({key: self._absolute(state[key]) for key in self._PATH_KEYS})
            state["best_k_models"] = {
                self._absolute(k): v for k, v in state["best_k_models"].items()
            }
            state["dirpath"] = self.dirpath
        super().load_state_dict(state)

    def _relative(self, path: str) -> str:
        return os.path.relpath(path, self.dirpath) if path and self.dirpath else path

    def _absolute(self, path: str) -> str:
        return os.path.join(self.dirpath, path) if path and self.dirpath else path
