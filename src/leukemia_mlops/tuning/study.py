"""An Optuna study run as a campaign of launched trials, with Optuna's ask-and-tell API.

Each round asks the study for ``n_jobs`` trials, hands them to a launcher and tells the study
how each job ended: its return value (the objective) as COMPLETE, ``optuna.TrialPruned`` as
PRUNED, any other exception or a non-finite objective as FAIL. The campaign goes on past
failures until more than ``max_failure_rate * n_trials`` trials of this run fail.

``n_trials`` is the number of trials this run ADDS to the study: the same command again with
the same storage and study name continues the study, and k workers started together on one
storage add k * n_trials trials. With ``top_up`` it is the number of finished (complete or
pruned) trials the study should hold: the run adds only the missing ones, waits for the trials
other workers are running, and a rerun after a crash finishes the same campaign.

A worker records a heartbeat for its running trials every ``heartbeat_interval`` seconds.
Before every round each worker fails the trials whose heartbeat is older than ``grace_period``
(their worker was killed) and queues each for ``max_retry`` retries with the same parameters,
which the next ``ask`` hands out first.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import optuna
from hydra.core.utils import JobReturn
from hydra.errors import CompactHydraException
from optuna.trial import FrozenTrial, TrialState

from leukemia_mlops.tuning.runs import SweepRuns
from leukemia_mlops.tuning.search_space import SearchSpace
from leukemia_mlops.tuning.storage import heartbeat_settings, make_pruner, open_storage, trial_id

log = logging.getLogger(__name__)
DIRECTIONS = ("maximize", "minimize")
#: The worker that ran a trial (host:pid), a user attribute of every trial.
WORKER_ATTR = "worker"
#: Runs a round's trials as jobs; gets the trials and the index of the first job.
Launch = Callable[[list[optuna.Trial], int], Sequence[JobReturn]]


class SweepError(RuntimeError, CompactHydraException):
    """A sweep that cannot start or go on; Hydra prints it as one line."""


@dataclass(frozen=True)
class StudySettings:
    """The ``hydra.sweeper`` settings of a campaign (values in ``conf/hparams_search/``)."""

    direction: str
    n_trials: int
    n_jobs: int
    storage: str | None
    study_name: str | None
    sampler: dict[str, Any]
    pruner: dict[str, Any] | None
    max_failure_rate: float
    top_up: bool
    heartbeat_interval: int
    grace_period: int | None
    max_retry: int
    keep_models: int = 1
    baseline: bool = True

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise SweepError(f"hydra.sweeper.direction must be one of {DIRECTIONS}")
        if self.n_trials < 0 or self.n_jobs < 1 or not 0.0 <= self.max_failure_rate <= 1.0:
            raise SweepError(
                "hydra.sweeper needs n_trials >= 0, n_jobs >= 1 and max_failure_rate in [0, 1]"
            )
        if self.heartbeat_interval < 0 or self.max_retry < 0 or (self.grace_period or 1) <= 0:
            raise SweepError(
                "hydra.sweeper needs heartbeat_interval >= 0, max_retry >= 0, grace_period > 0"
            )
        if self.keep_models < 0:
            raise SweepError("hydra.sweeper.keep_models must be >= 0")
        if self.top_up and self.storage and not self.heartbeat_interval:
            raise SweepError("hydra.sweeper.top_up needs heartbeats: set heartbeat_interval")


def open_study(
    settings: StudySettings,
) -> tuple[optuna.Study, optuna.storages.BaseStorage | None, bool]:
    """The study, its storage (None: in memory), and whether this worker created the study.

    A seeded sampler starts past the trials the study holds, so that continuing a study does
    not replay the draws of its first trials.
    """
    from hydra.utils import instantiate

    heartbeat = heartbeat_settings(
        settings.heartbeat_interval, settings.grace_period, settings.max_retry
    )
    storage = open_storage(settings.storage, **heartbeat)
    pruner = make_pruner(settings.pruner)
    name, direction = settings.study_name, settings.direction
    try:
        study = optuna.create_study(
            storage=storage, study_name=name, direction=direction, pruner=pruner
        )
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, pruner=pruner)
        created = False
        if study.direction.name.lower() != direction:
            raise SweepError(
                f"study {name} is stored with direction {study.direction.name.lower()}, "
                f"not {direction}"
            ) from None
    sampler = dict(settings.sampler)
    if sampler.get("seed") is not None:
        sampler["seed"] = int(sampler["seed"]) + len(study.get_trials(deepcopy=False))
    study.sampler = instantiate(sampler)
    return study, storage, created


#: The user attribute of the trial that runs the configured values (the sweeper's ``baseline``).
BASELINE_ATTR = "baseline"


def enqueue_baseline(study: optuna.Study, space: SearchSpace, config: Any) -> dict[str, Any]:
    """Queue a first trial with the configured value of every swept key that its distribution
    holds (the others are sampled), so the study's best is never worse on the objective than
    the config it tunes; returns the queued values."""
    from omegaconf import OmegaConf

    params = {}
    for key, distribution in space.distributions.items():
        value = OmegaConf.select(config, key.lstrip("+~"), default=None)
        if _holds(distribution, value):
            params[key] = value
        else:
            log.info("baseline trial: %s=%r is not in its search space; sampled", key, value)
    study.enqueue_trial(params, user_attrs={BASELINE_ATTR: True})
    return params


def _holds(distribution: optuna.distributions.BaseDistribution, value: Any) -> bool:
    """Whether ``value`` is one ``distribution`` can sample (a config value as it is)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if isinstance(distribution, CategoricalDistribution):
        return isinstance(value, bool | int | float | str) and value in distribution.choices
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    if isinstance(distribution, IntDistribution) and value != int(value):
        return False
    if isinstance(distribution, FloatDistribution | IntDistribution):
        return distribution.low <= value <= distribution.high
    return False


