"""The ``leukemia_optuna`` sweeper: Hydra multirun trials chosen by Optuna's ask-and-tell API.

Each round asks the study for ``n_jobs`` trials, turns their params into Hydra overrides,
hands them to the launcher and tells the study how each job ended: its return value (the
objective) as COMPLETE, ``optuna.TrialPruned`` as PRUNED, any other exception or a
non-finite objective as FAIL. The sweep goes on past failures until more than
``max_failure_rate * n_trials`` trials of this run fail.

``n_trials`` is the number of trials this command ADDS to the study: running the same
command again with the same ``storage`` and ``study_name`` continues the study, and k workers
started together on one storage add k * n_trials trials (Optuna's RDB storage gives them
distinct numbers). With ``top_up`` it is the number of finished (complete or pruned) trials
the study should hold: the command adds only the missing ones, waits for the trials other
workers are running, and a rerun after a crash finishes the same campaign.

A worker records a heartbeat for its running trials every ``heartbeat_interval`` seconds.
Before every round each worker fails the trials whose heartbeat is older than
``grace_period`` (their worker was killed) and queues each for ``max_retry`` retries with the
same parameters, which the next ``ask`` hands out first.

Every job gets ``optuna_trial: {study_name, storage, number, pruner, parent_run_id}`` in its
config, for the pruning callback and the MLflow nesting (see
``leukemia_mlops.training.pruning`` and ``leukemia_mlops.tracking.sweep_runs``), and runs in
``<hydra.sweep.dir>/trial_<number>``. The sweep directory gets ``optuna_results.yaml``.
"""

import logging
import math
import numbers
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.types import Transformer
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import CompactHydraException, HydraException
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hydra_plugins.leukemia_optuna_sweeper.search_space import (
    SearchSpace,
    SearchSpaceError,
    check_keys,
    parse_overrides,
)

if TYPE_CHECKING:
    import optuna

    from leukemia_mlops.tracking.sweep_runs import SweepRuns

log = logging.getLogger(__name__)
DIRECTIONS = ("maximize", "minimize")


@dataclass
class LeukemiaOptunaSweeperConf:
    """``hydra/sweeper=leukemia_optuna``; ``sampler`` and ``pruner`` are ``_target_`` mappings
    (pruner null: never prune). The values live in ``conf/hparams_search/_optuna.yaml``."""

    _target_: str = "hydra_plugins.leukemia_optuna_sweeper.optuna_sweeper.LeukemiaOptunaSweeper"
    _recursive_: bool = False  # the sweeper builds sampler and pruner; jobs get the pruner spec
    direction: str = MISSING
    n_trials: int = MISSING
    n_jobs: int = MISSING
    storage: str | None = MISSING  # a SQLAlchemy URL; null: in memory (no resume, no workers)
    study_name: str | None = MISSING  # null: Optuna makes one up
    sampler: dict[str, Any] = MISSING
    pruner: dict[str, Any] | None = MISSING
    max_failure_rate: float = MISSING
    top_up: bool = MISSING  # n_trials counts the study's finished trials, not this run's
    heartbeat_interval: int = MISSING  # seconds; 0: no heartbeats
    grace_period: int | None = MISSING  # seconds without a heartbeat before a trial is failed
    max_retry: int = MISSING  # retries of a trial whose worker died
    params: dict[str, str] = field(default_factory=dict)


ConfigStore.instance().store(
    group="hydra/sweeper",
    name="leukemia_optuna",
    node=LeukemiaOptunaSweeperConf,
    provider="leukemia_optuna_sweeper",
)


class SweepError(RuntimeError, CompactHydraException):
    """A sweep that cannot start or go on; Hydra prints it as one line."""


