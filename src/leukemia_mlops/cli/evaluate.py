"""``python -m leukemia_mlops.cli.evaluate``: the DVC ``evaluate`` stage.

Evaluates every model the pipeline trained (``models/<key>/checkpoints/best.ckpt`` for the
keys ``model`` and ``detector``, of whichever family; one not trained is skipped with a warning)
on the prepare cache with one protocol into ``reports/eval/<key>/``, logs each one's results
into its training run (named by ``models/<key>/run.json``) and writes their headline, the DVC
metrics file ``reports/metrics.json``. With both models evaluated it also writes their paired
comparison (``reports/model_vs_detector.json``: differences with subject-bootstrap intervals,
a verdict and whether the sweep stages tuned both alike), into the headline and both MLflow
runs too, and draws both learning curves.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from leukemia_mlops.cli.args import run_cli, stage_config
from leukemia_mlops.config import build_spec

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from leukemia_mlops.data.scenes import SceneSpec
    from leukemia_mlops.models.base import FineTunedModule
    from leukemia_mlops.tracking.run_files import RunFiles

log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> None:
    def body() -> None:
        from leukemia_mlops.errors import MissingInputError
        from leukemia_mlops.evaluation.evaluate import (
            EvaluateSpec,
            compare_models,
            evaluate_model,
            log_comparison,
        )
        from leukemia_mlops.evaluation.headline import headline
        from leukemia_mlops.files import write_json
        from leukemia_mlops.inference.loading import checkpoint_class
        from leukemia_mlops.tracking.run_files import (
            PIPELINE_MODELS,
            comparison_file,
            eval_dir,
            headline_file,
            model_run,
            store_uri,
        )

        cfg = stage_config(__doc__, argv)
        spec = build_spec(EvaluateSpec, cfg.get("evaluate", {}), "evaluate")
        runs = {key: model_run(cfg, key) for key in PIPELINE_MODELS}
        trained = {key: run for key, run in runs.items() if run.best_checkpoint.is_file()}
        if not trained:
            missing = ", ".join(str(run.best_checkpoint) for run in runs.values())
            raise MissingInputError(f"no such checkpoint: {missing} (train a model first)")
        for key in (k for k in runs if k not in trained):
            log.warning("no %s trained (%s): not evaluated", key, runs[key].best_checkpoint)
        reports, classes = {}, {}
        for key, run in trained.items():
            run_id = run.mlflow_run_id()
            if run_id is None:
                log.warning("no MLflow run recorded in %s: %s is not logged", run.state, key)
            classes[key] = checkpoint_class(run.best_checkpoint)
            metrics = evaluate_model(
                run.best_checkpoint,
                cfg.paths.prepared_dir,
                eval_dir(cfg, key),
                spec,
                scene_spec=_scene_spec(run),
                mlflow_run_id=run_id,
                mlflow_uri=store_uri(cfg),
            )
            _log_summary(key, metrics)
            reports[key] = metrics
        comparison = None
        if len(reports) == len(PIPELINE_MODELS):
            names = {key: _display_name(key, classes[key]) for key in PIPELINE_MODELS}
            comparison = compare_models(
                {names[key]: eval_dir(cfg, key) for key in PIPELINE_MODELS},
                {names[key]: reports[key] for key in PIPELINE_MODELS},
                spec,
            )
            comparison["tuning"] = _tuning(cfg, names)
            write_json(comparison_file(cfg), comparison, sort_keys=False)
            _log_comparison(comparison)
            run_ids = [run.mlflow_run_id() for run in trained.values()]
            log_comparison(store_uri(cfg), [i for i in run_ids if i], comparison)
        _plot_learning_curves(cfg, trained)
        # dvc's column order
        write_json(headline_file(cfg), headline(reports, comparison), sort_keys=False)

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


def _log_summary(key: str, metrics: dict) -> None:
    test = metrics["test"]
    log.info(
        "%s: test weighted F1 %.4f, BCa 95%% interval %s (intervals: %s), "
        "at threshold %.3f (chosen on val)",
        key,
        test["f1_weighted"],
        _interval(test.get("f1_weighted_bca_low"), test.get("f1_weighted_bca_high")),
        metrics["bootstrap"]["intervals"],
        metrics["threshold"],
    )
    calibration, conformal, patient = (metrics[k] for k in ("calibration", "conformal", "patient"))
    log.info(
        "%s: temperature %s (fitted on val), test top-label ECE %s -> %s; conformal sets at "
        "alpha %s cover ALL %s, HEM %s, abstain on %s of test cells; patients (%s): "
        "sensitivity %s of %d, specificity %s of %d",
        key,
        *map(_number, (calibration["temperature"], calibration["before"]["top_label_ece"])),
        _number(calibration["after"]["top_label_ece"]),
        *map(_number, (conformal[k] for k in ("alpha", "coverage_ALL", "coverage_HEM"))),
        _number(conformal["abstention_rate"]),
        patient["rule"],
        _number(patient["sensitivity"]),
        patient["n_all_subjects"],
        _number(patient["specificity"]),
        patient["n_hem_subjects"],
    )
    if "detection" in metrics:
        detection = metrics["detection"]
        log.info(
            "%s: test scenes mAP@0.5 %.4f %s, mAP@0.5:0.95 %.4f",
            key,
            detection["map_50"],
            _interval(detection.get("map_50_bca_low"), detection.get("map_50_bca_high")),
            detection["map"],
        )


def _plot_learning_curves(cfg: DictConfig, trained: dict[str, RunFiles]) -> None:
    """Both models' validation AUROC by epoch and training time, from the train stages'
    histories (a model trained outside the pipeline may have none)."""
    import pandas as pd

    from leukemia_mlops.evaluation.plots import learning_curves_plot
    from leukemia_mlops.tracking.run_files import learning_curves_file, training_history_report

    histories = {
        key: pd.read_csv(path)
        for key in trained
        if (path := training_history_report(cfg, key)).is_file()
    }
    if histories:
        learning_curves_plot(histories, learning_curves_file(cfg))


def _tuning(cfg: DictConfig, names: dict[str, str]) -> dict:
    """Whether the sweep stages tuned both models alike, from their summaries (a model the
    pipeline did not tune, or one with ``sweep.enabled=false``, has no budget)."""
    import json
    from pathlib import Path

    from leukemia_mlops.evaluation.paired import tuning_comparison
    from leukemia_mlops.tuning.reports import SweepReports

    budgets = {}
    for key, name in names.items():
        summary = SweepReports(Path(cfg.paths.reports_dir), key).summary
        budgets[name] = json.loads(summary.read_text()).get("budget") if summary.is_file() else None
    tuning = tuning_comparison(budgets)
    log.info("tuning: %s", tuning["note"])
    return tuning


def _display_name(key: str, module_class: type[FineTunedModule]) -> str:
    """How the verdict names a pipeline model: ``model`` by its class's ``comparison_name``
    (a CNN's), if it has one."""
    return (module_class.comparison_name if key == "model" else None) or key


def _log_comparison(comparison: dict) -> None:
    from leukemia_mlops.evaluation.paired import DIFFERENCES

    for name in DIFFERENCES:
        difference = comparison[name]
        log.info(
            "%s, test %s: %+.4f, BCa 95%% interval %s",
            comparison["difference"],
            name,
            difference["point"],
            _interval(difference.get("bca_low"), difference.get("bca_high")),
        )
    log.info("verdict: %s (by %s)", comparison["verdict"], comparison["verdict_by"])


def _number(value: float | None) -> str:
    return "none" if value is None else f"{value:.3f}"


def _interval(low: float | None, high: float | None) -> str:
    return "[none]" if low is None or high is None else f"[{low:.4f}, {high:.4f}]"


if __name__ == "__main__":
    main()
