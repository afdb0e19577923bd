"""``lmo-train``: the DVC ``train`` stage; trains the configured model into ``models/cnn``."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

from leukemia_mlops.cli.args import run_cli, stage_config

log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> None:
    cfg = stage_config(__doc__, argv)

    def body() -> None:
        from leukemia_mlops.training.run import run_training

        run_dir = Path(cfg.paths.models_dir) / "cnn"
        best = run_training(cfg, run_dir)
        reports = Path(cfg.paths.reports_dir)
        reports.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run_dir / "metrics.json", reports / "train.json")
        shutil.copyfile(run_dir / "history.csv", reports / "train_history.csv")
        log.info("best val weighted F1 %.4f", best)

    run_cli(body)


if __name__ == "__main__":
    main()
