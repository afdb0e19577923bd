"""Workers that share a store never trip over each other.

N processes (spawned, so each has its own MLflow and Optuna state) wait on one barrier and
then take the same step on a real sqlite MLflow store and local artifact store at once:
the cleanup of a finished sweep's losing trials, or the first creation of a new store.
No step waits a set time: the barrier alone lines them up, and the asserts hold whatever
order they then run in.
"""

from __future__ import annotations

import logging
import multiprocessing
import shutil
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
import requests
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, RESOURCE_DOES_NOT_EXIST
from mlflow.utils.file_utils import local_file_uri_to_path
from optuna.distributions import FloatDistribution

from leukemia_mlops.owned import remove_tree
from leukemia_mlops.tracking.run_files import CHECKPOINTS
from leukemia_mlops.tracking.store import ensure_experiment, local_store_uri
from leukemia_mlops.tuning.runs import SweepRuns, _not_found, trial_tags
from leukemia_mlops.tuning.storage import open_storage

WORKERS = 4
WAIT_S = 300  # for a worker to reach the barrier or to end: a hang fails, it never passes
EXPERIMENT = "shared"
STUDY = "shared"
TRIALS = 6
KEEP = 2  # the best KEEP of TRIALS keep their checkpoints
FOLDERS, FILES = 20, 100  # per trial's checkpoints: thousands of entries, so deletions overlap


# ---------------------------------------------------------------- the worker processes


@dataclass(frozen=True)
class Sweep:
    """A finished sweep's study, store and job directories, as a worker reaches them."""

    uri: str
    storage: str
    experiment_id: str
    parent_id: str
    sweep_dir: Path


def _log_to(file: Path) -> None:
    """Send the project's log records, debug ones included, to the worker's own file."""
    handler = logging.FileHandler(file)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
    project = logging.getLogger("leukemia_mlops")
    project.setLevel(logging.DEBUG)
    project.addHandler(handler)


def keep_best_worker(barrier, sweep: Sweep, log_file: Path) -> None:
    """The end of one worker's campaign: its last cleanup, in step with the others'."""
    _log_to(log_file)
    study = optuna.load_study(study_name=STUDY, storage=open_storage(sweep.storage))
    runs = SweepRuns(MlflowClient(sweep.uri), sweep.experiment_id, sweep.parent_id)
    barrier.wait(WAIT_S)
    runs.keep_best(study, KEEP, sweep.sweep_dir, campaign_over=True)


def new_store_worker(barrier, mlruns: Path, log_file: Path) -> None:
    """A worker that opens the same brand-new store as the others, at the same moment."""
    _log_to(log_file)
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401  (imported before the race)

    barrier.wait(WAIT_S)
    ensure_experiment(local_store_uri(mlruns), EXPERIMENT, mlruns)


