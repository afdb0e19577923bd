"""What a run was made from: code version, data version and the resolved config."""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import xxhash

from leukemia_mlops.redaction import redact

MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value


def git_commit(cwd: str | Path = ".") -> str:
    """The checked-out commit, ``-dirty`` if tracked files changed, ``unknown`` outside git."""
    try:
        commit = _git(cwd, "rev-parse", "HEAD")
        dirty = _git(cwd, "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit


def _git(cwd: str | Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, check=True, timeout=10
    ).stdout.strip()


def paths_digest(paths: Sequence[str | Path]) -> str:
    """A hash of the files named (folders: every file under them, ``__pycache__`` left out)."""
    digest = xxhash.xxh3_128()
    for root in map(Path, paths):
        files = sorted(root.rglob("*")) if root.is_dir() else [root]
        for path in files:
            if path.is_file() and "__pycache__" not in path.parts:
                digest.update(f"{path.as_posix()}\0".encode())
                with open(path, "rb") as handle:
                    for block in iter(lambda h=handle: h.read(1 << 20), b""):
                        digest.update(block)
    return digest.hexdigest()


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Dotted ``key -> value`` pairs for MLflow params, secrets redacted, values capped."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = redact(json.dumps(value) if isinstance(value, list) else str(value))[
                :MAX_PARAM_LENGTH
            ]
    return flat


def config_hash(config: Mapping[str, Any]) -> str:
    """A stable hash of a resolved config, to tell whether a checkpoint belongs to it."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()
