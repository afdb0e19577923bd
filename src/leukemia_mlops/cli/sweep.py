"""``python -m leukemia_mlops.cli.sweep [--model-key KEY]``: the DVC sweep stages (Optuna).

Runs the Hydra multirun ``python -m leukemia_mlops.train -m +hparams_search=<name>`` through
the project's Optuna sweeper, with ``params.yaml`` itself (the keys this stage declares) as the
trials' primary config: every trial runs from exactly those values plus its own. The model is
the one configured under ``KEY`` (``model``, the default, for the ``sweep`` stage;
``detector`` for ``sweep_detector``, with its ``detector_trainer`` keys), and a search space's
``model`` choice is dropped: ``dvc exp run -S model=efficientnet_b0`` tunes efficientnet_b0.
A trial is the first ``sweep.max_epochs`` epochs of the run it tunes: ``trainer.max_epochs``
stays the run's, so is its learning-rate schedule. The study's first trial runs the
configured values of the swept keys (the sweeper's ``baseline``), so the best trial is never
worse on the objective than the untuned model. With ``sweep.enabled=false`` nothing is tuned
and the train stage trains ``params.yaml`` as given.

The study is ``<hparams_search>-<digest of the stage's inputs>``: its params, its code and its
data (every dep in ``dvc.yaml``), so new data or code starts a fresh campaign while a rerun
with the same inputs (after a crash) tops the same study up to ``sweep.n_trials`` finished
trials. ``sweep.study_name`` names a study to continue instead. Only the best
``sweep.keep_models`` trials keep their checkpoints in the store. The stage writes
``reports/best_params.yaml`` (``best_detector_params.yaml`` for the detector: the best trial's
overrides and its swept values as one nested mapping) and ``reports/sweep.json``
(``sweep_detector.json``: the best value, the trial counts and the budget of a trial).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from leukemia_mlops.cli.args import run_cli, stage_parser
from leukemia_mlops.cli.train import with_model
from leukemia_mlops.config import CONF_DIR, DVC_FILE, load_params, stage_deps
from leukemia_mlops.errors import ConfigError
from leukemia_mlops.files import write_text
from leukemia_mlops.tracking.provenance import config_hash, paths_digest
from leukemia_mlops.tuning.reports import SweepReports
from leukemia_mlops.tuning.runs import RESULTS_FILE

log = logging.getLogger(__name__)
SWEEPS_DIR = Path("multirun/sweep")
BASE_CONFIG = "trial_base"  # the trials' primary config, written into the sweep directory


TRIAL_BUDGET = "trial_budget"  # the trials' callbacks.extra entry that ends them early


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--model-key", default="model", help="config key of the model to tune")
    args = parser.parse_args(argv)

    def body() -> None:
        cfg = load_params(args.params, args.overrides)
        digest = inputs_digest(cfg, stage_name(args.model_key))
        cfg = with_model(cfg, args.model_key, args.params)
        reports = SweepReports(Path(cfg.paths.reports_dir), args.model_key)
        if not cfg.sweep.enabled:
            reports.write_untuned()
            log.info("sweep.enabled is false: the train stage trains params.yaml as given")
            return
        space = search_space(cfg)
        study_name = cfg.sweep.study_name or f"{space}-{digest}"
        sweep_dir = SWEEPS_DIR / study_name
        write_base_config(cfg, args.model_key, sweep_dir / f"{BASE_CONFIG}.yaml")
        log.info("study %s: %d trials, trials under %s", study_name, cfg.sweep.n_trials, sweep_dir)
        finished = subprocess.run(sweep_command(cfg, space, study_name, sweep_dir), check=False)
        if finished.returncode != 0:
            print(f"error: the sweep failed; its trials are in {sweep_dir}", file=sys.stderr)
            raise SystemExit(finished.returncode)
        results = yaml.safe_load((sweep_dir / RESULTS_FILE).read_text())
        reports.write(results, trial_budget(cfg, space))
        log.info(
            "best %s %.4f (trial %s)", study_name, results["best_value"], results["best_trial"]
        )

    run_cli(body)


def stage_name(model_key: str) -> str:
    """The DVC stage that tunes the model under ``model_key``: ``sweep`` or ``sweep_<key>``."""
    return "sweep" if model_key == "model" else f"sweep_{model_key}"


def inputs_digest(cfg: DictConfig, stage: str) -> str:
    """A short digest of the stage's params and of every file its ``dvc.yaml`` deps name."""
    stage = os.environ.get("DVC_STAGE", stage)
    deps = stage_deps(stage) if DVC_FILE.is_file() else []
    config = OmegaConf.to_container(cfg, resolve=True)
    return config_hash({"params": config, "deps": paths_digest(deps)})[:10]


def write_base_config(cfg: DictConfig, model_key: str, path: Path) -> None:
    """The trials' primary config: the stage's params with the tuned model as ``model``, each
    trial ended by :class:`~leukemia_mlops.training.callbacks.StopAfterEpochs` after
    ``sweep.max_epochs``."""
    base = OmegaConf.to_container(cfg, resolve=True)
    if model_key != "model":  # now ``model`` and ``trainer``; a trial logs each key once
        base.pop(model_key)
        base.pop(f"{model_key}_trainer", None)
    extra = base["callbacks"].setdefault("extra", {}) or {}
    extra[TRIAL_BUDGET] = {
        "_target_": "leukemia_mlops.training.callbacks.StopAfterEpochs",
        "epochs": cfg.sweep.max_epochs,
    }
    base["callbacks"]["extra"] = extra
    write_text(path, yaml.safe_dump(base, sort_keys=False))


def trial_budget(cfg: DictConfig, space: str) -> dict[str, Any]:
    """What one family's tuning was given, for comparing it with the other's."""
    sampler = OmegaConf.load(_search_space_file("_optuna")).hydra.sweeper.sampler
    for key, value in cfg.sweep.sweeper.items():  # the stage's own sampler.* settings
        if str(key).startswith("sampler."):
            OmegaConf.update(sampler, str(key).removeprefix("sampler."), value)
    return {
        "search_space": space,
        "n_trials": cfg.sweep.n_trials,
        "trial_epochs": min(cfg.sweep.max_epochs, cfg.trainer.max_epochs),
        "schedule_epochs": cfg.trainer.max_epochs,
        "sampler": OmegaConf.to_container(sampler),
    }


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


def _search_space_file(name: str) -> Path:
    path = CONF_DIR / "hparams_search" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"no search space {path} (sweep.hparams_search={name})")
    return path


if __name__ == "__main__":
    main()
