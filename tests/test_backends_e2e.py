"""Real tracking backends: an MLflow server over PostgreSQL, Optuna studies in PostgreSQL.

* four trainings log to one server at once and no metric point is lost;
* a run that loses the race to store a new dataset still links it, and a sweep worker that
  loses the race to create the study database's schema still opens it;
* two sweep workers, each trial a two-process DDP run (gloo), share one Optuna study in
  PostgreSQL and one MLflow server through the real Hydra multirun command line: distinct
  trial numbers, exactly the trials asked for, trials of both workers running at once, every
  trial's run nested under the study's one parent (the sweeps across nodes of README's
  "On a cluster", on one machine);
* the server is killed while a training logs to it: a short outage is ridden out by the
  MLflow client's retries; a longer one fails the run, whose data logged before the outage is
  intact once the server is back, and the same command then resumes it into the same run.

The figures these tests print (``-s``) are the ones ``docs/reliability.md`` reports.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import closing
from pathlib import Path

import optuna
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
from optuna.trial import TrialState
from servers import MlflowServer, postgres_bin_dir, server_sweep_command, start_postgres
from sqlalchemy import event
from sqlalchemy.engine import Engine

from leukemia_mlops.config import write_params
from leukemia_mlops.models.metrics import MONITOR
from leukemia_mlops.tracking.datasets import log_inputs_once_stored
from leukemia_mlops.training.launch import OUTCOME_FILE
from leukemia_mlops.tuning.runs import PARENT_ATTR, PARENT_TAG, STATE_TAG, TRIAL_TAG
from leukemia_mlops.tuning.storage import open_storage
from leukemia_mlops.tuning.study import WORKER_ATTR

pytestmark = pytest.mark.slow

TIMEOUT_S = 420  # one process, at most (every wait below is bounded)
CONCURRENT = 4
EPOCHS = 3
# What urllib3 logs when the MLflow client retries a metric batch it could not send.
RETRIED_METRICS = re.compile(r"Retrying .*log-batch")
# Every per-epoch metric of a run; ``best/...`` is logged once, at the end.
ONCE = ("best/",)


@pytest.fixture(scope="module")
def postgres():
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (no initdb/postgres): apt-get install postgresql")
    server = start_postgres(bin_dir)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mlflow_server(postgres, tmp_path_factory):
    base = tmp_path_factory.mktemp("mlflow_server")
    server = MlflowServer(postgres.create_database("mlflow"), base / "artifacts", base / "log")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def client(mlflow_server, monkeypatch):
    """A client of the test itself, which fails fast instead of retrying for minutes; the
    server is up again for the next test even if this one failed while it was down."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    yield MlflowClient(mlflow_server.url)
    if mlflow_server.process is None:
        mlflow_server.start()


@pytest.fixture
def spawned():
    """Processes a test starts; any still running when it ends (a failed test) are killed."""
    processes: list[subprocess.Popen] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


def child_env(**extra: str) -> dict[str, str]:
    """One torch thread per process (the runs share two cores), unbuffered logs, and the
    MLflow client's default HTTP retries unless ``extra`` sets them."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key != "MLFLOW_TRACKING_URI" and not key.startswith("MLFLOW_HTTP_REQUEST_")
    }
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return {**env, **extra}


def start_training(workdir: Path, env: dict[str, str]) -> subprocess.Popen:
    """``cli.train`` on ``workdir/params.yaml``; its output goes to ``workdir/train.log``."""
    with open(workdir / "train.log", "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "leukemia_mlops.cli.train", "--params", "params.yaml"],
            cwd=workdir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def finish(process: subprocess.Popen, log: Path) -> str:
    """Wait for ``process`` (killing it past the limit); returns its log."""
    try:
        process.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        pytest.fail(f"no end in {TIMEOUT_S} s: {log.read_text()[-3000:]}")
    return log.read_text(errors="replace")


def training_dir(tmp_path: Path, name: str, tiny_config, server: MlflowServer, *extra) -> Path:
    workdir = tmp_path / name
    workdir.mkdir()
    cfg = tiny_config(
        f"paths.models_dir={workdir / 'models'}",
        f"paths.reports_dir={workdir / 'reports'}",
        f"logger.mlflow.tracking_uri={server.url}",
        f"logger.mlflow.run_name={name}",
        "callbacks.early_stopping.patience=100",
        *extra,
    )
    write_params(cfg, workdir / "params.yaml")
    return workdir


def run_state(workdir: Path) -> dict:
    return json.loads((workdir / "models/model/run.json").read_text())


def histories(client: MlflowClient, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Every metric of the run as its (step, value) points, by step."""
    keys = client.get_run(run_id).data.metrics
    return {
        key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        for key in keys
    }


