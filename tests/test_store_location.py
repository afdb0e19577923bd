"""A store belongs to its checkout: a copied checkout's runs keep their artifacts in its own
``mlruns/``, never in the folder it was copied from (real sqlite stores, real MLflow runs)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tree_digest
from mlflow import MlflowClient

from leukemia_mlops.errors import ConfigError
from leukemia_mlops.tracking.logger import ResumableMLFlowLogger
from leukemia_mlops.tracking.run_files import store_uri
from leukemia_mlops.tracking.store import (
    DEFAULT_EXPERIMENT,
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    ensure_experiment,
    local_store_uri,
)
from leukemia_mlops.training.run import run_training

FOLDERS = ("mlruns_dir", "models_dir", "reports_dir")  # the paths a checkout writes
#: Checkout A's process: a run with one artifact and one registered model in the store of
#: ``argv[1]``; prints the run's id. A process of its own, as a checkout's stage commands are
#: (MLflow keeps each run's artifact folder for the rest of the process that first used it).
RUN_IN_A = """
import sys
import mlflow
from mlflow import MlflowClient
from leukemia_mlops.tracking.store import DEFAULT_EXPERIMENT, ensure_experiment, local_store_uri

uri = local_store_uri(sys.argv[1])
mlflow.set_tracking_uri(uri)  # the registry finds the logged model through it
experiment_id = ensure_experiment(uri, DEFAULT_EXPERIMENT, sys.argv[1])
client = MlflowClient(uri)
run_id = client.create_run(experiment_id).info.run_id
client.log_text(run_id, "from A", "note.txt")
model = client.create_logged_model(experiment_id, source_run_id=run_id)
client.log_model_artifacts(model.model_id, sys.argv[2])
client.create_registered_model("cells")
client.create_model_version("cells", f"models:/{model.model_id}", run_id, model_id=model.model_id)
client.set_terminated(run_id)
print(run_id)
"""


def store_locations(uri: str) -> list[str]:
    """Every artifact location the store records: experiments, runs, logged models and
    registered model versions."""
    client = MlflowClient(uri)
    experiments = client.search_experiments()
    ids = [e.experiment_id for e in experiments]
    return [
        *(e.artifact_location for e in experiments if e.name != "Default"),
        *(r.info.artifact_uri for r in client.search_runs(ids)),
        *(m.artifact_location for m in client.search_logged_models(ids)),
        *(
            client.get_model_version_download_uri(v.name, v.version)
            for v in client.search_model_versions()
        ),
    ]


def under(location: str, folder: Path) -> bool:
    """Whether a ``file:`` artifact location lies in ``folder``."""
    return location.startswith(folder.resolve().as_uri() + "/")


def model_folder(root: Path) -> Path:
    """A folder to log as a model's files."""
    (root / "model").mkdir(parents=True)
    (root / "model" / "MLmodel").write_text("flavors: {}\n")
    return root / "model"


def test_a_copied_checkout_logs_into_its_own_mlruns(tmp_path):
    """A copy of checkout A: its new run (the project's logger) and model, and what it adds
    to A's old run (as the evaluate stage does), land in the copy's ``mlruns/``; A stays byte
    for byte as it was, and the copy keeps reading the old run once A is gone."""
    a, b = tmp_path / "a", tmp_path / "b"
    command = [sys.executable, "-c", RUN_IN_A, str(a / "mlruns"), str(model_folder(tmp_path))]
    old = subprocess.run(command, capture_output=True, text=True, check=True).stdout.split()[-1]
    shutil.copytree(a, b)
    before = tree_digest(a)

    uri = local_store_uri(b / "mlruns")
    experiment_id = ensure_experiment(uri, DEFAULT_EXPERIMENT, b / "mlruns")
    logger = ResumableMLFlowLogger(experiment_name=DEFAULT_EXPERIMENT, tracking_uri=uri)
    client = MlflowClient(uri)
    client.log_text(logger.run_id, "from B", "note.txt")
    model = client.create_logged_model(experiment_id, source_run_id=logger.run_id)
    client.log_model_artifacts(model.model_id, str(tmp_path / "model"))
    logger.finalize("success")
    client.log_text(old, "evaluated in B", "evaluation.txt")

    assert tree_digest(a) == before
    locations = store_locations(uri)
    assert len(locations) == 6  # the experiment, two runs, two models, A's model's version
    assert all(under(location, b / "mlruns") for location in locations), locations
    new_files = b / "mlruns/artifacts" / logger.run_id / "artifacts"
    assert (new_files / "note.txt").read_text() == "from B"
    shutil.rmtree(a)
    for name, text in (("note.txt", "from A"), ("evaluation.txt", "evaluated in B")):
        assert Path(client.download_artifacts(old, name, str(tmp_path))).read_text() == text
    tags = client.get_experiment_by_name(DEFAULT_EXPERIMENT).tags
    assert tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND


