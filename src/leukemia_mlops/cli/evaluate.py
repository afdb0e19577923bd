"""``python -m leukemia_mlops.cli.evaluate``: the DVC ``evaluate`` stage.

Evaluates ``models/cnn/checkpoints/best.ckpt`` on the prepare cache into ``reports/eval/`` and
logs the results into the training run named by ``models/cnn/run.json``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from leukemia_mlops.cli.args import run_cli, stage_config
from leukemia_mlops.config import build_spec

log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> None:
    def body() -> None:
        from leukemia_mlops.evaluation.evaluate import EvaluateSpec, evaluate_model
        from leukemia_mlops.tracking.store import tracking_uri

        cfg = stage_config(__doc__, argv)
        spec = build_spec(EvaluateSpec, cfg.get("evaluate", {}), "evaluate")
        run_dir = Path(cfg.paths.models_dir) / "cnn"
        run_file = run_dir / "run.json"
        run_id = (
            json.loads(run_file.read_text()).get("mlflow_run_id") if run_file.is_file() else None
        )
        if run_id is None:
            log.warning("no MLflow run recorded in %s: results are not logged to MLflow", run_file)
        metrics = evaluate_model(
            run_dir / "checkpoints" / "best.ckpt",
            cfg.paths.prepared_dir,
            Path(cfg.paths.reports_dir) / "eval",
            spec,
            mlflow_run_id=run_id,
            mlflow_uri=tracking_uri(cfg.logger.mlflow.tracking_uri, cfg.paths.mlruns_dir),
        )
        test = metrics["test"]
        log.info(
            "test weighted F1 %.4f, BCa 95%% interval [%s, %s] (intervals: %s), "
            "at threshold %.3f (chosen on val)",
            test["f1_weighted"],
            test["f1_weighted_bca_low"],
            test["f1_weighted_bca_high"],
            metrics["bootstrap"]["intervals"],
            metrics["threshold"],
        )

    run_cli(body)


if __name__ == "__main__":
    main()
