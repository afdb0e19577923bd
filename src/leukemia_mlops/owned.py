"""Deleting only what the project wrote.

Output folders are configurable (``paths.prepared_dir=~/Documents`` is one typo away), so a
folder is replaced only when it carries proof that this project wrote it: the marker file
:data:`MARKER` that :func:`claim` puts in every folder it creates, or a file the caller
names (such as the manifest of a cache written before markers existed).

Cleanup that other workers may be doing at the same moment (the checkpoints of a sweep's
losing trials) goes through :func:`remove_tree`, which cannot fail the work it follows.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from leukemia_mlops.errors import InputError

MARKER = ".leukemia-mlops-output"
log = logging.getLogger(__name__)


def claim(folder: Path) -> Path:
    """Create ``folder`` (it must not exist) with the marker that lets the project replace it."""
    folder.mkdir(parents=True)
    (folder / MARKER).write_text("written by leukemia-mlops; safe for it to replace\n")
    return folder


def check_replaceable(folder: Path, *proofs: Path) -> None:
    """Raise :class:`InputError` unless ``folder`` is missing, empty or written by the project.

    Proof of ownership is its :data:`MARKER` or any of ``proofs`` being a file.
    """
    if not folder.exists() and not folder.is_symlink():
        return
    owned = any(proof.is_file() for proof in (folder / MARKER, *proofs))
    if folder.is_dir() and not folder.is_symlink() and (owned or not any(folder.iterdir())):
        return
    raise InputError(
        f"{folder} exists and was not written by leukemia-mlops (no {MARKER} file): "
        "refusing to replace it; choose another folder or remove this one yourself"
    )


def remove_owned(folder: Path, *proofs: Path) -> None:
    """Delete ``folder`` if the project wrote it (see :func:`check_replaceable`), else refuse."""
    check_replaceable(folder, *proofs)
    if folder.exists():
        shutil.rmtree(folder)


def remove_tree(folder: Path) -> bool:
    """Delete ``folder`` and everything in it, where other workers may be deleting it too.

    Listing a folder and then deleting it fails when another worker deletes it in between, so
    an entry already gone, anywhere in the walk, counts as deleted (logged at debug level) and
    the walk goes on. Any other failure (a permission, a symlink in the folder's place) is
    logged as a warning naming the path: cleanup never fails the work it follows. Returns
    whether this call deleted the folder itself (False: gone already, or not deletable).
    """
    failed_at_top = False

    def skip(function: Callable[..., Any], path: str, error: BaseException) -> None:
        nonlocal failed_at_top
        failed_at_top = failed_at_top or os.fspath(path) == os.fspath(folder)
        if isinstance(error, FileNotFoundError):
            log.debug("%s is gone already (another worker deleted it)", path)
        else:
            log.warning("cannot delete %s: %s", path, error)

    if sys.version_info >= (3, 12):
        shutil.rmtree(folder, onexc=skip)
    else:
        shutil.rmtree(folder, onerror=lambda function, path, info: skip(function, path, info[1]))
    return not failed_at_top
