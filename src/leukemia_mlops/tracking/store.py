"""Where MLflow runs live: the local sqlite store under ``mlruns/`` or a tracking server."""

from __future__ import annotations

import functools
import os
from pathlib import Path

DEFAULT_EXPERIMENT = "leukemia-cnmc"
LOCK_SUFFIX = ".lock"  # beside a sqlite store: the lock its first creation is made under


def tracking_uri(configured: str | None, mlruns_dir: str | Path = "mlruns") -> str:
    """The configured URI, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<mlruns>/mlflow.db``.

    MLflow 3 refuses the plain file store, so the local default is sqlite. A sqlite store
    is created (see :func:`created_store`) before its URI is handed out.
    """
    if configured:
        return created_store(str(configured))
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return created_store(os.environ["MLFLOW_TRACKING_URI"])
    return local_store_uri(mlruns_dir)


def local_store_uri(mlruns_dir: str | Path = "mlruns") -> str:
    """``sqlite:///<mlruns>/mlflow.db``, the local store (its folder and tables created)."""
    mlruns = Path(mlruns_dir)
    mlruns.mkdir(parents=True, exist_ok=True)
    return created_store(f"sqlite:///{mlruns.resolve() / 'mlflow.db'}")


def created_store(uri: str) -> str:
    """``uri``, its tables created first when it names a new sqlite store.

    Processes that open a new sqlite store at once (sweep workers, SLURM ranks) all find it
    empty and all create its tables: every one but the first fails (``table ... already
    exists``). Under a file lock beside the database, the first creates them and the others
    find them. Other stores (a server, PostgreSQL) create their own.
    """
    database = _sqlite_file(uri)
    if database is not None:
        _create_sqlite_store(uri, database)
    return uri


def _sqlite_file(uri: str) -> Path | None:
    """The database file of a sqlite URI; None for other URIs and in-memory sqlite."""
    if not uri.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url

    database = make_url(uri).database
    return Path(database).resolve() if database and database != ":memory:" else None


@functools.cache  # once per process and store: MLflow keeps the store it built
def _create_sqlite_store(uri: str, database: Path) -> None:
    from filelock import FileLock
    from mlflow import MlflowClient

    database.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(database.with_name(database.name + LOCK_SUFFIX)):
        MlflowClient(uri)  # builds the store: its tables, their migrations, experiment 0


def artifact_location(uri: str, mlruns_dir: str | Path = "mlruns") -> str | None:
    """Local stores keep artifacts under ``mlruns/artifacts``; servers choose their own."""
    if uri.startswith("sqlite:"):
        return (Path(mlruns_dir).resolve() / "artifacts").as_uri()
    return None


def ensure_experiment(uri: str, name: str, mlruns_dir: str | Path = "mlruns") -> str:
    """The experiment's id, creating it (race-safe across concurrent workers) if missing.

    The first write of every training run and sweep, so a new sqlite store is created here
    too (:func:`created_store`), whoever made ``uri``.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(created_store(uri))
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location(uri, mlruns_dir))
    except MlflowException:
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def ui_url(
    uri: str,
    name: str = DEFAULT_EXPERIMENT,
    base_url: str = "http://127.0.0.1:5000",
    mlruns_dir: str | Path = "mlruns",
) -> str:
    """The UI page of experiment ``name``'s runs in the model-training view (created if missing).

    MLflow 3.17's UI opens in its GenAI view; the ``workflowType`` query of the page's URL
    switches it (the experiment tag ``mlflow.experimentKind`` alone does not).
    """
    page = f"#/experiments/{ensure_experiment(uri, name, mlruns_dir)}/runs"
    return f"{base_url.rstrip('/')}/{page}?workflowType=machine_learning"