def assert_every_epoch_once(points: dict[str, list[tuple[int, float]]], epochs: int) -> int:
    """Each per-epoch metric holds one point per epoch; returns the number of points."""
    per_epoch = {k: v for k, v in points.items() if not k.startswith(ONCE)}
    assert MONITOR in per_epoch and "train/loss" in per_epoch
    for key, history in per_epoch.items():
        steps = [step for step, _ in history]
        assert len(steps) == epochs and len(set(steps)) == epochs, (key, history)
    return sum(len(v) for v in points.values())


def wait_for_line(log: Path, offset: int, pattern: re.Pattern, process: subprocess.Popen) -> str:
    """Wait until ``log`` has a line matching ``pattern`` past byte ``offset``; returns it."""
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text(errors="replace")[-3000:]
        with open(log, "rb") as text:
            text.seek(offset)
            found = pattern.search(text.read().decode(errors="replace"))
        if found:
            return found.group(0)
        time.sleep(0.2)
    raise AssertionError(f"no line matching {pattern.pattern!r} in {TIMEOUT_S} s")


def wait_for_epochs(
    client: MlflowClient, workdir: Path, process: subprocess.Popen, epochs: int
) -> str:
    """Wait until the run has logged ``epochs`` validation points; returns its run id."""
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        assert process.poll() is None, (workdir / "train.log").read_text()[-3000:]
        if (workdir / "models/model/run.json").is_file():
            run_id = run_state(workdir)["mlflow_run_id"]
            if len(client.get_metric_history(run_id, MONITOR)) >= epochs:
                return run_id
        time.sleep(0.5)
    raise AssertionError(f"{epochs} epochs not logged in {TIMEOUT_S} s")


def test_concurrent_trainings_lose_no_metric_point(
    mlflow_server, client, spawned, tiny_config, tmp_path
):
    started = time.monotonic()
    workdirs = [
        training_dir(
            tmp_path,
            f"worker_{i}",
            tiny_config,
            mlflow_server,
            "logger.mlflow.experiment_name=concurrent-trainings",
            f"trainer.max_epochs={EPOCHS}",
            f"seed={i}",
        )
        for i in range(CONCURRENT)
    ]
    # All at once: they also race to create the experiment.
    processes = [start_training(w, child_env()) for w in workdirs]
    spawned.extend(processes)
    for process, workdir in zip(processes, workdirs, strict=True):
        log = finish(process, workdir / "train.log")
        assert process.returncode == 0, log[-3000:]

    runs, points = [], 0
    for workdir in workdirs:
        state = run_state(workdir)
        assert state["status"] == "finished"
        run = client.get_run(state["mlflow_run_id"])
        assert run.info.status == "FINISHED"
        history = histories(client, run.info.run_id)
        points += assert_every_epoch_once(history, EPOCHS)
        # What MLflow holds is what the run computed, epoch by epoch.
        local = pd.read_csv(workdir / "models/model/history.csv")
        assert [v for _, v in history[MONITOR]] == pytest.approx(local[MONITOR].tolist())
        runs.append(run)
    assert len({r.info.run_id for r in runs}) == CONCURRENT
    assert len({r.info.experiment_id for r in runs}) == 1
    # The runs did overlap in time: the last one started before the first one ended.
    assert max(r.info.start_time for r in runs) < min(r.info.end_time for r in runs)
    print(
        f"\n{CONCURRENT} concurrent runs x {EPOCHS} epochs: {points} metric points, "
        f"none lost or repeated ({time.monotonic() - started:.0f} s)"
    )


