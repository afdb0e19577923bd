"""Model comparison from the MLflow store: CNN and YOLO runs side by side, per dataset.

The numbers are the ones ``evaluate`` logged (see :func:`evaluate.mlflow_metrics`), read back
unchanged, so the table agrees with every run's ``metrics.json``. Both families are evaluated
with one protocol, so their rows share every column. Scores of different datasets are not
comparable: rows are grouped by the data the run was evaluated on (its MLflow ``test`` input:
name and digest, the digest being the prepare cache's whole identity, split included, see
:mod:`leukemia_mlops.data.identity`) and ranked within their group only, by a validation
metric: ranking or choosing by test scores would turn the test set into a selection set, and
validation scores of another split were measured on other images.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from leukemia_mlops.errors import InputError
from leukemia_mlops.files import write_text
from leukemia_mlops.redaction import redact

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

#: The validation metric that ranks runs within a dataset and picks the champion.
SELECTION_METRIC = "eval/val_selection/auroc"
#: Images per second the model scored (val and test, no TTA) on the machine that evaluated it.
THROUGHPUT_METRIC = "eval/images_per_s"
#: Columns of the comparison, as MLflow metric keys.
KEY_METRICS = (
    SELECTION_METRIC,
    "test/f1_weighted",
    "test/f1_weighted_bca_low",
    "test/f1_weighted_bca_high",
    "test/auroc",
    "test/sensitivity",
    "test/specificity",
    "eval/threshold",
    "eval/detection/map_50",
    THROUGHPUT_METRIC,
)
#: The run tag where ``evaluate`` leaves its warnings (a model ranking backwards), shown as a
#: column so that no such run reads as a result.
WARNING_TAG = "eval_warning"
#: A run counts as evaluated when it has this metric.
EVALUATED = "test/f1_weighted"
#: A run's data: its test input's name and data identity (raw data, prepare and split).
DATASET = ("dataset", "digest")
GROUP = (*DATASET, "family", "backbone")


#: Metric names (the last part of a key) where lower is better; every other metric is ranked
#: highest first.
LOWER_IS_BETTER = ("loss", "ece", "brier", "calibration_error")


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of ``metric`` (an MLflow key) is the better one."""
    name = metric.rsplit("/", 1)[-1]
    return not any(name == low or name.endswith(f"_{low}") for low in LOWER_IS_BETTER)


def check_selection_metric(metric: str) -> None:
    """Refuse a test metric for ranking or choosing runs."""
    if not metric.startswith(("eval/val_selection/", "val/", "best/val/")):
        raise InputError(
            f"rank by a validation metric (such as {SELECTION_METRIC}), not {metric!r}: "
            "choosing by test scores turns the test set into a selection set"
        )


def compare_runs(uri: str, experiment_name: str, metric: str = SELECTION_METRIC) -> pd.DataFrame:
    """One row per (dataset, family, backbone): its evaluated run with the best validation
    ``metric`` (the lowest for a loss or a calibration error, else the highest); grouped by
    dataset, best first within each dataset.

    Runs never evaluated are left out; runs without ``metric`` rank last in their group.
    """
    from mlflow import MlflowClient

    check_selection_metric(metric)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise InputError(f"no MLflow experiment named {experiment_name!r} at {redact(uri)}")
    columns = list(dict.fromkeys((metric, *KEY_METRICS)))
    rows = [
        {
            **_test_dataset(run),
            **{tag: run.data.tags.get(tag, "") for tag in ("family", "backbone")},
            "run_id": run.info.run_id,
            "run_name": run.info.run_name,
            **{key: run.data.metrics.get(key, float("nan")) for key in columns},
            "warning": run.data.tags.get(WARNING_TAG, ""),
        }
        for run in _all_runs(client, experiment.experiment_id)
        if EVALUATED in run.data.metrics
    ]
    if not rows:
        raise InputError(f"no run in {experiment_name!r} has test metrics: evaluate first")
    table = pd.DataFrame(rows).sort_values(
        [*DATASET, metric],
        ascending=[True, True, not higher_is_better(metric)],
        kind="stable",
        na_position="last",
    )
    return table.drop_duplicates(list(GROUP)).reset_index(drop=True)


def _test_dataset(run: Run) -> dict[str, str]:
    """The name and digest (data identity) of the dataset the run was tested on (empty when
    not logged)."""
    for dataset_input in run.inputs.dataset_inputs:
        if any(tag.value == "test" for tag in dataset_input.tags):
            return {"dataset": dataset_input.dataset.name, "digest": dataset_input.dataset.digest}
    return dict.fromkeys(DATASET, "")


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


def champion(table: pd.DataFrame, digest: str | None = None) -> pd.Series:
    """The best row of one dataset of a :func:`compare_runs` table (the first of its group):
    the data identity ``digest``, or the only one there is."""
    digests = list(dict.fromkeys(table["digest"]))
    if digest is None:
        if len(digests) != 1:
            raise InputError(
                f"runs of {len(digests)} datasets ({', '.join(map(repr, digests))}): "
                "name the one to register with --dataset DIGEST"
            )
        digest = digests[0]
    rows = table[table["digest"] == digest]
    if rows.empty:
        raise InputError(f"no evaluated run tested on dataset digest {digest!r}")
    return rows.iloc[0]


def write_comparison(table: pd.DataFrame, out_md: str | Path) -> tuple[Path, Path]:
    """The table as Markdown at ``out_md`` and as CSV beside it (same name, ``.csv``)."""
    out_md = Path(out_md)
    out_csv = out_md.with_suffix(".csv")
    write_text(out_md, table.to_markdown(index=False, floatfmt=".4f") + "\n")
    write_text(out_csv, table.to_csv(index=False))
    return out_md, out_csv
