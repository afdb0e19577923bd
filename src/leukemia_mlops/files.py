"""Writing a file whole: every report, run file and cache file the project writes goes here.

A reader (another stage, a concurrent sweep worker, MLflow copying a run's files) sees either
the old content or the new, never half a file: the text goes to a temporary file in the same
folder, named for this host and process, which then replaces the target in one rename.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    try:
        temporary.write_text(text)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_json(path: str | Path, payload: Any, *, sort_keys: bool = True, **dumps: Any) -> None:
    """Write ``payload`` as indented JSON atomically; keys sorted unless ``sort_keys`` is false
    (the payload's own order); ``dumps`` goes to :func:`json.dumps` (``default=``)."""
    write_text(path, json.dumps(payload, indent=2, sort_keys=sort_keys, **dumps) + "\n")