def wait_for_lock_wait(postgres, database: str, still_waiting) -> None:
    """Until a session of ``database`` waits on a lock (bounded by ``TIMEOUT_S``).

    Each poll is its own transaction: PostgreSQL keeps one snapshot of ``pg_stat_activity``
    per transaction."""
    deadline = time.monotonic() + TIMEOUT_S
    connection = postgres.connect()
    connection.autocommit = True
    with closing(connection), connection.cursor() as cursor:
        while time.monotonic() < deadline and still_waiting():
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = %s AND wait_event_type = 'Lock'",
                (database,),
            )
            if cursor.fetchone()[0]:
                return
            time.sleep(0.05)
    pytest.fail("the server's dataset insert never waited on the test's lock")


def test_a_dataset_insert_race_lost_to_another_run_still_links_the_dataset(
    postgres, mlflow_server, client
):
    """The race two runs of one experiment run when both log a new dataset, made certain:
    the test inserts the dataset row in an open transaction, the server's ``log_inputs``
    finds no row and blocks on inserting the same key, the test commits, and the server's
    insert fails on the unique key. The project's logging must link the dataset anyway."""
    experiment_id = client.create_experiment("dataset-insert-race")
    run_id = client.create_run(experiment_id).info.run_id
    dataset = Dataset(name="synthetic-train", digest="race0123", source_type="local", source="{}")
    inputs = [DatasetInput(dataset, [InputTag(MLFLOW_DATASET_CONTEXT, "training")])]
    rival = postgres.connect("mlflow")  # a transaction of "another run", left open
    with rival.cursor() as cursor:
        cursor.execute(
            "INSERT INTO datasets (dataset_uuid, experiment_id, name, digest,"
            " dataset_source_type, dataset_source) VALUES (%s, %s, %s, %s, %s, %s)",
            ("f" * 32, int(experiment_id), dataset.name, dataset.digest, "local", "{}"),
        )
    outcome: list[BaseException | None] = []

    def log() -> None:
        try:
            log_inputs_once_stored(client, run_id, inputs)
            outcome.append(None)
        except BaseException as error:
            outcome.append(error)

    logger = threading.Thread(target=log)
    logger.start()
    try:
        wait_for_lock_wait(postgres, "mlflow", logger.is_alive)
    finally:
        rival.commit()
        rival.close()
    logger.join(TIMEOUT_S)
    assert outcome == [None], outcome
    linked = [entry.dataset for entry in client.get_run(run_id).inputs.dataset_inputs]
    assert [(d.name, d.digest) for d in linked] == [("synthetic-train", "race0123")]


def test_a_schema_race_lost_to_another_sweep_worker_still_opens_the_storage(postgres):
    """Workers opening a new study database race to create Optuna's schema. The race is made
    certain: just before the storage's own ``CREATE TABLE alembic_version`` runs, the test
    creates that table from another connection, as the other worker would; the storage must
    open anyway."""
    url = postgres.create_database("schema_race")
    rival = postgres.connect("schema_race")
    rival.autocommit = True
    raced: list[str] = []

    def create_it_first(connection, cursor, statement, *_) -> None:
        if statement.lstrip().startswith("CREATE TABLE alembic_version") and not raced:
            raced.append(statement)
            with rival.cursor() as other:
                other.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) PRIMARY KEY)")

    event.listen(Engine, "before_cursor_execute", create_it_first)
    try:
        storage = open_storage(url)
    finally:
        event.remove(Engine, "before_cursor_execute", create_it_first)
        rival.close()
    assert raced, "the storage never created its version table"
    assert storage.get_all_studies() == []