class LeukemiaOptunaSweeper(Sweeper):
    """Runs ``n_trials`` Optuna trials as Hydra jobs, ``n_jobs`` per launch."""

    def __init__(
        self,
        direction: str,
        n_trials: int,
        n_jobs: int,
        storage: str | None,
        study_name: str | None,
        sampler: DictConfig,
        pruner: DictConfig | None,
        max_failure_rate: float,
        top_up: bool,
        heartbeat_interval: int,
        grace_period: int | None,
        max_retry: int,
        params: DictConfig,
    ) -> None:
        if direction not in DIRECTIONS:
            raise SweepError(f"hydra.sweeper.direction must be one of {DIRECTIONS}: {direction!r}")
        if n_trials < 0 or n_jobs < 1 or not 0.0 <= max_failure_rate <= 1.0:
            raise SweepError(
                "hydra.sweeper needs n_trials >= 0, n_jobs >= 1 and max_failure_rate in [0, 1]"
            )
        if heartbeat_interval < 0 or max_retry < 0 or (grace_period or 1) <= 0:
            raise SweepError(
                "hydra.sweeper needs heartbeat_interval >= 0, max_retry >= 0, grace_period > 0"
            )
        if top_up and storage and not heartbeat_interval:
            raise SweepError("hydra.sweeper.top_up needs heartbeats: set heartbeat_interval")
        self.direction = direction
        self.n_trials = n_trials
        self.n_jobs = n_jobs
        self.storage = storage
        self.study_name = study_name
        self.sampler = OmegaConf.to_container(sampler, resolve=True)
        self.pruner = OmegaConf.to_container(pruner, resolve=True) if pruner else None
        self.max_failure_rate = max_failure_rate
        self.top_up = top_up
        self.heartbeat = {"interval": heartbeat_interval, "grace": grace_period, "retry": max_retry}
        # Sweep syntax is kept as written; other values become override text (None: null).
        self.params = {
            str(k): v if isinstance(v, str) else Transformer.str(v)
            for k, v in OmegaConf.to_container(params or {}).items()
        }
        self.hydra_context: HydraContext | None = None
        self.config: DictConfig | None = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.hydra_context = hydra_context
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> list[Sequence[JobReturn]]:
        """Check the search space, then run this command's trials and summarize the study."""
        from leukemia_mlops.redaction import redact
        from leukemia_mlops.training.pruning import storage_url

        assert self.hydra_context is not None and self.config is not None
        space = self._search_space(arguments)
        if self.storage:
            self.storage = storage_url(self.storage)
        study, created = self._open_study()
        runs = self._open_runs(study, created)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        # The storage URL's password (and any other) stays out of the saved config.
        (sweep_dir / "multirun.yaml").write_text(redact(OmegaConf.to_yaml(self.config)))
        status = "FAILED"
        try:
            returns = self._run_trials(study, space, runs)
            status = "FINISHED"
            return returns
        finally:
            runs.summarize(study, self._write_results(study, space, sweep_dir), status)

    def _search_space(self, arguments: list[str]) -> SearchSpace:
        """``params`` and the command line's overrides (which win), checked against the config."""
        loader = self.hydra_context.config_loader
        lines = [f"{key}={value}" for key, value in self.params.items()] + list(arguments)
        overrides = parse_overrides(lines, loader)
        config_name = self.config.hydra.job.config_name
        search_path = list(self.config.hydra.overrides.hydra)  # hydra.searchpath among them

        def group_options(group: str) -> list[str]:
            return loader.get_group_options(group, config_name=config_name, overrides=search_path)

        check_keys(overrides, self.config, group_options)
        space = SearchSpace.from_overrides(overrides)
        if not space.distributions:
            raise SearchSpaceError("the search space is empty: set hydra.sweeper.params")
        return space

    def _open_study(self) -> tuple["optuna.Study", bool]:
        """The study, and whether this worker created it (or continues a stored one)."""
        import optuna
        from hydra.utils import instantiate

        from leukemia_mlops.training.pruning import make_pruner, open_storage

        storage = open_storage(self.storage, **self._heartbeat_settings())
        pruner = make_pruner(self.pruner)
        try:
            study = optuna.create_study(
                storage=storage, study_name=self.study_name, direction=self.direction, pruner=pruner
            )
            created = True
        except optuna.exceptions.DuplicatedStudyError:
            study = optuna.load_study(study_name=self.study_name, storage=storage, pruner=pruner)
            created = False
            if study.direction.name.lower() != self.direction:
                raise SweepError(
                    f"study {self.study_name} is stored with direction "
                    f"{study.direction.name.lower()}, not {self.direction}"
                ) from None
        # A seeded sampler starts past the trials the study holds, so that continuing a study
        # does not replay the draws of its first trials.
        sampler = dict(self.sampler)
        if sampler.get("seed") is not None:
            sampler["seed"] = int(sampler["seed"]) + len(study.get_trials(deepcopy=False))
        study.sampler = instantiate(sampler)
        return study, created

    def _heartbeat_settings(self) -> dict[str, Any]:
        """RDBStorage's heartbeat arguments (none when heartbeats are off)."""
        import optuna

        if not self.heartbeat["interval"]:
            return {}
        retry = None
        if self.heartbeat["retry"]:
            retry = optuna.storages.RetryFailedTrialCallback(max_retry=self.heartbeat["retry"])
        return {
            "heartbeat_interval": self.heartbeat["interval"],
            "grace_period": self.heartbeat["grace"],
            "heartbeat_stale_trial_callback": retry,
        }

    def _open_runs(self, study: "optuna.Study", created: bool) -> "SweepRuns":
        from leukemia_mlops.tracking.store import tracking_uri
        from leukemia_mlops.tracking.sweep_runs import SweepRuns

        mlflow = self.config.logger.mlflow
        mlruns_dir = self.config.paths.mlruns_dir
        uri = tracking_uri(mlflow.tracking_uri, mlruns_dir)
        return SweepRuns.open(uri, mlflow.experiment_name, mlruns_dir, study, created)

    def _run_trials(
        self, study: "optuna.Study", space: SearchSpace, runs: "SweepRuns"
    ) -> list[Sequence[JobReturn]]:
        """Ask, launch and tell ``n_trials`` trials; stop once too many have failed."""
        from optuna.trial import TrialState

        from leukemia_mlops.training.pruning import live_trials

        allowed_failures = int(self.max_failure_rate * self.n_trials)
        failures, launched, returns, last_error = 0, 0, [], None
        while True:
            _fail_stale_trials(study, runs)
            missing = self._missing(study, launched)
            if missing <= 0:
                if not (self.top_up and _states(study, TrialState.RUNNING)):
                    return returns
                time.sleep(self.heartbeat["interval"])  # others' trials: finish or go stale
                continue
            trials = [
                study.ask(dict(space.distributions)) for _ in range(min(self.n_jobs, missing))
            ]
            for trial in trials:
                trial.set_user_attr("overrides", space.overrides(trial.params))
            jobs = [self._job_overrides(space, trial, runs.parent_id) for trial in trials]
            try:
                with live_trials(trials), _heartbeats(study, trials, self.heartbeat["interval"]):
                    results = self.launcher.launch(jobs, initial_job_idx=launched)
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
                    f"{self.max_failure_rate} of n_trials={self.n_trials} allows; "
                    f"last error: {last_error}"
                )

    def _missing(self, study: "optuna.Study", launched: int) -> int:
        """How many more trials to start: this run's rest, or with ``top_up`` the study's
        (trials running on any worker count as on their way)."""
        from optuna.trial import TrialState

        if not self.top_up:
            return self.n_trials - launched
        return self.n_trials - len(
            _states(study, TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
        )

    def _job_overrides(
        self, space: SearchSpace, trial: "optuna.Trial", parent_id: str
    ) -> list[str]:
        """The trial's overrides, its link to the study and its own job directory."""
        link = {
            "study_name": trial.study.study_name,
            "storage": self.storage,
            "number": trial.number,
            "pruner": self.pruner,
            "parent_run_id": parent_id,
        }
        return [
            *space.fixed,
            *trial.user_attrs["overrides"],
            f"++optuna_trial={Transformer.str(link)}",
            f"hydra.sweep.subdir=trial_{trial.number}",
        ]

    def _write_results(self, study: "optuna.Study", space: SearchSpace, sweep_dir: Path) -> Path:
        """``optuna_results.yaml``: trial counts, and the best trial's overrides and config."""
        from leukemia_mlops.redaction import redact
        from leukemia_mlops.tracking.sweep_runs import state_counts

        counts = state_counts(study)
        results: dict[str, Any] = {
            "study_name": study.study_name,
            "storage": redact(self.storage) if self.storage else None,
            "direction": self.direction,
            "trials": counts,
        }
        if counts["complete"]:
            best = study.best_trial
            overrides = best.user_attrs.get("overrides", [])
            results.update(
                best_trial=best.number,
                best_value=best.value,
                best_overrides=overrides,
                best_params=self._best_params(space, overrides),
            )
        from leukemia_mlops.tracking.sweep_runs import RESULTS_FILE

        path = sweep_dir / RESULTS_FILE
        path.write_text(yaml.safe_dump(results, sort_keys=False))
        return path

    def _best_params(self, space: SearchSpace, overrides: list[str]) -> dict[str, Any] | None:
        """The swept keys of the config the best trial composed, as one nested mapping (a
        swept config group contributes its whole node)."""
        try:
            config = self.hydra_context.config_loader.load_sweep_config(
                self.config, [*space.fixed, *overrides]
            )
        except (HydraException, OmegaConfBaseException) as err:
            log.warning("cannot compose the best trial's config: %s", err)
            return None
        nested = OmegaConf.create()
        for override in parse_overrides(overrides):
            value = OmegaConf.select(config, override.key_or_group)
            if isinstance(value, DictConfig):
                value = OmegaConf.to_container(value, resolve=True)
            OmegaConf.update(nested, override.key_or_group, value, force_add=True)
        return OmegaConf.to_container(nested)


def _states(study: "optuna.Study", *states: "optuna.trial.TrialState") -> list:
    return study.get_trials(deepcopy=False, states=states)


def _fail_stale_trials(study: "optuna.Study", runs: "SweepRuns") -> None:
    """Fail (and queue retries of) the trials whose worker stopped beating; end their runs."""
    import optuna
    from optuna.trial import TrialState

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
    study: "optuna.Study", trials: list["optuna.Trial"], interval: int
) -> Iterator[None]:
    """Record the trials' heartbeats every ``interval`` seconds while their jobs run."""
    storage = study._storage
    if not interval or not hasattr(storage, "record_heartbeat"):
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while True:
            try:
                for trial in trials:
                    storage.record_heartbeat(trial._trial_id)
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


