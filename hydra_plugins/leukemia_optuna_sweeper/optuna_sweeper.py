"""The ``leukemia_optuna`` Hydra sweeper: Hydra multirun trials chosen by Optuna.

A thin adapter: it parses the search space with Hydra's override grammar, turns each trial
into a Hydra job and hands the campaign to :mod:`leukemia_mlops.tuning.study` (ask, launch,
tell, heartbeats, retries; see there). Every job gets ``optuna_trial: {study_name, storage,
number, pruner, parent_run_id}`` in its config, for the pruning callback and the MLflow
nesting, and runs in ``<hydra.sweep.dir>/trial_<number>``; the sweep directory gets the study
summary (:data:`leukemia_mlops.tuning.runs.RESULTS_FILE`). Trials log no MLflow model, and
only the best ``keep_models`` keep their checkpoints (in the store; none in the sweep
directory once the campaign is over), so a long sweep does not fill the disk.
"""

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.types import Transformer
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import MISSING, DictConfig, OmegaConf

log = logging.getLogger(__name__)


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
    keep_models: int = 1  # trials that keep their checkpoints: the best ones
    baseline: bool = True  # the new study's first trial runs the configured values
    params: dict[str, str] = field(default_factory=dict)


ConfigStore.instance().store(
    group="hydra/sweeper",
    name="leukemia_optuna",
    node=LeukemiaOptunaSweeperConf,
    provider="leukemia_optuna_sweeper",
)


class LeukemiaOptunaSweeper(Sweeper):
    """Runs Optuna trials as Hydra jobs, ``n_jobs`` per launch."""

    def __init__(self, params: DictConfig | None = None, **settings: Any) -> None:
        from leukemia_mlops.tuning.study import StudySettings

        resolved = OmegaConf.to_container(OmegaConf.create(settings), resolve=True)
        self.settings = StudySettings(**resolved)
        # Sweep syntax is kept as written; other values become override text (None: null).
        self.params = {
            str(k): v if isinstance(v, str) else Transformer.str(v)
            for k, v in OmegaConf.to_container(params or {}).items()
        }

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> list[Sequence[JobReturn]]:
        """Check the search space, then run this command's trials and summarize the study."""
        from dataclasses import replace

        from leukemia_mlops.data.identity import read_identity
        from leukemia_mlops.errors import InputError
        from leukemia_mlops.files import write_text
        from leukemia_mlops.redaction import redact
        from leukemia_mlops.tracking.store import tracking_uri
        from leukemia_mlops.tuning.runs import RESULTS_FILE, SweepRuns, study_summary
        from leukemia_mlops.tuning.search_space import swept_values
        from leukemia_mlops.tuning.storage import storage_url
        from leukemia_mlops.tuning.study import (
            SweepError,
            enqueue_baseline,
            open_study,
            run_trials,
        )

        space = self._search_space(arguments)
        prepared_dir = self.config.datamodule.prepared_dir
        try:
            identity = read_identity(prepared_dir)  # the trials' data, before any study or run
        except InputError as err:
            raise SweepError(str(err)) from None
        if self.settings.storage:
            self.settings = replace(self.settings, storage=storage_url(self.settings.storage))
        study, storage, created = open_study(self.settings)
        mlflow, mlruns_dir = self.config.logger.mlflow, self.config.paths.mlruns_dir
        uri = tracking_uri(mlflow.tracking_uri, mlruns_dir)
        runs = SweepRuns.open(uri, mlflow.experiment_name, mlruns_dir, study, created)
        # Only now may the study hold a trial: a worker that finds trials takes the parent run
        # the study names, and would make a second one if the baseline came first.
        if created and self.settings.baseline:
            enqueue_baseline(study, space, self.config)
        runs.log_data(prepared_dir, identity)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        # The storage URL's password (and any other) stays out of the saved config.
        write_text(sweep_dir / "multirun.yaml", redact(OmegaConf.to_yaml(self.config)))

        keep = self.settings.keep_models

        def launch(trials: list, start: int) -> Sequence[JobReturn]:
            runs.keep_best(study, keep, sweep_dir)  # the trials of the rounds before
            jobs = [self._job_overrides(space.fixed, trial, runs.parent_id) for trial in trials]
            return self.launcher.launch(jobs, initial_job_idx=start)

        status = "FAILED"
        try:
            returns = run_trials(study, storage, self.settings, space, runs, launch)
            status = "FINISHED"
            return returns
        finally:
            summary = study_summary(study, self.settings.direction, self.settings.storage)
            if "best_overrides" in summary:
                summary["best_params"] = swept_values(
                    self.hydra_context.config_loader, self.config, space, summary["best_overrides"]
                )
            path = sweep_dir / RESULTS_FILE
            write_text(path, yaml.safe_dump(summary, sort_keys=False))
            runs.summarize(study, path, status)
            runs.keep_best(study, keep, sweep_dir, campaign_over=True)

    def _search_space(self, arguments: list[str]) -> Any:
        """``params`` and the command line's overrides (which win), checked against the config."""
        from leukemia_mlops.tuning.search_space import build_space

        lines = [f"{key}={value}" for key, value in self.params.items()] + list(arguments)
        return build_space(lines, self.hydra_context.config_loader, self.config)

    def _job_overrides(self, fixed: Sequence[str], trial: Any, parent_id: str) -> list[str]:
        """The trial's overrides, its link to the study and its own job directory."""
        link = {
            "study_name": trial.study.study_name,
            "storage": self.settings.storage,
            "number": trial.number,
            "pruner": self.settings.pruner,
            "parent_run_id": parent_id,
        }
        return [
            *fixed,
            *trial.user_attrs["overrides"],
            f"++optuna_trial={Transformer.str(link)}",
            "logger.mlflow.log_model=false",  # the best trials keep their checkpoints instead
            f"hydra.sweep.subdir=trial_{trial.number}",
        ]
