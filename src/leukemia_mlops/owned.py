"""Deleting only what the project wrote.

Output folders are configurable (``paths.prepared_dir=~/Documents`` is one typo away), so a
folder is replaced only when it carries proof that this project wrote it: the marker file
:data:`MARKER` that :func:`claim` puts in every folder it creates, or a file the caller
names (such as the manifest of a cache written before markers existed).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from leukemia_mlops.errors import InputError

MARKER = ".leukemia-mlops-output"


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