def sweep_worker(tmp_path: Path, prepared: Path, storage: str, server: MlflowServer, seed: int):
    """One worker of the shared study, through the real Hydra multirun command line; each of
    its trials trains on two DDP processes, as a node's GPUs would."""
    command = [
        *server_sweep_command(
            storage, "pg_shared", server.url, "postgres-sweep", prepared, tmp_path
        ),
        f"hydra.sweeper.sampler.seed={seed}",
        "hydra.sweeper.pruner.n_startup_trials=100",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        "trainer=ddp_cpu",
        "trainer.enable_model_summary=false",
        "data.prepare.image_size=48",
    ]
    log = tmp_path / f"sweep_{seed}.log"
    with open(log, "ab") as out:
        process = subprocess.Popen(
            command, cwd=tmp_path, env=child_env(), stdout=out, stderr=subprocess.STDOUT
        )
    return process, log


def assert_workers_overlapped(trials: list[optuna.trial.FrozenTrial]) -> None:
    """Two workers ran two trials each, and a trial of one ran while one of the other did."""
    by_worker: dict[str, list[optuna.trial.FrozenTrial]] = {}
    for trial in trials:
        by_worker.setdefault(trial.user_attrs[WORKER_ATTR], []).append(trial)
    assert sorted(len(mine) for mine in by_worker.values()) == [2, 2], by_worker.keys()
    first, second = by_worker.values()
    assert any(
        a.datetime_start < b.datetime_complete and b.datetime_start < a.datetime_complete
        for a in first
        for b in second
    ), [
        (t.number, t.user_attrs[WORKER_ATTR], t.datetime_start, t.datetime_complete) for t in trials
    ]


def test_two_sweep_workers_share_a_postgres_study(
    postgres, mlflow_server, client, spawned, tiny_prepared, tmp_path
):
    started = time.monotonic()
    storage = postgres.create_database("optuna")
    workers = [sweep_worker(tmp_path, tiny_prepared, storage, mlflow_server, s) for s in (1, 2)]
    spawned.extend(process for process, _ in workers)
    for process, log in workers:
        output = finish(process, log)
        assert process.returncode == 0, output[-3000:]

    study = optuna.load_study(study_name="pg_shared", storage=storage)
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3]
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    # Each trial trained in a launched DDP child whose rank 0 recorded the outcome.
    assert all((tmp_path / f"sweep/trial_{n}" / OUTCOME_FILE).is_file() for n in range(4))
    assert_workers_overlapped(study.trials)
    parent_id = study.user_attrs[PARENT_ATTR]
    parent = client.get_run(parent_id)
    assert parent.data.tags["optuna_study"] == "pg_shared"
    experiment = parent.info.experiment_id
    parents = client.search_runs([experiment], filter_string="tags.optuna_study = 'pg_shared'")
    assert [p.info.run_id for p in parents] == [parent_id]  # one parent for both workers
    runs = client.search_runs([experiment])
    children = [r for r in runs if r.info.run_id != parent_id]
    # Every run of the experiment is a trial nested under the parent, once per trial.
    assert all(r.data.tags.get(PARENT_TAG) == parent_id for r in children)
    assert sorted(int(r.data.tags[TRIAL_TAG]) for r in children) == [0, 1, 2, 3]
    for child in children:
        trial = study.trials[int(child.data.tags[TRIAL_TAG])]
        assert child.data.tags[STATE_TAG] == "COMPLETE" and child.info.status == "FINISHED"
        assert child.data.metrics["trial/value"] == pytest.approx(trial.value)
        assert len(client.get_metric_history(child.info.run_id, MONITOR)) == 1
        # The storage URL reaches each trial's config; its password does not reach MLflow.
        assert postgres.password not in json.dumps(child.data.params)
        assert ":***@" in child.data.params["optuna_trial.storage"]
    print(
        f"\n2 workers on one PostgreSQL study: trials {sorted(t.number for t in study.trials)}, "
        f"{len(children)} nested runs under 1 parent ({time.monotonic() - started:.0f} s)"
    )


