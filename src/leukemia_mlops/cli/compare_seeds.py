"""``lmo-compare-seeds [--seeds N]`` (``make compare-seeds``): the comparison over training seeds.

Trains both pipeline models, each with its sweep stage's best params
(``reports/best_params.yaml``, ``reports/best_detector_params.yaml``), once per seed 0..N-1,
from ``params.yaml`` with ``seed`` and ``datamodule.seed`` set to that seed (initialisation,
augmentation and batch order all change; the subject split stays, so every run is tested on
the same subjects), evaluates each with the pipeline's
protocol (without TTA) and pairs the two models of each seed. It writes into ``--out``
(``reports/seeds``): ``runs.csv`` (one row per model and seed), ``seeds.json`` and
``seeds.md``: each model's seed-to-seed spread of test AUROC beside one run's bootstrap
interval width, each seed's paired difference and verdict, P(model > detector) over every
pair of seeds (Bouthillier et al.), and each model's expected best validation AUROC against
the number of sweep trials (Dodge et al.) of its sweep's study. Runs go to
``models/seeds/`` and the MLflow store, outside every DVC output.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from leukemia_mlops.cli.args import run_cli, stage_parser
from leukemia_mlops.files import write_json, write_text

log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per model (>= 2)")
    parser.add_argument("--storage", default="sqlite:///mlruns/optuna.db", help="sweep storage")
    parser.add_argument("--out", default="reports/seeds", help="folder of the reports")
    args = parser.parse_args(argv)

    def body() -> None:
        import pandas as pd

        from leukemia_mlops.config import build_spec, load_params
        from leukemia_mlops.errors import ConfigError
        from leukemia_mlops.evaluation.evaluate import EvaluateSpec

        if args.seeds < 2:
            raise ConfigError(f"--seeds must be >= 2 to show a spread, got {args.seeds}")
        base = load_params(args.params, args.overrides)
        spec = replace(build_spec(EvaluateSpec, base.evaluate, "evaluate"), tta=False)
        out = Path(args.out)
        runs, pairs = [], []
        for seed in range(args.seeds):
            seed_runs, pair = train_and_compare(base, args, spec, seed, out)
            runs += seed_runs
            pairs.append(pair)
        summary = summarize(pd.DataFrame(runs), pairs, args)
        write_reports(out, pd.DataFrame(runs), summary)

    run_cli(body)


def train_and_compare(
    base: Any, args: Any, spec: Any, seed: int, out: Path
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Train and evaluate both pipeline models with ``seed``; their rows and paired result."""
    from omegaconf import OmegaConf, open_dict

    from leukemia_mlops.cli.train import with_best_params, with_model
    from leukemia_mlops.evaluation.evaluate import compare_models, evaluate_model
    from leukemia_mlops.tracking.run_files import PIPELINE_MODELS, SeedFiles, seed_run, store_uri
    from leukemia_mlops.training.run import run_training
    from leukemia_mlops.tuning.reports import SweepReports

    rows, dirs, reports = [], {}, {}
    for key in PIPELINE_MODELS:
        cfg = OmegaConf.create(OmegaConf.to_container(base))
        cfg = with_model(cfg, key, args.params)
        best_params = SweepReports(Path(cfg.paths.reports_dir), key).best_params
        cfg = with_best_params(cfg, best_params)
        with open_dict(cfg):
            cfg.seed = cfg.datamodule.seed = seed
            cfg.logger.mlflow.log_model = False
            cfg.logger.mlflow.run_name = f"{key}-seed{seed}"
        run = seed_run(cfg, key, seed)
        best_val = run_training(cfg, run.root)
        dirs[key] = SeedFiles(out).evaluation(key, seed)
        reports[key] = evaluate_model(
            run.best_checkpoint,
            cfg.paths.prepared_dir,
            dirs[key],
            spec,
            mlflow_run_id=run.mlflow_run_id(),
            mlflow_uri=store_uri(cfg),
        )
        test = reports[key]["test"]
        rows.append(
            {
                "model": key,
                "seed": seed,
                "best_val_auroc": best_val,
                "test_auroc": test["auroc"],
                "test_auroc_width": _width(test, "auroc"),
                "test_f1_weighted": test["f1_weighted"],
                "test_f1_weighted_width": _width(test, "f1_weighted"),
                "warnings": "; ".join(reports[key]["warnings"]),
            }
        )
    comparison = compare_models(dirs, reports, spec)
    auroc = comparison["auroc"]
    pair = {"seed": seed, "d_auroc": auroc["point"], "low": auroc["bca_low"]}
    pair |= {"high": auroc["bca_high"], "verdict": comparison["verdict"]}
    log.info("seed %d: %s", seed, pair)
    return rows, pair


