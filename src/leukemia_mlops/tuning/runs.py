"""MLflow runs of an Optuna sweep: one parent run per study, one nested child run per trial.

A trial's child is its training run, which ``run_training`` nests under the parent with
:func:`trial_tags`; a trial that failed before its training run started gets a child here.
Every child ends with the trial's state, sampled params and objective; the parent holds the
study summary: best value and params, trial counts, the optimization history and the
parameter importances, and the data the trials train and select on as its dataset inputs. The
study remembers its parent run, so a resumed sweep and concurrent workers log under the same
one. Only the best ``keep_models`` trials keep their checkpoints in the store
(:meth:`SweepRuns.keep_best`); every trial keeps its metrics and params.
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from leukemia_mlops.data.prepare import MANIFEST_FILE
from leukemia_mlops.owned import remove_tree
from leukemia_mlops.tracking.datasets import TRAINING_CONTEXTS, log_data_inputs
from leukemia_mlops.tracking.run_files import CHECKPOINTS
from leukemia_mlops.tracking.store import ensure_experiment

if TYPE_CHECKING:
    import optuna
    from matplotlib.figure import Figure
    from mlflow import MlflowClient

    from leukemia_mlops.data.identity import CacheIdentity

log = logging.getLogger(__name__)

PARENT_ATTR = "mlflow_parent_run_id"  # the study's user attribute naming its parent run
PARENT_TAG = "mlflow.parentRunId"  # MLflow's nesting tag
TRIAL_TAG = "optuna_trial_number"
STATE_TAG = "optuna_state"
PARENT_WAIT_S = 60  # how long a worker waits for the study's creator to name the parent
SUMMARY_ATTEMPTS = 3
RUN_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}
STATES = ("complete", "pruned", "fail", "running")
RESULTS_FILE = "optuna_results.yaml"  # the study summary a sweep writes into its directory


def trial_tags(link: Mapping[str, Any] | None) -> dict[str, str]:
    """Tags that nest a sweep trial's training run under its study's parent run."""
    if not link:
        return {}
    tags = {TRIAL_TAG: str(link["number"])}
    if link.get("parent_run_id"):
        tags[PARENT_TAG] = str(link["parent_run_id"])
    return tags


def best_trials(study: optuna.Study, keep: int) -> list[int]:
    """The numbers of the study's ``keep`` best complete trials, best first."""
    from optuna.study import StudyDirection
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    maximize = study.direction == StudyDirection.MAXIMIZE
    ranked = sorted(done, key=lambda t: (-t.value if maximize else t.value, t.number))
    return [t.number for t in ranked[:keep]]


def finished_trials(study: optuna.Study) -> list[int]:
    """The numbers of the study's trials that no worker is running any more."""
    from optuna.trial import TrialState

    return [t.number for t in study.get_trials(deepcopy=False) if t.state != TrialState.RUNNING]


def drop_scratch(sweep_dir: Path, numbers: list[int]) -> None:
    """Delete the checkpoint folders that trials ``numbers`` left in their job directories
    (workers sharing the sweep directory delete them together: see :func:`remove_tree`)."""
    for number in numbers:
        remove_tree(sweep_dir / f"trial_{number}" / CHECKPOINTS)


def state_counts(study: optuna.Study) -> dict[str, int]:
    """How many of the study's trials are complete, pruned, failed and running."""
    counts = Counter(t.state.name.lower() for t in study.get_trials(deepcopy=False))
    return {state: counts.get(state, 0) for state in STATES}


def study_summary(study: optuna.Study, direction: str, storage: str | None) -> dict[str, Any]:
    """What :data:`RESULTS_FILE` holds: trial counts, and the best trial's value and overrides."""
    from leukemia_mlops.redaction import redact

    counts = state_counts(study)
    summary: dict[str, Any] = {
        "study_name": study.study_name,
        "storage": redact(storage) if storage else None,
        "direction": direction,
        "trials": counts,
    }
    if counts["complete"]:
        best = study.best_trial
        summary.update(
            best_trial=best.number,
            best_value=best.value,
            best_overrides=best.user_attrs.get("overrides", []),
        )
    return summary


