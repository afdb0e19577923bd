"""The project's expected failures, kept apart from bugs.

A :class:`ProjectError` is a failure the user can fix (a bad config value, a bad input file,
a service that does not answer), and so are the few library errors that mean the same
(:func:`expected_failure`): the stage commands and Hydra's training main print their message
as one ``error:`` line and exit with status 2. Any other exception is a bug and keeps its
traceback (:func:`exit_on_failure`). ``ConfigError`` and ``InputError`` are also ``ValueError``
and ``MissingInputError`` a ``FileNotFoundError``, so callers that catch the built-in types
keep working.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import NoReturn


class ProjectError(Exception):
    """An expected failure whose message tells the user what to fix."""


class ConfigError(ProjectError, ValueError):
    """A config value or option that cannot work (unknown key, out of range, wrong type)."""


class InputError(ProjectError, ValueError):
    """An input file or folder that cannot be used as it is."""


class MissingInputError(ProjectError, FileNotFoundError):
    """An input file or folder that is not there."""


class ServiceError(ProjectError, ConnectionError):
    """A service (tracking server, database) that cannot be reached or refuses a request."""


def first_line(err: BaseException) -> str:
    """The first line of ``err``'s message (its type's name when it has none)."""
    return next(iter(str(err).splitlines()), type(err).__name__)


BUG_HINT = (
    "this is a bug in leukemia-mlops, not a problem with your input: please report it "
    "with the traceback above"
)

#: MLflow error codes that name something the user fixes outside the code: a run, model or
#: experiment they named that does not exist, credentials refused, a tracking URI that is no
#: MLflow server, a server that is down for now.
MLFLOW_USER_CODES = frozenset(
    {
        "RESOURCE_DOES_NOT_EXIST",
        "PERMISSION_DENIED",
        "UNAUTHENTICATED",
        "CUSTOMER_UNAUTHORIZED",
        "ENDPOINT_NOT_FOUND",
        "TEMPORARILY_UNAVAILABLE",
    }
)
#: OS errors that name a path the user gave (a missing or unreadable file, a folder in the way).
_PATH_ERRORS = (
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)
_PROJECT_DIR = str(Path(__file__).resolve().parent)


def expected_failure(err: BaseException) -> bool:
    """Whether ``err`` is a failure the user can fix (one ``error:`` line, status 2), not a bug.

    Expected: a :class:`ProjectError`; an OS error naming a path (a file the user named is
    missing or unreadable, a folder in the way); a YAML syntax error (``MarkedYAMLError``: it
    points into the user's file or override); Hydra's composition errors (an unknown config
    option or a malformed override) and a ``_target_`` that cannot be imported; OmegaConf
    errors about a *value* the user wrote: a ``???`` left unset, an interpolation that does
    not resolve or parse (or loops), a value of the wrong type for its field; MLflow errors in
    :data:`MLFLOW_USER_CODES`, a URL or tracking URI MLflow refuses, and a server that cannot be
    reached or answers too late.

    Everything else is a bug and keeps its traceback: every ``TypeError``, ``KeyError`` and
    ``AttributeError``; OmegaConf's undeclared-key reads (``ConfigAttributeError``,
    ``ConfigKeyError``: a stage config holds only the keys its ``dvc.yaml`` entry declares, in
    struct mode, so such a read is a stage that uses a key it did not declare), writes to a
    read-only config and values only code puts in one (``UnsupportedValueType``); any other
    MLflow error (a value MLflow refuses is the project's to get right).
    """
    import yaml
    from hydra.errors import (
        ConfigCompositionException,
        InstantiationException,
        OverrideParseException,
    )
    from omegaconf.errors import (
        ConfigCycleDetectedException,
        GrammarParseError,
        InterpolationResolutionError,
        MissingMandatoryValue,
        UnsupportedValueType,
        ValidationError,
    )

    if isinstance(err, ProjectError):
        return True
    if isinstance(err, InstantiationException):
        # No cause: a malformed node; an ImportError not raised by project code: a _target_
        # that does not exist (one raised while importing a project module is a bug).
        cause = err.__cause__
        if cause is None:
            return True
        if isinstance(cause, ImportError):
            return not _raised_in_project(cause)
        return expected_failure(cause)
    if isinstance(err, _PATH_ERRORS):
        return err.filename is not None
    if isinstance(err, ValidationError) and not isinstance(err, UnsupportedValueType):
        return True
    user_errors = (
        yaml.MarkedYAMLError,
        ConfigCompositionException,
        OverrideParseException,
        MissingMandatoryValue,
        InterpolationResolutionError,
        GrammarParseError,
        ConfigCycleDetectedException,
    )
    return isinstance(err, user_errors) or _mlflow_user_error(err)


def _mlflow_user_error(err: BaseException) -> bool:
    """An MLflow error the user fixes (see :func:`expected_failure`)."""
    import requests
    from mlflow.exceptions import InvalidUrlException, MlflowException
    from mlflow.tracking.registry import UnsupportedModelRegistryStoreURIException

    if not isinstance(err, MlflowException):
        return False
    refused_uri = (InvalidUrlException, UnsupportedModelRegistryStoreURIException)
    if err.error_code in MLFLOW_USER_CODES or isinstance(err, refused_uri):
        return True
    unreachable = (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError)
    cause: BaseException | None = err
    while cause is not None:  # MLflow wraps requests' error, with or without `from`
        if isinstance(cause, unreachable):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def _raised_in_project(err: BaseException) -> bool:
    """Whether ``err``'s traceback passes through the project's own source files."""
    frame = err.__traceback__
    while frame is not None:
        if frame.tb_frame.f_code.co_filename.startswith(_PROJECT_DIR):
            return True
        frame = frame.tb_next
    return False


def one_line(err: BaseException) -> str:
    """The first line of an error's message, through Hydra's instantiation wrapper."""
    from hydra.errors import InstantiationException

    if isinstance(err, InstantiationException) and err.__cause__ is not None:
        err = err.__cause__
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def exit_on_failure(err: BaseException) -> NoReturn:
    """Leave the process for ``err``: an expected failure (:func:`expected_failure`) prints one
    ``error:`` line and exits with status 2; a bug prints its traceback and a line asking to
    report it (:data:`BUG_HINT`) and exits with status 1."""
    if expected_failure(err):
        print(f"error: {one_line(err)}", file=sys.stderr)
        raise SystemExit(2) from None
    traceback.print_exception(err, file=sys.stderr)
    print(BUG_HINT, file=sys.stderr)
    raise SystemExit(1) from None
