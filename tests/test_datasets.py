"""MLflow dataset inputs and the UI link, against real sqlite stores and real runs."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from leukemia_mlops.data.identity import read_identity
from leukemia_mlops.data.prepare import MANIFEST_FILE
from leukemia_mlops.tracking.datasets import TRAINING_CONTEXTS, log_data_inputs
from leukemia_mlops.tracking.logger import LIGHTNING_NOTICES
from leukemia_mlops.tracking.store import ensure_experiment
from leukemia_mlops.training.run import run_training

DVC_MD5 = "0123456789abcdef0123456789abcdef.dir"


def write_data_dvc(folder: Path, md5: str = DVC_MD5) -> None:
    """A ``data.dvc`` as ``dvc add data/raw`` writes it."""
    (folder / "data.dvc").write_text(f"outs:\n- md5: {md5}\n  path: data/raw\n")


def inputs_by_context(uri: str, run_id: str) -> dict[str, mlflow.entities.Dataset]:
    """A run's datasets, keyed by their context tag."""
    run = MlflowClient(uri).get_run(run_id)
    return {
        tag.value: entry.dataset
        for entry in run.inputs.dataset_inputs
        for tag in entry.tags
        if tag.key == "mlflow.data.context"
    }


def expected_profile(prepared: Path, split: str) -> dict[str, dict[str, int]]:
    """Images and subjects per class of one split, counted here from the manifest."""
    manifest = pd.read_parquet(prepared / MANIFEST_FILE)
    rows = manifest[manifest["split"] == split]
    names = {1: "ALL", 0: "HEM"}
    return {
        "images": {names[label]: int((rows["label"] == label).sum()) for label in names},
        "subjects": {
            names[label]: rows.loc[rows["label"] == label, "subject"].nunique() for label in names
        },
    }