def run_together(target, *args, workers: int = WORKERS, logs: Path) -> list[int]:
    """Run ``target(barrier, *args, log_file)`` in ``workers`` spawned processes; exit codes."""
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(workers)
    logs.mkdir(parents=True, exist_ok=True)
    processes = [
        context.Process(target=target, args=(barrier, *args, logs / f"worker_{i}.log"))
        for i in range(workers)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(WAIT_S)
    for process in processes:
        if process.is_alive():
            process.kill()
    return [process.exitcode for process in processes]


# ---------------------------------------------------------------- a finished sweep


def files_under(root: Path) -> dict[str, bytes]:
    """Relative path -> content of every file under ``root``."""
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def checkpoint_tree(root: Path, number: int, folders: int = FOLDERS, files: int = FILES) -> Path:
    """A trial's checkpoints as training leaves them, in many files."""
    for folder in range(folders):
        part = root / f"part_{folder}"
        part.mkdir(parents=True)
        for file in range(files):
            (part / f"{file}.ckpt").write_bytes(f"trial {number} {folder}/{file}".encode() * 8)
    return root


@pytest.fixture
def finished_sweep(tmp_path: Path) -> tuple[Sweep, dict[int, Path], dict[int, Path]]:
    """A study of TRIALS complete trials (trial n scores n) and their child runs, each holding
    a ``checkpoints/`` folder in the store and in its job directory; the trials' artifact and
    job-directory checkpoint folders."""
    mlruns, sweep_dir = tmp_path / "mlruns", tmp_path / "sweep"
    uri, storage = local_store_uri(mlruns), f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(storage=storage, study_name=STUDY, direction="maximize")
    for number in range(TRIALS):
        study.add_trial(
            optuna.trial.create_trial(
                params={"lr": number / 10},
                distributions={"lr": FloatDistribution(0.0, 1.0)},
                value=float(number),
            )
        )
    runs = SweepRuns.open(uri, EXPERIMENT, mlruns, study, created=True)
    client = runs.client
    stored, scratch = {}, {}
    for number in range(TRIALS):
        link = {"number": number, "parent_run_id": runs.parent_id}
        run = client.create_run(
            runs.experiment_id, run_name=f"trial_{number}", tags=trial_tags(link)
        )
        source = checkpoint_tree(tmp_path / "trained" / str(number), number)
        client.log_artifacts(run.info.run_id, str(source), CHECKPOINTS)
        stored[number] = Path(local_file_uri_to_path(run.info.artifact_uri)) / CHECKPOINTS
        scratch[number] = sweep_dir / f"trial_{number}" / CHECKPOINTS
        checkpoint_tree(scratch[number], number)
    sweep = Sweep(uri, storage, runs.experiment_id, runs.parent_id, sweep_dir)
    return sweep, stored, scratch


def kept_and_losing() -> tuple[list[int], list[int]]:
    """Trial n scored n: the last KEEP are the best."""
    return list(range(TRIALS - KEEP, TRIALS)), list(range(TRIALS - KEEP))


# ---------------------------------------------------------------- the tests


@pytest.mark.slow
def test_workers_ending_together_delete_the_losers_checkpoints_once(finished_sweep, tmp_path):
    sweep, stored, scratch = finished_sweep
    kept, losing = kept_and_losing()
    expected = {number: files_under(tmp_path / "trained" / str(number)) for number in kept}

    codes = run_together(keep_best_worker, sweep, logs=tmp_path / "logs")

    assert codes == [0] * WORKERS, _logs(tmp_path / "logs")
    for number in losing:
        assert not stored[number].exists(), f"trial {number} kept its checkpoints"
    for number in kept:
        assert files_under(stored[number]) == expected[number], f"trial {number} was touched"
    assert not any(folder.exists() for folder in scratch.values())  # the campaign is over


@pytest.mark.slow
def test_workers_creating_one_new_store_at_once_all_succeed(tmp_path):
    mlruns = tmp_path / "mlruns"

    codes = run_together(new_store_worker, mlruns, logs=tmp_path / "logs")

    assert codes == [0] * WORKERS, _logs(tmp_path / "logs")
    experiments = MlflowClient(local_store_uri(mlruns)).search_experiments()
    assert sorted(e.name for e in experiments) == ["Default", EXPERIMENT]


@pytest.mark.slow
def test_a_cleanup_that_truly_fails_is_a_warning_naming_its_path(finished_sweep, tmp_path):
    # A symlink in a checkpoints folder's place: rmtree refuses it (root ignores permissions).
    sweep, stored, scratch = finished_sweep
    _, losing = kept_and_losing()
    elsewhere = checkpoint_tree(tmp_path / "elsewhere", 99)
    expected = files_under(elsewhere)
    blocked = [stored[losing[0]], scratch[losing[1]]]
    for folder in blocked:
        shutil.rmtree(folder)
        folder.symlink_to(elsewhere, target_is_directory=True)

    codes = run_together(keep_best_worker, sweep, logs=tmp_path / "logs")

    assert codes == [0] * WORKERS, _logs(tmp_path / "logs")
    for log_file in sorted((tmp_path / "logs").iterdir()):
        warnings = [line for line in log_file.read_text().splitlines() if line.startswith("WARN")]
        for folder in blocked:
            assert any(str(folder) in line for line in warnings), (log_file, warnings)
    assert files_under(elsewhere) == expected  # never deleted through the link
    assert not any(stored[number].exists() for number in losing[1:])  # the rest went on


def test_remove_tree_counts_a_missing_folder_as_deleted(tmp_path, caplog):
    folder = checkpoint_tree(tmp_path / "checkpoints", 0, folders=2, files=2)
    with caplog.at_level(logging.DEBUG, logger="leukemia_mlops"):
        assert remove_tree(folder) is True
        assert remove_tree(folder) is False  # gone already: nothing to do, nothing raised
    assert not folder.exists()
    assert [r.levelname for r in caplog.records] == ["DEBUG"]
    assert str(folder) in caplog.records[0].getMessage()


def test_remove_tree_warns_of_what_it_cannot_delete_and_goes_on(tmp_path, caplog):
    target = checkpoint_tree(tmp_path / "target", 0, folders=2, files=2)
    folder = tmp_path / "checkpoints"
    folder.symlink_to(target, target_is_directory=True)
    with caplog.at_level(logging.WARNING, logger="leukemia_mlops"):
        assert remove_tree(folder) is False
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert str(folder) in caplog.records[0].getMessage()
    assert folder.is_symlink() and len(files_under(target)) == 4


def http_error(status: int) -> requests.HTTPError:
    response = requests.Response()
    response.status_code = status
    return requests.HTTPError(f"{status}", response=response)


@pytest.mark.parametrize(
    ("error", "gone"),
    [
        (FileNotFoundError("checkpoints"), True),
        (MlflowException("no such artifact", error_code=RESOURCE_DOES_NOT_EXIST), True),
        (http_error(404), True),
        (MlflowException("boom", error_code=INTERNAL_ERROR), False),
        (http_error(500), False),
        (PermissionError("checkpoints"), False),
    ],
)
def test_a_server_that_no_longer_holds_the_checkpoints_has_nothing_to_delete(error, gone):
    # Gone already is debug-level news; anything else a server says is a warning.
    assert _not_found(error) is gone


def _logs(folder: Path) -> str:
    """The ends of the workers' logs, for a failure's message (tracebacks go to stderr)."""
    return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(folder.glob("*")))
