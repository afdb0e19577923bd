"""Optuna pruning inside Lightning training: a hopeless sweep trial stops after an epoch.

A sweep trial's config carries ``optuna_trial: {study_name, storage, number, pruner,
parent_run_id}`` (see ``hydra_plugins.leukemia_optuna_sweeper``). The callback reaches the
trial object the sweeper asked for when the job runs in the sweeper's process, and re-opens
the trial through the shared storage when a launcher ran the job in another process.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

SQLITE_TIMEOUT_S = 60  # how long a sqlite writer waits for the other workers' locks
STORAGE_ATTEMPTS = 3
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


def storage_url(url: str) -> str:
    """``url`` with a sqlite file made absolute (a job may run in another directory) and its
    folder created; other URLs unchanged."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return url
    path = Path(parsed.database).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return parsed.set(database=str(path)).render_as_string()  # sqlite: no password to keep


def open_storage(url: str | None, **heartbeat: Any) -> optuna.storages.BaseStorage | None:
    """Optuna's RDB storage at ``url`` (None: in memory); sqlite waits out concurrent writers.

    ``heartbeat``: RDBStorage's heartbeat arguments (interval, grace period, stale callback).

    Workers started together on a new database race to create its schema; a loser finds the
    schema made when it tries again.
    """
    if not url:
        return None
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import IntegrityError, OperationalError

    sqlite = make_url(url).get_backend_name() == "sqlite"
    engine_kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}} if sqlite else None
    for _ in range(STORAGE_ATTEMPTS - 1):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **heartbeat)
        except (IntegrityError, OperationalError):
            time.sleep(1.0)
    return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **heartbeat)


def make_pruner(spec: Mapping[str, Any] | None) -> optuna.pruners.BasePruner:
    """The pruner a ``_target_`` mapping describes; none: never prune."""
    if not spec:
        return optuna.pruners.NopPruner()
    from hydra.utils import instantiate

    return instantiate(dict(spec))


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
    study = optuna.load_study(
        study_name=name,
        storage=open_storage(link["storage"]),
        pruner=make_pruner(link.get("pruner")),
    )
    for frozen in study.get_trials(deepcopy=False):
        if frozen.number == number:
            # Optuna has no public lookup of a trial by number; a FrozenTrial knows its id.
            return optuna.trial.Trial(study, frozen._trial_id)
    raise LookupError(f"study {name} has no trial {number}")


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
