"""Shared argument handling of the stage commands, which run from ``params.yaml``."""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Callable, Sequence

from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from leukemia_mlops.config import PARAMS_FILE, load_params
from leukemia_mlops.errors import ProjectError


def stage_parser(description: str) -> argparse.ArgumentParser:
    """``[--params FILE] [key=value ...]``, the arguments every stage command takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default=str(PARAMS_FILE), help="config file (params.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. seed=1")
    return parser


def stage_config(description: str, argv: Sequence[str] | None = None) -> DictConfig:
    """Parse the stage arguments and return the config the stage runs with."""
    args = stage_parser(description).parse_args(argv)
    return load_params(args.params, args.overrides)


BUG_HINT = (
    "this is a bug in leukemia-mlops, not a problem with your input: please report it "
    "with the traceback above"
)
#: OS errors that name a path the user gave (a missing or unreadable file, a folder in the way).
_PATH_ERRORS = (
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)


def run_cli(body: Callable[[], None]) -> None:
    """Run a command body: an expected failure (:func:`expected_failure`) prints one
    ``error:`` line and exits with status 2; anything else is a bug: its traceback, a line
    asking to report it, and status 1. What it prints and logs is redacted (no URL password)."""
    from leukemia_mlops.redaction import install_redaction

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    install_redaction()
    try:
        body()
    except Exception as err:
        if not expected_failure(err):
            traceback.print_exception(err, file=sys.stderr)
            print(BUG_HINT, file=sys.stderr)
            raise SystemExit(1) from None
        print(f"error: {one_line(err)}", file=sys.stderr)
        raise SystemExit(2) from None


def expected_failure(err: BaseException) -> bool:
    """Whether ``err`` is a failure the user can fix (bad config or input, a service down)."""
    from hydra.errors import InstantiationException
    from mlflow.exceptions import MlflowException

    if isinstance(err, InstantiationException):
        # No cause: a malformed node; an ImportError: a _target_ that does not exist.
        cause = err.__cause__
        return cause is None or isinstance(cause, ImportError) or expected_failure(cause)
    if isinstance(err, _PATH_ERRORS) and err.filename is not None:
        return True
    return isinstance(err, ProjectError | OmegaConfBaseException | MlflowException)


def one_line(err: BaseException) -> str:
    """The first line of an error's message, through Hydra's instantiation wrapper."""
    from hydra.errors import InstantiationException

    if isinstance(err, InstantiationException) and err.__cause__ is not None:
        err = err.__cause__
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__