def test_another_checkouts_store_is_refused_before_any_write(tmp_path):
    """A store configured by URI that keeps its artifacts in checkout A, used from checkout B:
    one line names both folders and the fix; A is left as it was."""
    a, b = tmp_path / "a" / "mlruns", tmp_path / "b" / "mlruns"
    uri = local_store_uri(a)
    ensure_experiment(uri, DEFAULT_EXPERIMENT, a)
    before = tree_digest(a.parent)
    with pytest.raises(ConfigError, match="outside this checkout") as refused:
        ensure_experiment(uri, DEFAULT_EXPERIMENT, b)
    assert str(a / "artifacts") in str(refused.value)
    assert str(b) in str(refused.value)
    assert "\n" not in str(refused.value)
    assert tree_digest(a.parent) == before


def test_a_database_copied_without_its_artifacts_is_refused(tmp_path):
    """Pointing the copy's runs at an ``artifacts/`` it lacks would lose them: refused."""
    a, b = tmp_path / "a" / "mlruns", tmp_path / "b" / "mlruns"
    command = [sys.executable, "-c", RUN_IN_A, str(a), str(model_folder(tmp_path))]
    subprocess.run(command, capture_output=True, check=True)
    b.mkdir(parents=True)
    shutil.copy(a / "mlflow.db", b / "mlflow.db")
    with pytest.raises(ConfigError, match="without its artifacts/"):
        local_store_uri(b)


@pytest.mark.slow
def test_training_in_a_copied_checkout_writes_only_its_own_mlruns(
    tiny_config, tmp_path, monkeypatch
):
    """Real training in checkout A, the checkout copied to B, real training in B: every file
    of B's run and logged model is in B's ``mlruns/``, nothing new under A."""

    def paths(root: Path) -> list[str]:
        return [f"paths.{key}={root / key.removesuffix('_dir')}" for key in FOLDERS]

    a, b = tmp_path / "a", tmp_path / "b"
    options = ("trainer.max_epochs=1", "logger.mlflow.log_model=true")
    run_training(tiny_config(*options, *paths(a)), a / "models/model")
    shutil.copytree(a, b)
    before = tree_digest(a)
    # B's training runs in a new process: without the URI that logging A's model exported.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    config = tiny_config(*options, *paths(b))
    run_training(config, b / "models/model")

    assert tree_digest(a) == before
    uri = store_uri(config)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(config.logger.mlflow.experiment_name)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time"])
    assert len(runs) == 2
    new = runs[-1].info
    (model,) = client.search_logged_models(
        [experiment.experiment_id], f"source_run_id = '{new.run_id}'"
    )
    assert under(new.artifact_uri, b / "mlruns")
    assert under(model.artifact_location, b / "mlruns")
    assert (b / "mlruns/artifacts" / new.run_id / "artifacts").is_dir()
    assert any((b / "mlruns/artifacts/models" / model.model_id).rglob("MLmodel"))
    assert all(under(location, b / "mlruns") for location in store_locations(uri))
