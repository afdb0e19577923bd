"""Where MLflow runs live: the local sqlite store under ``mlruns/`` or a tracking server."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_EXPERIMENT = "leukemia-cnmc"


def tracking_uri(configured: str | None, mlruns_dir: str | Path = "mlruns") -> str:
    """The configured URI, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<mlruns>/mlflow.db``.

    MLflow 3 refuses the plain file store, so the local default is sqlite.
    """
    if configured:
        return str(configured)
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return local_store_uri(mlruns_dir)


def local_store_uri(mlruns_dir: str | Path = "mlruns") -> str:
    """``sqlite:///<mlruns>/mlflow.db``, the local store (its folder created)."""
    mlruns = Path(mlruns_dir)
    mlruns.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{mlruns.resolve() / 'mlflow.db'}"


def artifact_location(uri: str, mlruns_dir: str | Path = "mlruns") -> str | None:
    """Local stores keep artifacts under ``mlruns/artifacts``; servers choose their own."""
    if uri.startswith("sqlite:"):
        return (Path(mlruns_dir).resolve() / "artifacts").as_uri()
    return None


def ensure_experiment(uri: str, name: str, mlruns_dir: str | Path = "mlruns") -> str:
    """The experiment's id, creating it (race-safe across concurrent workers) if missing."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location(uri, mlruns_dir))
    except MlflowException:
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def ui_url(
    uri: str,
    name: str = DEFAULT_EXPERIMENT,
    base_url: str = "http://127.0.0.1:5000",
    mlruns_dir: str | Path = "mlruns",
) -> str:
    """The UI page of experiment ``name``'s runs in the model-training view (created if missing).

    MLflow 3.17's UI opens in its GenAI view; the ``workflowType`` query of the page's URL
    switches it (the experiment tag ``mlflow.experimentKind`` alone does not).
    """
    page = f"#/experiments/{ensure_experiment(uri, name, mlruns_dir)}/runs"
    return f"{base_url.rstrip('/')}/{page}?workflowType=machine_learning"
