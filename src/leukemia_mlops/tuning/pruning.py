"""Optuna pruning inside Lightning training: a hopeless sweep trial stops after an epoch.

A sweep trial's config carries ``optuna_trial: {study_name, storage, number, pruner,
parent_run_id}`` (see ``hydra_plugins.leukemia_optuna_sweeper``). The callback reaches the
trial object the sweeper asked for when the job runs in the sweeper's process, and re-opens
the trial through the shared storage when a launcher ran the job in another process.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import optuna
import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

from leukemia_mlops.tuning.storage import make_pruner, open_storage, trial_id

_LIVE: dict[tuple[str, int], optuna.Trial] = {}


@contextmanager
def live_trials(trials: Iterable[optuna.Trial]) -> Iterator[None]:
    """Make ``trials`` reachable by the pruning callbacks of jobs run in this process."""
    live = {(trial.study.study_name, trial.number): trial for trial in trials}
    _LIVE.update(live)
    try:
        yield
    finally:
        for key in live:
            _LIVE.pop(key, None)


def open_trial(link: Mapping[str, Any]) -> optuna.Trial:
    """The running trial that ``link`` (a job's ``optuna_trial``) names."""
    name, number = link["study_name"], int(link["number"])
    live = _LIVE.get((name, number))
    if live is not None:
        return live
    if not link.get("storage"):
        raise RuntimeError(
            f"trial {number} of study {name} runs outside the sweeper's process, "
            "but the study has no storage to reach it through"
        )
    storage = open_storage(link["storage"])
    study = optuna.load_study(
        study_name=name, storage=storage, pruner=make_pruner(link.get("pruner"))
    )
    return optuna.trial.Trial(study, trial_id(storage, name, number))


class OptunaPruning(Callback):
    """Reports ``monitor`` to the trial after every validation and raises ``TrialPruned`` when
    the pruner stops the trial: rank 0 reports and decides, every rank stops."""

    def __init__(self, link: Mapping[str, Any], monitor: str) -> None:
        self.link = dict(link)
        self.monitor = monitor
        self._trial: optuna.Trial | None = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        epoch = trainer.current_epoch
        prune = False
        score = trainer.callback_metrics.get(self.monitor)
        if trainer.is_global_zero and score is not None:
            if self._trial is None:
                self._trial = open_trial(self.link)
            self._trial.report(float(score), step=epoch)
            prune = self._trial.should_prune()
        if trainer.strategy.broadcast(prune, src=0):
            raise optuna.TrialPruned(f"trial {self.link['number']} pruned after epoch {epoch}")
