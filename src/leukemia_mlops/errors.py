"""The project's expected failures, kept apart from bugs.

A :class:`ProjectError` is a failure the user can fix (a bad config value, a bad input file,
a service that does not answer): the stage commands print its message as one ``error:`` line
and exit with status 2. Any other exception is a bug and keeps its traceback (see
:func:`leukemia_mlops.cli.args.run_cli`). ``ConfigError`` and ``InputError`` are also
``ValueError`` and ``MissingInputError`` a ``FileNotFoundError``, so callers that catch the
built-in types keep working.
"""

from __future__ import annotations


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
