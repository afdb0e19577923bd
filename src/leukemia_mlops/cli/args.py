"""Shared argument handling of the stage commands, which run from ``params.yaml``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from leukemia_mlops.config import PARAMS_FILE, load_params


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
    """Run a command body; expected failures print one clear line and exit with status 2."""
    from hydra.errors import InstantiationException
    from mlflow.exceptions import MlflowException

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        body()
    except (
        ValueError,
        TypeError,
        EOFError,
        FileNotFoundError,
        FileExistsError,
        KeyError,
        OmegaConfBaseException,
        InstantiationException,
        MlflowException,
    ) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        raise SystemExit(2) from None


def one_line(err: BaseException) -> str:
    """The first line of an error's message, through Hydra's instantiation wrapper."""
    from hydra.errors import InstantiationException

    if isinstance(err, InstantiationException) and err.__cause__ is not None:
        err = err.__cause__
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__
