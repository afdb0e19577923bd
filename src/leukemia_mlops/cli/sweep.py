"""``python -m leukemia_mlops.cli.sweep``: the DVC sweep stage; tunes hyperparameters with Optuna.

Runs ``python -m leukemia_mlops.train -m hparams_search=<sweep.hparams_search>`` (a Hydra
multirun through the Optuna sweeper) pinned to params.yaml's settings, until the study holds
``sweep.n_trials`` finished trials of ``sweep.max_epochs`` epochs (the sweeper's ``top_up``:
a rerun after a crash finishes the same campaign, its killed trial failed and retried), then
writes
``reports/best_params.yaml`` (the best trial's Hydra overrides, and the swept part of its
config as one nested mapping) and ``reports/sweep.json`` (the best value and the trial counts).

The study is ``<hparams_search>-<hash of the config it runs with>`` unless ``sweep.study_name``
names one: a changed config starts a fresh study, and the reports of an unchanged one are
reproducible. The study lives in the search space's storage, the trials' directories under
``multirun/sweep/<study>/``.
"""

from __future__ import annotations

import json
import logging
import shlex
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from hydra.core.override_parser.types import Transformer
from omegaconf import DictConfig, OmegaConf

from leukemia_mlops.cli.args import run_cli, stage_config
from leukemia_mlops.config import CONF_DIR
from leukemia_mlops.tracking.provenance import config_hash

log = logging.getLogger(__name__)
# The params.yaml sections the trials run with; the model is what the search space picks.
PINNED_SECTIONS = ("seed", "paths", "data", "datamodule", "trainer", "callbacks", "logger")
SWEEPS_DIR = Path("multirun/sweep")


def main(argv: Sequence[str] | None = None) -> None:
    def body() -> None:
        cfg = stage_config(__doc__, argv)
        from hydra_plugins.leukemia_optuna_sweeper.optuna_sweeper import RESULTS_FILE

        digest = config_hash(OmegaConf.to_container(cfg, resolve=True))[:10]
        study_name = cfg.sweep.study_name or f"{cfg.sweep.hparams_search}-{digest}"
        sweep_dir = SWEEPS_DIR / study_name
        command = sweep_command(cfg, study_name, sweep_dir)
        log.info("%s", shlex.join(command))
        finished = subprocess.run(command, check=False)
        if finished.returncode != 0:
            print(f"error: the sweep failed; its trials are in {sweep_dir}", file=sys.stderr)
            raise SystemExit(finished.returncode)
        results = yaml.safe_load((sweep_dir / RESULTS_FILE).read_text())
        write_reports(results, Path(cfg.paths.reports_dir))
        log.info(
            "best %s %.4f (trial %s)", study_name, results["best_value"], results["best_trial"]
        )

    run_cli(body)


def sweep_command(cfg: DictConfig, study_name: str, sweep_dir: Path) -> list[str]:
    """The Hydra multirun of the sweep, with every setting it does not search pinned."""
    swept = list(OmegaConf.load(_search_space_file(cfg.sweep.hparams_search)).hydra.sweeper.params)
    config = OmegaConf.to_container(cfg, resolve=True)
    pinned = {
        key: value
        for key, value in _leaves({k: config[k] for k in PINNED_SECTIONS})
        if not any(key == s or key.startswith(f"{s}.") for s in swept)
    }
    pinned["trainer.max_epochs"] = cfg.sweep.max_epochs
    return [
        sys.executable,
        "-m",
        "leukemia_mlops.train",
        "-m",
        f"hparams_search={cfg.sweep.hparams_search}",
        f"hydra.sweeper.n_trials={cfg.sweep.n_trials}",
        "hydra.sweeper.top_up=true",
        f"hydra.sweeper.study_name={study_name}",
        f"hydra.sweep.dir={sweep_dir}",
        *(f"++{key}={Transformer.str(value)}" for key, value in pinned.items()),
        *cfg.sweep.get("fixed", []),
    ]


def write_reports(results: Mapping[str, Any], reports_dir: Path) -> None:
    """``best_params.yaml`` and ``sweep.json`` from the sweeper's results."""
    if results.get("best_value") is None:
        raise ValueError(f"no trial of study {results['study_name']} completed")
    reports_dir.mkdir(parents=True, exist_ok=True)
    best = {
        "study_name": results["study_name"],
        "trial": results["best_trial"],
        "value": results["best_value"],
        "overrides": results["best_overrides"],
        "params": results["best_params"],
    }
    (reports_dir / "best_params.yaml").write_text(yaml.safe_dump(best, sort_keys=False))
    trials = results["trials"]
    metrics = {
        "best_value": results["best_value"],
        "best_trial": results["best_trial"],
        "trials": {
            "complete": trials["complete"],
            "pruned": trials["pruned"],
            "failed": trials["fail"],
        },
    }
    (reports_dir / "sweep.json").write_text(json.dumps(metrics, indent=2))


def _search_space_file(name: str) -> Path:
    path = CONF_DIR / "hparams_search" / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no search space {path} (sweep.hparams_search={name})")
    return path


def _leaves(node: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Dotted ``key, value`` pairs of a nested mapping (lists are values)."""
    for key, value in node.items():
        if isinstance(value, Mapping) and value:
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


if __name__ == "__main__":
    main()
