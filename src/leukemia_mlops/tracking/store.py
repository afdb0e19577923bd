"""Where MLflow runs live: the local sqlite store under ``mlruns/`` or a tracking server."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

from leukemia_mlops.errors import ConfigError

if TYPE_CHECKING:
    from mlflow.entities import Experiment
    from sqlalchemy.engine import Connection

DEFAULT_EXPERIMENT = "leukemia-cnmc"
LOCK_SUFFIX = ".lock"  # beside a sqlite store: the lock it is created and moved home under
STORE_FILE = "mlflow.db"  # a local store's database, in its mlruns folder
ARTIFACTS = "artifacts"  # a local store's artifact folder, beside its database
#: The experiment tag that files an experiment under the UI's model training, not GenAI.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
#: Where a sqlite store records artifact locations (MLflow 3.17's schema): experiments, runs,
#: logged models and registered model versions. Logged params keep the paths they had.
LOCATION_COLUMNS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("logged_models", "artifact_location"),
    ("model_versions", "storage_location"),
)

log = logging.getLogger(__name__)


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
    """``sqlite:///<mlruns>/mlflow.db``, the checkout's own store: created if new, and moved
    home (:func:`_move_home`) if its folder was copied or moved from another place."""
    database = Path(mlruns_dir).resolve() / STORE_FILE
    database.parent.mkdir(parents=True, exist_ok=True)
    uri = created_store(f"sqlite:///{database}")
    _move_home(database)
    return uri


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


def _lock(database: Path) -> Path:
    """The lock file beside a sqlite store, held while it is created or moved home."""
    return database.with_name(database.name + LOCK_SUFFIX)


@functools.cache  # once per process and store: MLflow keeps the store it built
def _create_sqlite_store(uri: str, database: Path) -> None:
    from filelock import FileLock
    from mlflow import MlflowClient

    database.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(_lock(database)):
        MlflowClient(uri)  # builds the store: its tables, their migrations, experiment 0


@functools.cache  # once per process and store, like its creation
def _move_home(database: Path) -> None:
    """Point the recorded artifact locations of a copied or moved local store into its folder.

    A sqlite store records absolute locations: ``<mlruns>/artifacts`` for the project's
    experiments, below it for their runs, logged models and model versions. A store at
    ``<here>/mlflow.db`` whose experiments say ``<there>/artifacts`` was copied or moved from
    ``<there>``, and ``<here>`` holds the copy of its files: every location under ``<there>``
    is rewritten to the same place under ``<here>`` (one transaction, under the store's lock),
    so no run of this store, old or new, reads or writes the other folder. A database copied
    without the ``artifacts/`` beside it is refused (:class:`ConfigError`).
    """
    import sqlalchemy as sa
    from filelock import FileLock

    here = database.parent
    experiments = sa.table("experiments", sa.column("artifact_location", sa.String))
    engine = sa.create_engine(f"sqlite:///{database}")
    try:
        with FileLock(_lock(database)), engine.begin() as db:
            recorded = db.scalars(sa.select(experiments.c.artifact_location)).all()
            for there in _former_homes(recorded, here):
                if (there / ARTIFACTS).is_dir() and not (here / ARTIFACTS).is_dir():
                    raise ConfigError(
                        f"{database} was copied from {there} without its {ARTIFACTS}/: copy "
                        f"{there / ARTIFACTS} to {here / ARTIFACTS}, or remove {database} "
                        "to start a new store"
                    )
                moved = sum(_rewrite(db, old, new) for old, new in _prefixes(there, here))
                log.warning(
                    "MLflow store %s was copied or moved from %s: %d artifact locations "
                    "now point into %s",
                    database,
                    there,
                    moved,
                    here,
                )
    finally:
        engine.dispose()


def _former_homes(locations: Iterable[str | None], here: Path) -> set[Path]:
    """The folders a store was copied or moved from: those of the ``<mlruns>/artifacts``
    experiment locations that lie outside ``here``."""
    paths = (_local_path(location) for location in locations if location)
    return {
        path.parent
        for path in paths
        if path is not None and path.name == ARTIFACTS and not path.is_relative_to(here)
    }


def _prefixes(there: Path, here: Path) -> tuple[tuple[str, str], ...]:
    """The spellings of a moved folder in recorded locations, old and new: a ``file:`` URI
    (how the project's experiments record it) and a plain path (MLflow's experiment 0)."""
    return (there.as_uri(), here.as_uri()), (str(there), str(here))


def _rewrite(db: Connection, old: str, new: str) -> int:
    """Rewrite the recorded locations that are ``old`` or lie below it to the same place
    under ``new``; the number of rows changed."""
    import sqlalchemy as sa

    changed = 0
    for table_name, column_name in LOCATION_COLUMNS:
        column = sa.column(column_name, sa.String)
        table = sa.table(table_name, column)
        below = sa.func.substr(column, 1, len(old) + 1) == old + "/"
        rest = sa.func.substr(column, len(old) + 1)
        update = table.update().where((column == old) | below).values({column_name: new + rest})
        changed += db.execute(update).rowcount
    return changed


def _local_path(location: str) -> Path | None:
    """The local folder of an artifact location (a ``file:`` URI or a plain path); None for
    remote ones (``s3://``, ``mlflow-artifacts:``)."""
    parsed = urlparse(location)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    return Path(location) if not parsed.scheme else None


def _artifact_home(uri: str, mlruns_dir: str | Path | None) -> Path | None:
    """The mlruns folder whose ``artifacts/`` keeps a sqlite store's artifacts: ``mlruns_dir``,
    else the store's own folder; None for other stores (servers choose their own)."""
    database = _sqlite_file(uri)
    if database is None:
        return None
    return Path(mlruns_dir).resolve() if mlruns_dir is not None else database.parent


def artifact_location(uri: str, mlruns_dir: str | Path | None = None) -> str | None:
    """Local stores keep artifacts under ``<mlruns>/artifacts`` (``mlruns_dir``, else the
    database's folder); servers choose their own."""
    home = _artifact_home(uri, mlruns_dir)
    return (home / ARTIFACTS).as_uri() if home is not None else None


def ensure_experiment(uri: str, name: str, mlruns_dir: str | Path | None = None) -> str:
    """The experiment's id, creating it (race-safe across concurrent workers) if missing.

    The first write of every training run and sweep, so a new sqlite store is created here
    too (:func:`created_store`), whoever made ``uri``, and moved home if it is the store of
    ``mlruns_dir`` and was copied (:func:`_move_home`). Project experiments are tagged as
    model development (``mlflow.experimentKind``). An experiment of a sqlite store that keeps
    its artifacts outside ``mlruns_dir`` (another checkout's) is refused: runs would write there.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(created_store(uri))
    home = _artifact_home(uri, mlruns_dir)
    if home is not None and _sqlite_file(uri) == home / STORE_FILE:
        _move_home(home / STORE_FILE)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(
                name,
                artifact_location=artifact_location(uri, mlruns_dir),
                tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
            )
        except MlflowException:
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if home is not None:
        _check_at_home(experiment, uri, home)
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        # An experiment made before the tag; a concurrent worker may be tagging it too.
        with contextlib.suppress(MlflowException):
            client.set_experiment_tag(
                experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND
            )
    return experiment.experiment_id


def _check_at_home(experiment: Experiment, uri: str, home: Path) -> None:
    """Refuse a local store's experiment whose artifacts lie outside this checkout's mlruns."""
    path = _local_path(experiment.artifact_location)
    if path is not None and not path.is_relative_to(home):
        raise ConfigError(
            f"experiment {experiment.name!r} of {uri} keeps its artifacts in {path}, outside "
            f"this checkout's {home}: leave logger.mlflow.tracking_uri unset to use this "
            "checkout's own store, share runs through a tracking server, or set another "
            "logger.mlflow.experiment_name"
        )


def ui_url(
    uri: str,
    name: str = DEFAULT_EXPERIMENT,
    base_url: str = "http://127.0.0.1:5000",
    mlruns_dir: str | Path | None = None,
) -> str:
    """The UI page of experiment ``name``'s runs in the model-training view (created if missing).

    MLflow 3.17's UI opens in its GenAI view; the ``workflowType`` query of the page's URL
    switches it (the experiment tag ``mlflow.experimentKind`` alone does not).
    """
    page = f"#/experiments/{ensure_experiment(uri, name, mlruns_dir)}/runs"
    return f"{base_url.rstrip('/')}/{page}?workflowType=machine_learning"