class SweepRuns:
    """The parent run of one study and the child runs of its trials."""

    def __init__(self, client: MlflowClient, experiment_id: str, parent_id: str) -> None:
        self.client = client
        self.experiment_id = experiment_id
        self.parent_id = parent_id
        self._dropped: set[int] = set()  # trials whose checkpoints this worker deleted

    @classmethod
    def open(
        cls,
        uri: str,
        experiment_name: str,
        mlruns_dir: str | Path,
        study: optuna.Study,
        created: bool,
    ) -> SweepRuns:
        """The study's parent run, made by the worker that ``created`` the study (the others
        wait for it, which also leaves a new tracking database to that worker to create)."""
        from mlflow import MlflowClient

        parent_id = _named_parent(study, created)
        client = MlflowClient(uri)
        experiment_id = ensure_experiment(uri, experiment_name, mlruns_dir)
        if parent_id is None:
            parent_id = client.create_run(
                experiment_id,
                run_name=study.study_name,
                tags={"optuna_study": study.study_name, "optuna_direction": study.direction.name},
            ).info.run_id
            study.set_user_attr(PARENT_ATTR, parent_id)
        client.update_run(parent_id, status="RUNNING")
        return cls(client, experiment_id, parent_id)

    def log_data(self, prepared_dir: str | Path, identity: CacheIdentity) -> None:
        """Log the trials' data, the prepare cache, as the parent run's dataset inputs (again,
        as a resumed sweep or another worker does, adds nothing)."""
        manifest = Path(prepared_dir) / MANIFEST_FILE
        log_data_inputs(
            self.client.tracking_uri,
            self.parent_id,
            manifest,
            identity,
            TRAINING_CONTEXTS,
        )

    def record_trial(self, trial: optuna.trial.FrozenTrial) -> None:
        """End the trial's child run with its state, sampled params and objective."""
        from mlflow.entities import Param, RunTag

        run_id = self._child(trial.number)
        tags = [RunTag(STATE_TAG, trial.state.name)]
        if trial.user_attrs.get("error"):
            tags.append(RunTag("optuna_error", str(trial.user_attrs["error"])[:5000]))
        params = [Param(_mlflow_key(f"trial/{k}"), str(v)) for k, v in trial.params.items()]
        self.client.log_batch(run_id, params=params, tags=tags)
        if trial.value is not None:
            self.client.log_metric(run_id, "trial/value", trial.value)
        self.client.set_terminated(run_id, RUN_STATUS.get(trial.state.name, "FAILED"))

    def keep_best(
        self, study: optuna.Study, keep: int, sweep_dir: Path, campaign_over: bool = False
    ) -> None:
        """Delete the checkpoints of every finished trial outside the best ``keep``: the
        artifacts of its run (its metrics and params stay) and the folder in its job directory.
        Once the campaign is over, the job directories lose the kept trials' checkpoints too
        (the store holds those). Trials still running, here or on another worker, are left.

        Workers that finish together delete the same trials' checkpoints at the same moment:
        what another worker deleted first counts as deleted, and a deletion that fails is a
        warning, never an error, since the trials' results are safe in the store."""
        finished = finished_trials(study)
        kept = set(best_trials(study, keep))
        outside = [n for n in finished if n not in kept]
        self._drop_checkpoints([n for n in outside if n not in self._dropped])
        drop_scratch(sweep_dir, finished if campaign_over else outside)

    def _drop_checkpoints(self, numbers: list[int]) -> None:
        for number in numbers:
            run_id = self._find_child(number)
            if run_id is not None and _delete_checkpoints(self.client, run_id):
                log.info("trial %d is not among the best: its checkpoints were deleted", number)
            self._dropped.add(number)

    def summarize(self, study: optuna.Study, results_file: Path, status: str) -> None:
        """Log the study summary to the parent run and end it with ``status``.

        Workers that finish together race to insert the parent's new metric and tag rows
        (MLflow's sqlite store reads, then inserts); the loser logs its summary again.
        """
        from mlflow.exceptions import MlflowException

        for _ in range(SUMMARY_ATTEMPTS - 1):
            try:
                self._log_summary(study, results_file)
                break
            except MlflowException:
                time.sleep(0.5)
        else:
            self._log_summary(study, results_file)
        self.client.set_terminated(self.parent_id, status)

    def _log_summary(self, study: optuna.Study, results_file: Path) -> None:
        from mlflow.entities import RunTag

        client, parent = self.client, self.parent_id
        counts = state_counts(study)
        step = counts["complete"] + counts["pruned"] + counts["fail"]
        for state in ("complete", "pruned", "fail"):
            client.log_metric(parent, f"trials_{state}", counts[state], step=step)
        if counts["complete"]:
            best = study.best_trial
            client.log_metric(parent, "best_value", best.value, step=step)
            tags = [RunTag(_mlflow_key(f"best/{k}"), str(v)) for k, v in best.params.items()]
            client.log_batch(parent, tags=[RunTag("best_trial", str(best.number)), *tags])
            client.log_figure(parent, _history_figure(study), "optimization_history.png")
            importances = _importances_figure(study) if counts["complete"] > 1 else None
            if importances is not None:
                client.log_figure(parent, importances, "param_importances.png")
        client.log_artifact(parent, str(results_file))

    def _find_child(self, number: int) -> str | None:
        """The trial's run, if it has one."""
        found = self.client.search_runs(
            [self.experiment_id],
            filter_string=(
                f"tags.{TRIAL_TAG} = '{number}' and tags.`{PARENT_TAG}` = '{self.parent_id}'"
            ),
            max_results=1,
        )
        return found[0].info.run_id if found else None

    def _child(self, number: int) -> str:
        """The trial's training run, or a new child when the trial failed before it began."""
        found = self._find_child(number)
        if found:
            return found
        tags = trial_tags({"number": number, "parent_run_id": self.parent_id})
        return self.client.create_run(
            self.experiment_id, run_name=f"trial_{number}", tags=tags
        ).info.run_id


