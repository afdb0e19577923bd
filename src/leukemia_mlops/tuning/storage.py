"""Where studies live: Optuna's RDB storage (sqlite or a shared database), pruners, heartbeats."""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optuna

# Heartbeats, their stale-trial callback and fail_stale_trials are marked experimental by
# Optuna, with no stable replacement: the project relies on them knowingly.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
# The campaign asks and tells (no Study.optimize) and beats each trial's heart itself, which
# Optuna warns about once per trial.
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with")
SQLITE_TIMEOUT_S = 60  # how long a sqlite writer waits for the other workers' locks
STORAGE_ATTEMPTS = 3


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

    Workers started together on a new database race to create its schema; a loser (a
    duplicate key, a table that already exists, a lock) finds the schema made when it tries
    again.
    """
    if not url:
        return None
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    sqlite = make_url(url).get_backend_name() == "sqlite"
    engine_kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}} if sqlite else None
    for _ in range(STORAGE_ATTEMPTS - 1):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **heartbeat)
        except (IntegrityError, OperationalError, ProgrammingError):
            time.sleep(1.0)
    return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **heartbeat)


def make_pruner(spec: Mapping[str, Any] | None) -> optuna.pruners.BasePruner:
    """The pruner a ``_target_`` mapping describes; none: never prune."""
    if not spec:
        return optuna.pruners.NopPruner()
    from hydra.utils import instantiate

    return instantiate(dict(spec))


def heartbeat_settings(interval: int, grace: int | None, retry: int) -> dict[str, Any]:
    """RDBStorage's heartbeat arguments (none when heartbeats are off)."""
    if not interval:
        return {}
    callback = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=retry) if retry else None
    return {
        "heartbeat_interval": interval,
        "grace_period": grace,
        "heartbeat_stale_trial_callback": callback,
    }


def trial_id(storage: optuna.storages.BaseStorage, study_name: str, number: int) -> int:
    """The storage's id of trial ``number`` of a study (public storage API, no private field)."""
    study_id = storage.get_study_id_from_name(study_name)
    return storage.get_trial_id_from_study_id_trial_number(study_id, number)
