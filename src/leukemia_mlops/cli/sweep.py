"""``python -m leukemia_mlops.cli.sweep``: the DVC sweep stage; tunes hyperparameters with Optuna.

Runs the Hydra multirun ``python -m leukemia_mlops.train -m +hparams_search=<name>`` through
the project's Optuna sweeper, with ``params.yaml`` itself (the keys this stage declares) as the
trials' primary config: every trial runs from exactly those values plus its own. The model is
the configured one (a search space's ``model`` choice is dropped: ``dvc exp run -S
model=efficientnet_b0`` tunes efficientnet_b0), and ``trainer.max_epochs`` is
``sweep.max_epochs``. With ``sweep.enabled=false`` nothing is tuned and the train stage trains
``params.yaml`` as given.

The study is ``<hparams_search>-<digest of the stage's inputs>``: its params, its code and its
data (every dep in ``dvc.yaml``), so new data or code starts a fresh campaign while a rerun
with the same inputs (after a crash) tops the same study up to ``sweep.n_trials`` finished
trials. ``sweep.study_name`` names a study to continue instead. Only the best
``sweep.keep_models`` trials keep their checkpoints in the store. The stage writes
``reports/best_params.yaml`` (the best trial's overrides and its swept values as one nested
mapping) and ``reports/sweep.json`` (the best value and the trial counts).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from leukemia_mlops.cli.args import run_cli, stage_config
from leukemia_mlops.config import CONF_DIR, DVC_FILE, stage_deps
from leukemia_mlops.errors import ConfigError, InputError
from leukemia_mlops.tracking.provenance import config_hash, paths_digest
from leukemia_mlops.tuning.runs import RESULTS_FILE

log = logging.getLogger(__name__)
STAGE = "sweep"
SWEEPS_DIR = Path("multirun/sweep")
BASE_CONFIG = "trial_base"  # the trials' primary config, written into the sweep directory


def main(argv: list[str] | None = None) -> None:
    def body() -> None:
        cfg = stage_config(__doc__, argv)
        reports_dir = Path(cfg.paths.reports_dir)
        if not cfg.sweep.enabled:
            write_untuned_reports(reports_dir)
            log.info("sweep.enabled is false: the train stage trains params.yaml as given")
            return
        space = search_space(cfg)
        study_name = cfg.sweep.study_name or f"{space}-{inputs_digest(cfg)}"
        sweep_dir = SWEEPS_DIR / study_name
        write_base_config(cfg, sweep_dir / f"{BASE_CONFIG}.yaml")
        log.info("study %s: %d trials, trials under %s", study_name, cfg.sweep.n_trials, sweep_dir)
        finished = subprocess.run(sweep_command(cfg, space, study_name, sweep_dir), check=False)
        if finished.returncode != 0:
            print(f"error: the sweep failed; its trials are in {sweep_dir}", file=sys.stderr)
            raise SystemExit(finished.returncode)
        results = yaml.safe_load((sweep_dir / RESULTS_FILE).read_text())
        write_reports(results, reports_dir)
        log.info(
            "best %s %.4f (trial %s)", study_name, results["best_value"], results["best_trial"]
        )

    run_cli(body)


def inputs_digest(cfg: DictConfig) -> str:
    """A short digest of the stage's params and of every file its ``dvc.yaml`` deps name."""
    stage = os.environ.get("DVC_STAGE", STAGE)
    deps = stage_deps(stage) if DVC_FILE.is_file() else []
    config = OmegaConf.to_container(cfg, resolve=True)
    return config_hash({"params": config, "deps": paths_digest(deps)})[:10]


def write_base_config(cfg: DictConfig, path: Path) -> None:
    """The trials' primary config: the stage's params, each trial running ``sweep.max_epochs``."""
    base = OmegaConf.to_container(cfg, resolve=True)
    base["trainer"]["max_epochs"] = cfg.sweep.max_epochs
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(base, sort_keys=False))


def search_space(cfg: DictConfig) -> str:
    """``sweep.hparams_search``; ``auto``: the space of the model's family (``<family>_optuna``)."""
    name = cfg.sweep.hparams_search
    return f"{cfg.model.family}_optuna" if name == "auto" else name


def sweep_command(cfg: DictConfig, space: str, study_name: str, sweep_dir: Path) -> list[str]:
    """The Hydra multirun of search space ``space`` over the base config in ``sweep_dir``; no
    config value on it."""
    swept = OmegaConf.load(_search_space_file(space)).hydra.sweeper.params
    return [
        sys.executable,
        "-m",
        "leukemia_mlops.train",
        "-m",
        f"--config-path={sweep_dir.resolve()}",
        f"--config-name={BASE_CONFIG}",
        f"hydra.searchpath=[file://{CONF_DIR}]",
        f"+hparams_search={space}",
        f"hydra.sweeper.n_trials={cfg.sweep.n_trials}",
        f"hydra.sweeper.keep_models={cfg.sweep.keep_models}",
        "hydra.sweeper.top_up=true",
        f"hydra.sweeper.study_name={study_name}",
        f"hydra.sweep.dir={sweep_dir}",
        *(f"hydra.sweeper.{key}={value}" for key, value in cfg.sweep.sweeper.items()),
        *(["~hydra.sweeper.params.model"] if "model" in swept else []),
    ]


def write_reports(results: Mapping[str, Any], reports_dir: Path) -> None:
    """``best_params.yaml`` and ``sweep.json`` from the sweeper's results."""
    if results.get("best_value") is None:
        raise InputError(f"no trial of study {results['study_name']} completed")
    best = {
        "tuned": True,
        "study_name": results["study_name"],
        "trial": results["best_trial"],
        "value": results["best_value"],
        "overrides": results["best_overrides"],
        "params": results["best_params"],
    }
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
    _write(reports_dir, best, metrics)


def write_untuned_reports(reports_dir: Path) -> None:
    """The reports of a stage with ``sweep.enabled=false``: nothing to merge into training."""
    _write(reports_dir, {"tuned": False, "params": {}}, {"tuned": False})


def _write(reports_dir: Path, best: dict[str, Any], metrics: dict[str, Any]) -> None:
    reports_dir.mkdir(parents=True, exist_ok=True)
    (reports_dir / "best_params.yaml").write_text(yaml.safe_dump(best, sort_keys=False))
    (reports_dir / "sweep.json").write_text(json.dumps(metrics, indent=2))


def _search_space_file(name: str) -> Path:
    path = CONF_DIR / "hparams_search" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"no search space {path} (sweep.hparams_search={name})")
    return path


if __name__ == "__main__":
    main()