def _delete_checkpoints(client: MlflowClient, run_id: str) -> bool:
    """Delete a run's checkpoint artifacts; whether this call deleted them.

    A local artifact store is a folder, deleted race-safely; a server deletes what it holds,
    and one that no longer holds them (another worker was first) has nothing to delete.
    """
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
    from mlflow.utils.file_utils import local_file_uri_to_path

    uri = client.get_run(run_id).info.artifact_uri
    if urlparse(uri).scheme in ("", "file"):
        return remove_tree(Path(local_file_uri_to_path(uri)) / CHECKPOINTS)
    try:
        get_artifact_repository(uri).delete_artifacts(CHECKPOINTS)
    except Exception as error:  # cleanup: the trial's results stay whatever happens here
        if _not_found(error):
            log.debug("the checkpoints of run %s are gone already: %s", run_id, error)
        else:
            log.warning("cannot delete %s/%s: %s", uri, CHECKPOINTS, error)
        return False
    return True


def _not_found(error: Exception) -> bool:
    """Whether an artifact repository's error says the artifacts are not there (any more)."""
    from mlflow.exceptions import MlflowException

    status = getattr(getattr(error, "response", None), "status_code", None)
    return (
        isinstance(error, FileNotFoundError)
        or status == 404
        or (isinstance(error, MlflowException) and error.error_code == "RESOURCE_DOES_NOT_EXIST")
    )


def _named_parent(study: optuna.Study, created: bool) -> str | None:
    """The parent run the study names; a worker that did not create the study waits for its
    creator, which names the parent before it asks for the first trial."""
    deadline = time.monotonic() + (0 if created else PARENT_WAIT_S)
    while True:
        has_trials = bool(study.get_trials(deepcopy=False))  # read before the attribute
        parent = study.user_attrs.get(PARENT_ATTR)
        if parent or has_trials or time.monotonic() >= deadline:
            return parent
        time.sleep(0.5)


def _mlflow_key(key: str) -> str:
    """An override key as an MLflow param or tag name (``+key`` and ``key@pkg`` included)."""
    return re.sub(r"[^\w\-. /]", "_", key)


def _history_figure(study: optuna.Study) -> Figure:
    """Every complete trial's objective, and the best one so far."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator
    from optuna.study import StudyDirection
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    pick = max if study.direction == StudyDirection.MAXIMIZE else min
    best, best_so_far = None, []
    for trial in done:
        best = trial.value if best is None else pick(best, trial.value)
        best_so_far.append(best)
    figure = Figure(figsize=(6, 4), layout="constrained")
    axes = figure.subplots()
    numbers = [t.number for t in done]
    axes.scatter(numbers, [t.value for t in done], label="trial")
    axes.step(numbers, best_so_far, where="post", color="tab:red", label="best so far")
    axes.set(xlabel="trial", ylabel="objective", title=f"{study.study_name}: optimization history")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.legend()
    return figure


def _importances_figure(study: optuna.Study) -> Figure | None:
    """Importances of the sampled params (Optuna's default evaluator); None while the trials
    cannot tell them apart."""
    from matplotlib.figure import Figure
    from optuna.importance import get_param_importances

    try:
        importances = get_param_importances(study)
    except (ValueError, RuntimeError) as err:
        log.info("no parameter importances yet: %s", err)
        return None
    if not importances:
        return None
    names = list(importances)[::-1]
    figure = Figure(figsize=(6, 1 + 0.4 * len(names)), layout="constrained")
    axes = figure.subplots()
    axes.barh(names, [importances[name] for name in names])
    axes.set(xlabel="importance", title=f"{study.study_name}: parameter importances")
    return figure