class Records(logging.Handler):
    """Every record a logger passes on (after its filters), kept as text."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_a_training_run_logs_its_train_and_val_data(tiny_config, tmp_path, monkeypatch, caplog):
    cfg = tiny_config("trainer.max_epochs=1")
    monkeypatch.chdir(tmp_path)  # the data.dvc this test writes, outside any git checkout
    write_data_dvc(tmp_path)
    notices = Records()
    lightning = logging.getLogger(LIGHTNING_NOTICES[0])
    monkeypatch.setattr(lightning, "level", logging.INFO)
    lightning.addHandler(notices)
    caplog.set_level(logging.INFO, logger="leukemia_mlops.training.run")
    try:
        best = run_training(cfg, tmp_path / "run")
    finally:
        lightning.removeHandler(notices)

    assert any("GPU available" in line for line in notices.lines)  # Lightning's notices pass
    assert not [line for line in notices.lines if "Tip" in line]  # its advertisements do not
    finished = [r.getMessage() for r in caplog.records if r.getMessage().startswith("finished")]
    assert len(finished) == 1 and "\n" not in finished[0]
    assert f"val_auroc={best:.4f}" in finished[0]  # the monitored metric

    uri = f"sqlite:///{tmp_path / 'mlruns/mlflow.db'}"
    run_id = json.loads((tmp_path / "run/run.json").read_text())["mlflow_run_id"]
    datasets = inputs_by_context(uri, run_id)
    assert set(datasets) == {"training", "validation"}
    prepared = Path(cfg.datamodule.prepared_dir)
    digest = read_identity(prepared).digest  # the cache's whole identity, not data.dvc's md5
    for context, split in (("training", "train"), ("validation", "val")):
        dataset = datasets[context]
        assert dataset.name == f"synthetic-{split}"
        assert dataset.digest == digest
        assert json.loads(dataset.source) == {"uri": "data.dvc@unknown"}  # no git here
        assert json.loads(dataset.profile) == expected_profile(prepared, split)

    client = MlflowClient(uri)  # what mlflow.search_runs calls, without a global store
    experiment = client.get_run(run_id).info.experiment_id
    for query in (
        f"dataset.digest = '{digest}'",
        f"tags.data_identity = '{digest}'",
        "dataset.name = 'synthetic-val'",
        "dataset.context = 'training'",
    ):
        found = client.search_runs([experiment], filter_string=query)
        assert [r.info.run_id for r in found] == [run_id], query
    assert not client.search_runs([experiment], filter_string="dataset.context = 'test'")


def test_without_data_dvc_the_manifest_is_the_source(tiny_prepared, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = ensure_experiment(uri, "datasets", tmp_path)
    run_id = MlflowClient(uri).create_run(experiment).info.run_id
    identity = read_identity(tiny_prepared)
    manifest = tiny_prepared / MANIFEST_FILE
    for _ in range(2):  # a resumed run logs again and adds nothing
        log_data_inputs(uri, run_id, manifest, identity, TRAINING_CONTEXTS)

    run = MlflowClient(uri).get_run(run_id)
    assert len(run.inputs.dataset_inputs) == 2
    datasets = inputs_by_context(uri, run_id)
    assert {d.digest for d in datasets.values()} == {identity.digest}
    assert json.loads(datasets["training"].source) == {"uri": f"{manifest}@unknown"}


def test_the_evaluation_logs_its_test_data(tiny_checkpoint, tiny_prepared, tmp_path, monkeypatch):
    from leukemia_mlops.config import build_spec, compose
    from leukemia_mlops.evaluation.evaluate import EvaluateSpec, evaluate_model

    monkeypatch.chdir(tmp_path)
    write_data_dvc(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = MlflowClient(uri).create_run(ensure_experiment(uri, "eval", tmp_path)).info.run_id
    spec = build_spec(EvaluateSpec, compose().evaluate, "evaluate")
    spec = dataclasses.replace(spec, n_resamples=5, tta=False)
    out = tmp_path / "eval"
    evaluate_model(tiny_checkpoint, tiny_prepared, out, spec, mlflow_run_id=run_id, mlflow_uri=uri)

    datasets = inputs_by_context(uri, run_id)
    assert set(datasets) == {"test"}
    assert datasets["test"].name == "synthetic-test"
    assert datasets["test"].digest == read_identity(tiny_prepared).digest
    assert json.loads(datasets["test"].profile) == expected_profile(tiny_prepared, "test")


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_every_split_of_the_tiny_cache_has_both_classes(tiny_prepared, split):
    """The profiles above would pass vacuously on a split without cells."""
    profile = expected_profile(tiny_prepared, split)
    assert min(profile["images"].values()) > 0
    assert min(profile["subjects"].values()) > 0


def test_the_ui_link_opens_the_experiment_in_the_model_training_view(tmp_path, capsys):
    from leukemia_mlops.cli import ui_url as ui_url_cli
    from leukemia_mlops.tracking.store import local_store_uri, ui_url

    mlruns = tmp_path / "mlruns"
    uri = local_store_uri(mlruns)
    other = ensure_experiment(uri, "other", mlruns)
    wanted = ensure_experiment(uri, "leukemia-cnmc", mlruns)
    assert wanted != other
    url = ui_url(uri, "leukemia-cnmc", "http://127.0.0.1:5001/")
    assert url == f"http://127.0.0.1:5001/#/experiments/{wanted}/runs?workflowType=machine_learning"

    ui_url_cli.main(["--mlruns-dir", str(mlruns), "--experiment", "other"])
    printed = capsys.readouterr().out.strip()
    assert (
        printed == f"http://127.0.0.1:5000/#/experiments/{other}/runs?workflowType=machine_learning"
    )

    ui_url_cli.main(["--mlruns-dir", str(mlruns), "--experiment", "new"])  # a fresh store
    created = MlflowClient(uri).get_experiment_by_name("new").experiment_id
    assert (
        capsys.readouterr()
        .out.strip()
        .endswith(f"#/experiments/{created}/runs?workflowType=machine_learning")
    )
