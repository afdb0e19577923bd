"""Model comparison from the MLflow store: the best evaluated run of each family and backbone.

The numbers are the ones ``evaluate`` logged (see :func:`evaluate.mlflow_metrics`), read back
unchanged, so the table agrees with every run's ``metrics.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from leukemia_mlops.errors import InputError
from leukemia_mlops.redaction import redact

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

#: Columns of the comparison, as MLflow metric keys.
KEY_METRICS = (
    "eval/val_selection/f1_weighted",
    "test/f1_weighted",
    "test/f1_weighted_low",
    "test/f1_weighted_high",
    "test/auroc",
    "test/sensitivity",
    "test/specificity",
    "test/balanced_accuracy",
    "eval/threshold",
    "eval/subject/accuracy",
)
GROUP = ("family", "backbone")


def compare_runs(uri: str, experiment_name: str, metric: str = "test/f1_weighted") -> pd.DataFrame:
    """One row per (family, backbone): its run with the highest ``metric``, best first.

    Runs without ``metric`` (unfinished or never evaluated) are left out.
    """
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise InputError(f"no MLflow experiment named {experiment_name!r} at {redact(uri)}")
    columns = list(dict.fromkeys((metric, *KEY_METRICS)))
    rows = [
        {
            **{tag: run.data.tags.get(tag, "") for tag in GROUP},
            "run_id": run.info.run_id,
            "run_name": run.info.run_name,
            **{key: run.data.metrics.get(key, float("nan")) for key in columns},
        }
        for run in _all_runs(client, experiment.experiment_id)
        if metric in run.data.metrics
    ]
    if not rows:
        raise InputError(f"no run in {experiment_name!r} has the metric {metric!r}: evaluate first")
    table = pd.DataFrame(rows).sort_values(metric, ascending=False, kind="stable")
    return table.drop_duplicates(list(GROUP)).reset_index(drop=True)


def _all_runs(client: MlflowClient, experiment_id: str) -> list[Run]:
    """Every run of the experiment, page by page, oldest first (ties go to the earlier run)."""
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs(
            [experiment_id], order_by=["attributes.start_time ASC"], page_token=token
        )
        runs += page
        token = page.token
        if not token:
            return runs


def write_comparison(table: pd.DataFrame, out_md: str | Path) -> tuple[Path, Path]:
    """The table as Markdown at ``out_md`` and as CSV beside it (same name, ``.csv``)."""
    out_md = Path(out_md)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_csv = out_md.with_suffix(".csv")
    out_md.write_text(table.to_markdown(index=False, floatfmt=".4f") + "\n")
    table.to_csv(out_csv, index=False)
    return out_md, out_csv
