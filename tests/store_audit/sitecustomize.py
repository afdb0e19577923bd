"""Loaded at start-up by the job's ranks in tests (this folder on ``PYTHONPATH``): records every
file that the process opens under ``$STORE_AUDIT_DIR`` (the MLflow store's folder) into
``$STORE_AUDIT_LOG``, so a test sees which ranks touched the store."""

import os
import sys

_watched = os.environ.get("STORE_AUDIT_DIR")
_log = os.environ.get("STORE_AUDIT_LOG")


def _audit(event: str, args: tuple) -> None:
    if event not in ("open", "sqlite3.connect") or not args:
        return
    path = args[0]
    if isinstance(path, str | bytes | os.PathLike) and os.fsdecode(path).startswith(_watched):
        with open(_log, "a") as log:
            log.write(f"{event} {os.fsdecode(path)}\n")


if _watched and _log:
    sys.addaudithook(_audit)