def run_trials(
    study: optuna.Study,
    storage: optuna.storages.BaseStorage | None,
    settings: StudySettings,
    space: SearchSpace,
    runs: SweepRuns,
    launch: Launch,
) -> list[Sequence[JobReturn]]:
    """Ask, launch and tell trials until the campaign is done; stop once too many failed."""
    from leukemia_mlops.tuning.pruning import live_trials

    allowed_failures = int(settings.max_failure_rate * settings.n_trials)
    failures, launched, returns, last_error = 0, 0, [], None
    while True:
        fail_stale_trials(study, runs)
        missing = _missing(study, settings, launched)
        if missing <= 0:
            if not (settings.top_up and _states(study, TrialState.RUNNING)):
                return returns
            time.sleep(settings.heartbeat_interval)  # others' trials: finish or go stale
            continue
        count = min(settings.n_jobs, missing)
        trials = [study.ask(dict(space.distributions)) for _ in range(count)]
        for trial in trials:
            trial.set_user_attr("overrides", space.overrides(trial.params))
            trial.set_user_attr(WORKER_ATTR, f"{socket.gethostname()}:{os.getpid()}")
        try:
            beats = _heartbeats(storage, study.study_name, trials, settings.heartbeat_interval)
            with live_trials(trials), beats:
                results = launch(trials, launched)
        except BaseException:
            for trial in trials:
                study.tell(trial, state=TrialState.FAIL)
            raise
        launched += len(trials)
        returns.append(results)
        for trial, result in zip(trials, results, strict=True):
            frozen = _tell(study, trial, result)
            runs.record_trial(frozen)
            if frozen.state == TrialState.FAIL:
                failures, last_error = failures + 1, frozen.user_attrs["error"]
        if failures > allowed_failures:
            raise SweepError(
                f"{failures} of {launched} trials failed, more than max_failure_rate="
                f"{settings.max_failure_rate} of n_trials={settings.n_trials} allows; "
                f"last error: {last_error}"
            )


def _missing(study: optuna.Study, settings: StudySettings, launched: int) -> int:
    """How many more trials to start: this run's rest, or with ``top_up`` the study's
    (trials running on any worker count as on their way)."""
    if not settings.top_up:
        return settings.n_trials - launched
    on_their_way = _states(study, TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    return settings.n_trials - len(on_their_way)


def _states(study: optuna.Study, *states: TrialState) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=states)


def fail_stale_trials(study: optuna.Study, runs: SweepRuns) -> None:
    """Fail (and queue retries of) the trials whose worker stopped beating; end their runs."""
    running = {t.number for t in _states(study, TrialState.RUNNING)}
    if not running:
        return
    optuna.storages.fail_stale_trials(study)
    for trial in study.get_trials(deepcopy=True, states=(TrialState.FAIL,)):
        if trial.number in running:
            log.warning("trial %d failed: its worker stopped sending heartbeats", trial.number)
            trial.user_attrs["error"] = "its worker stopped sending heartbeats (killed?)"
            runs.record_trial(trial)


@contextmanager
def _heartbeats(
    storage: optuna.storages.BaseStorage | None,
    study_name: str,
    trials: list[optuna.Trial],
    interval: int,
) -> Iterator[None]:
    """Record the trials' heartbeats every ``interval`` seconds while their jobs run."""
    if not interval or not hasattr(storage, "record_heartbeat"):
        yield
        return
    ids = [trial_id(storage, study_name, trial.number) for trial in trials]
    stop = threading.Event()

    def beat() -> None:
        while True:
            try:
                for id_ in ids:
                    storage.record_heartbeat(id_)
            except Exception as err:  # a storage hiccup: the next beat may get through
                log.warning("cannot record a trial heartbeat: %s", err)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name="optuna-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def trial_outcome(job: JobReturn) -> tuple[TrialState, float | None, BaseException | None]:
    """How a job ended, as the trial's state, objective and error."""
    if isinstance(job._return_value, optuna.TrialPruned):  # not Hydra's "Error executing job"
        return TrialState.PRUNED, None, job._return_value
    try:
        value = job.return_value  # a failed job's property re-raises the job's exception
    except Exception as error:
        return TrialState.FAIL, None, error
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        return TrialState.FAIL, None, ValueError(f"objective {value!r} is not a finite number")
    return TrialState.COMPLETE, float(value), None


def _tell(study: optuna.Study, trial: optuna.Trial, job: JobReturn) -> FrozenTrial:
    """Tell the study how the trial's job ended, keeping a failure's error on the trial."""
    state, value, error = trial_outcome(job)
    if state == TrialState.FAIL:
        log.error("trial %d failed", trial.number, exc_info=error)
        trial.set_user_attr("error", f"{type(error).__name__}: {error}")
    elif state == TrialState.PRUNED:
        log.info("trial %d pruned: %s", trial.number, error)
    else:
        log.info("trial %d finished with value %s", trial.number, value)
    return study.tell(trial, value, state=state)
