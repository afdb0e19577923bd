"""``python -m leukemia_mlops.cli.evaluate``: the DVC ``evaluate`` stage.

Evaluates every trained family (``models/<family>/checkpoints/best.ckpt``: the CNN and the
YOLO detector; a family not trained is skipped with a warning) on the prepare cache with one
protocol into ``reports/eval/<family>/``, and logs each family's results into its training run
(named by ``models/<family>/run.json``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from leukemia_mlops.cli.args import run_cli, stage_config
from leukemia_mlops.config import build_spec

if TYPE_CHECKING:
    from leukemia_mlops.data.scenes import SceneSpec
    from leukemia_mlops.tracking.run_files import RunFiles

log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> None:
    def body() -> None:
        from leukemia_mlops.errors import MissingInputError
        from leukemia_mlops.evaluation.evaluate import EvaluateSpec, evaluate_model
        from leukemia_mlops.tracking.run_files import FAMILIES, eval_dir, model_run, store_uri

        cfg = stage_config(__doc__, argv)
        spec = build_spec(EvaluateSpec, cfg.get("evaluate", {}), "evaluate")
        runs = {family: model_run(cfg, family) for family in FAMILIES}
        trained = {family: run for family, run in runs.items() if run.best_checkpoint.is_file()}
        if not trained:
            missing = ", ".join(str(run.best_checkpoint) for run in runs.values())
            raise MissingInputError(f"no such checkpoint: {missing} (train a model first)")
        for family in (f for f in runs if f not in trained):
            log.warning("no %s model (%s): not evaluated", family, runs[family].best_checkpoint)
        for family, run in trained.items():
            run_id = run.mlflow_run_id()
            if run_id is None:
                log.warning("no MLflow run recorded in %s: %s is not logged", run.state, family)
            metrics = evaluate_model(
                run.best_checkpoint,
                cfg.paths.prepared_dir,
                eval_dir(cfg, family),
                spec,
                family=family,
                scene_spec=_scene_spec(run),
                mlflow_run_id=run_id,
                mlflow_uri=store_uri(cfg),
            )
            _log_summary(family, metrics)

    run_cli(body)


def _scene_spec(run: RunFiles) -> SceneSpec:
    """The scene layout a detector was trained and validated with (its ``config.yaml``; a
    classifier's run has none and never uses it)."""
    from omegaconf import OmegaConf

    from leukemia_mlops.data.scenes import SceneSpec

    if not run.config.is_file():
        return SceneSpec()
    scenes = OmegaConf.load(run.config).model.get("scenes", {})
    return SceneSpec(
        **{key: scenes[key] for key in SceneSpec.__dataclass_fields__ if key in scenes}
    )


def _log_summary(family: str, metrics: dict) -> None:
    test = metrics["test"]
    log.info(
        "%s: test weighted F1 %.4f, BCa 95%% interval [%s, %s] (intervals: %s), "
        "at threshold %.3f (chosen on val)",
        family,
        test["f1_weighted"],
        test["f1_weighted_bca_low"],
        test["f1_weighted_bca_high"],
        metrics["bootstrap"]["intervals"],
        metrics["threshold"],
    )
    if "detection" in metrics:
        detection = metrics["detection"]
        log.info(
            "%s: test scenes mAP@0.5 %s [%s, %s], mAP@0.5:0.95 %s",
            family,
            detection["map_50"],
            detection["map_50_low"],
            detection["map_50_high"],
            detection["map"],
        )


if __name__ == "__main__":
    main()
