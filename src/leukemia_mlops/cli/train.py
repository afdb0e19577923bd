"""``lmo-train [--model-key KEY] [--best-params FILE]``: the DVC train stages.

Trains the model configured under ``KEY`` (``model``: the CNN; ``detector``: YOLOv3) into
``models/<family>/`` and copies its metrics and curve to ``reports/train_<family>.*``. With
``--best-params`` (the sweep stage's ``reports/best_params.yaml``) the best trial's settings
replace the configured ones.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

from leukemia_mlops.cli.args import run_cli, stage_parser
from leukemia_mlops.config import load_params

log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--model-key", default="model", help="config key of the model to train")
    parser.add_argument("--best-params", help="the sweep's best_params.yaml to train with")
    args = parser.parse_args(argv)

    def body() -> None:
        from leukemia_mlops.training.run import run_training

        cfg = load_params(args.params, args.overrides)
        if args.best_params:
            cfg = with_best_params(cfg, Path(args.best_params))
        if args.model_key not in cfg:
            raise KeyError(f"no model config under {args.model_key!r} in {args.params}")
        cfg.model = cfg[args.model_key]
        family = cfg.model.family
        run_dir = Path(cfg.paths.models_dir) / family
        best = run_training(cfg, run_dir)
        reports = Path(cfg.paths.reports_dir)
        reports.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run_dir / "metrics.json", reports / f"train_{family}.json")
        shutil.copyfile(run_dir / "history.csv", reports / f"train_{family}_history.csv")
        log.info("best val weighted F1 of %s: %.4f", family, best)

    run_cli(body)


def with_best_params(cfg: DictConfig, path: Path) -> DictConfig:
    """The config with the best sweep trial's settings (a nested mapping) merged on top."""
    if not path.is_file():
        raise FileNotFoundError(f"no best parameters at {path}: run the sweep stage first")
    best = yaml.safe_load(path.read_text()) or {}
    if not best.get("params"):
        raise ValueError(f"{path} holds no best parameters")
    log.info("training with the best trial %s of %s", best.get("trial"), best.get("study_name"))
    return OmegaConf.merge(cfg, best["params"])


if __name__ == "__main__":
    main()