def test_a_short_server_outage_is_ridden_out_by_client_retries(
    mlflow_server, client, spawned, tiny_config, tmp_path
):
    epochs = 5
    workdir = training_dir(
        tmp_path,
        "short_outage",
        tiny_config,
        mlflow_server,
        "logger.mlflow.experiment_name=server-outage",
        f"trainer.max_epochs={epochs}",
    )
    # The MLflow client's default retries: 7, backing off 2, 4, 8 ... s (about 4 min in all).
    process = start_training(workdir, child_env())
    spawned.append(process)
    run_id = wait_for_epochs(client, workdir, process, 2)
    before = histories(client, run_id)
    log_file = workdir / "train.log"
    offset = log_file.stat().st_size
    mlflow_server.stop(signal.SIGKILL)
    down = time.monotonic()
    # The server comes back once the training has tried to log an epoch's metrics to it.
    retried = wait_for_line(log_file, offset, RETRIED_METRICS, process)
    mlflow_server.start()
    outage = time.monotonic() - down

    log = finish(process, workdir / "train.log")
    assert process.returncode == 0, log[-3000:]
    assert run_state(workdir)["status"] == "finished"
    after = histories(client, run_id)
    points = assert_every_epoch_once(after, epochs)
    for key, history in before.items():
        assert set(history) <= set(after[key]), key
    # The epochs logged during the outage arrived: every epoch is there (checked above).
    assert len(before[MONITOR]) < epochs
    assert client.get_run(run_id).info.status == "FINISHED"
    print(
        f"\nserver killed for {outage:.0f} s mid-run ({retried[:80]!r}): run finished, "
        f"{points} points, none lost"
    )


def test_a_long_server_outage_fails_the_run_and_a_rerun_resumes_it(
    mlflow_server, client, spawned, tiny_config, tmp_path
):
    epochs = 4
    workdir = training_dir(
        tmp_path,
        "long_outage",
        tiny_config,
        mlflow_server,
        "logger.mlflow.experiment_name=server-outage",
        f"trainer.max_epochs={epochs}",
    )
    # Retries bounded to a second or two, so that the outage outlasts them.
    short_retries = child_env(
        MLFLOW_HTTP_REQUEST_MAX_RETRIES="1",
        MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1",
        MLFLOW_HTTP_REQUEST_TIMEOUT="10",
    )
    process = start_training(workdir, short_retries)
    spawned.append(process)
    run_id = wait_for_epochs(client, workdir, process, 2)
    before = histories(client, run_id)
    mlflow_server.stop(signal.SIGKILL)
    down = time.monotonic()
    log = finish(process, workdir / "train.log")
    failed_after = time.monotonic() - down
    assert process.returncode == 2
    last_line = log.strip().splitlines()[-1]
    # The run stops with one `error:` line naming the server it could not reach.
    assert last_line.startswith("error: API request to") and mlflow_server.url in last_line, (
        last_line
    )
    assert run_state(workdir)["status"] == "running"  # left to be resumed

    mlflow_server.start()
    kept = histories(client, run_id)
    for key, history in before.items():
        assert set(history) <= set(kept[key]), key  # nothing logged before the outage is lost

    rerun = start_training(workdir, child_env())
    spawned.append(rerun)
    log = finish(rerun, workdir / "train.log")
    assert rerun.returncode == 0, log[-3000:]
    state = run_state(workdir)
    assert state["mlflow_run_id"] == run_id and state["status"] == "finished"
    after = histories(client, run_id)
    points = assert_every_epoch_once(after, epochs)
    for key, history in kept.items():
        assert set(history) <= set(after[key]), key
    print(
        f"\nserver killed for good mid-run: training failed {failed_after:.0f} s later with "
        f"{last_line[:160]!r}; after the restart the rerun resumed run {run_id}: {points} points, "
        f"every epoch once"
    )