def trial_outcome(
    job: JobReturn,
) -> tuple["optuna.trial.TrialState", float | None, Exception | None]:
    """How a job ended, as the trial's state, objective and error."""
    import optuna
    from optuna.trial import TrialState

    if job.status != JobStatus.COMPLETED:
        # The job's exception; the return_value property would re-raise it with a stderr note.
        error = job._return_value
        state = TrialState.PRUNED if isinstance(error, optuna.TrialPruned) else TrialState.FAIL
        return state, None, error
    value = job.return_value
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        return TrialState.FAIL, None, ValueError(f"objective {value!r} is not a finite number")
    return TrialState.COMPLETE, float(value), None


def _tell(
    study: "optuna.Study", trial: "optuna.Trial", job: JobReturn
) -> "optuna.trial.FrozenTrial":
    """Tell the study how the trial's job ended, keeping a failure's error on the trial."""
    from optuna.trial import TrialState

    state, value, error = trial_outcome(job)
    if state == TrialState.FAIL:
        log.error("trial %d failed", trial.number, exc_info=error)
        trial.set_user_attr("error", f"{type(error).__name__}: {error}")
    elif state == TrialState.PRUNED:
        log.info("trial %d pruned: %s", trial.number, error)
    else:
        log.info("trial %d finished with value %s", trial.number, value)
    return study.tell(trial, value, state=state)