def _width(test: dict[str, Any], metric: str) -> float | None:
    low, high = test.get(f"{metric}_bca_low"), test.get(f"{metric}_bca_high")
    return None if low is None or high is None else high - low


def summarize(runs: Any, pairs: list[dict[str, Any]], args: Any) -> dict[str, Any]:
    """Spread per model, P(model > detector) over seed pairs, and each model's expected best
    validation AUROC by number of sweep trials."""
    from leukemia_mlops.evaluation.seeds import probability_better, seed_spread

    spread = seed_spread(runs, "test_auroc")
    by_model = {key: group["test_auroc"].to_numpy() for key, group in runs.groupby("model")}
    return {
        "metric": "test AUROC",
        "spread": spread.reset_index().to_dict(orient="records"),
        "pairs": pairs,
        "p_model_better": probability_better(by_model["model"], by_model["detector"]),
        "expected_best_val_auroc": {key: expected_best(args, key) for key in by_model},
    }


def expected_best(args: Any, key: str) -> dict[str, Any]:
    """Dodge et al.'s curve for the study that tuned the model under ``key`` (none: untuned)."""
    import optuna
    import yaml

    from leukemia_mlops.config import load_params
    from leukemia_mlops.evaluation.seeds import expected_max
    from leukemia_mlops.tuning.reports import SweepReports

    reports_dir = Path(load_params(args.params, args.overrides).paths.reports_dir)
    best = yaml.safe_load(SweepReports(reports_dir, key).best_params.read_text()) or {}
    if not best.get("tuned"):
        return {"study": None, "by_trials": {}}
    study = optuna.load_study(study_name=best["study_name"], storage=args.storage)
    values = [t.value for t in study.trials if t.value is not None]
    curve = {n: expected_max(values, n) for n in range(1, len(values) + 1)}
    return {"study": best["study_name"], "trials": len(values), "by_trials": curve}


def write_reports(out: Path, runs: Any, summary: dict[str, Any]) -> None:
    """``runs.csv``, ``seeds.json`` and the Markdown tables of ``seeds.md``."""
    import pandas as pd

    from leukemia_mlops.tracking.run_files import SeedFiles

    files = SeedFiles(out)
    write_text(files.runs, runs.to_csv(index=False))
    write_json(files.summary, summary, sort_keys=False, default=float)
    curves = {
        key: pd.Series(curve["by_trials"], dtype=float)
        for key, curve in summary["expected_best_val_auroc"].items()
    }
    lines = [
        "## Test AUROC over training seeds",
        pd.DataFrame(summary["spread"]).to_markdown(index=False, floatfmt=".3f"),
        "",
        "## Paired difference (model - detector) per seed, BCa 95% subject bootstrap",
        pd.DataFrame(summary["pairs"]).to_markdown(index=False, floatfmt=".3f"),
        "",
        f"P(model > detector) over seed pairs: {summary['p_model_better']:.2f}",
        "",
        "## Expected best validation AUROC by sweep trials (a trial: the run's first epochs)",
        pd.DataFrame(curves).rename_axis("trials").to_markdown(floatfmt=".3f"),
    ]
    write_text(files.tables, "\n".join(lines) + "\n")
    log.info("wrote %s", files.tables)


if __name__ == "__main__":
    main()
