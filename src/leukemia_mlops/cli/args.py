"""Shared argument handling of the stage commands, which run from ``params.yaml``."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence

from omegaconf import DictConfig

from leukemia_mlops.config import PARAMS_FILE, load_params
from leukemia_mlops.errors import BUG_HINT, exit_on_failure

__all__ = ["BUG_HINT", "run_cli", "stage_config", "stage_parser"]


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


def run_cli(body: Callable[[], None]) -> None:
    """Run a command body: an expected failure (:func:`~leukemia_mlops.errors.expected_failure`:
    a project error, or a library error that means bad input or a service down) prints one
    ``error:`` line and exits with status 2; anything else is a bug: its traceback, a line
    asking to report it, and status 1. What it prints and logs is redacted (no URL password)."""
    from leukemia_mlops.redaction import install_redaction

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    install_redaction()
    try:
        body()
    except Exception as err:
        exit_on_failure(err)
