"""``lmo-train [--model-key KEY] [--best-params FILE]``: the DVC train stages.

Trains the model configured under ``KEY`` (``model``: the model the sweep tunes, of either
family; ``detector``: the YOLO model it is compared with) into ``models/<KEY>/`` and copies its
metrics and curve to ``reports/train_<KEY>.*``. With ``--best-params`` (the sweep stages'
``reports/best_params.yaml`` or ``best_detector_params.yaml``) the best trial's settings replace
the configured ones: its ``model.*`` values are those of the model under ``KEY``. A
``<KEY>_trainer`` section (``detector_trainer``) overrides ``trainer`` for that model.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf, open_dict

from leukemia_mlops.cli.args import run_cli, stage_parser
from leukemia_mlops.config import DVC_FILE, load_params, stage_outs
from leukemia_mlops.errors import ConfigError, InputError, MissingInputError

log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--model-key", default="model", help="config key of the model to train")
    parser.add_argument("--best-params", help="the sweep's best_params.yaml to train with")
    args = parser.parse_args(argv)

    def body() -> None:
        from pytorch_lightning.utilities.rank_zero import rank_zero_only

        from leukemia_mlops.files import write_text
        from leukemia_mlops.tracking.run_files import model_run, training_reports
        from leukemia_mlops.training.preemption import requeue_on_preemption
        from leukemia_mlops.training.run import run_training

        cfg = load_params(args.params, args.overrides)
        cfg = with_model(cfg, args.model_key, args.params)
        if args.best_params:  # the tuned model's values, now under ``model``
            cfg = with_best_params(cfg, Path(args.best_params))
        run_dir = model_run(cfg, args.model_key)
        check_stage_output(run_dir.root)
        with requeue_on_preemption():  # SIGUSR1/SIGTERM: checkpoint saved, status 75
            best = run_training(cfg, run_dir.root)
        if rank_zero_only.rank != 0:  # under DDP the reports are rank 0's alone
            return
        for source, copy in training_reports(cfg, args.model_key).items():
            write_text(copy, source.read_text())
        log.info("best val AUROC of %s: %.4f", args.model_key, best)

    run_cli(body)


def with_model(cfg: DictConfig, model_key: str, params: str) -> DictConfig:
    """The config training ``<model_key>`` as ``model``, with its ``<model_key>_trainer`` keys."""
    if model_key not in cfg:
        raise ConfigError(f"no model config under {model_key!r} in {params}")
    with open_dict(cfg):
        cfg.model = cfg[model_key]
        if f"{model_key}_trainer" in cfg:
            cfg.trainer = OmegaConf.merge(cfg.trainer, cfg[f"{model_key}_trainer"])
    return cfg


def check_stage_output(run_dir: Path) -> None:
    """Under ``dvc repro``, the run directory must be an output of the running stage: another
    ``paths.models_dir`` or ``--model-key`` would write where DVC does not look."""
    stage = os.environ.get("DVC_STAGE")
    if not stage or not DVC_FILE.is_file():
        return
    outs = stage_outs(stage)
    if run_dir.as_posix() not in outs:
        raise ConfigError(
            f"the {stage} stage writes {', '.join(outs)}, not {run_dir}: keep "
            "paths.models_dir as dvc.yaml has it"
        )


def with_best_params(cfg: DictConfig, path: Path) -> DictConfig:
    """The config with the best sweep trial's settings (a nested mapping) merged on top."""
    if not path.is_file():
        raise MissingInputError(f"no best parameters at {path}: run the sweep stage first")
    best = yaml.safe_load(path.read_text()) or {}
    if best.get("tuned") is False:  # sweep.enabled=false: train the config as given
        return cfg
    if not best.get("params"):
        raise InputError(f"{path} holds no best parameters")
    log.info("training with the best trial %s of %s", best.get("trial"), best.get("study_name"))
    return OmegaConf.merge(cfg, best["params"])


if __name__ == "__main__":
    main()
