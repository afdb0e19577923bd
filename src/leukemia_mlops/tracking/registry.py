"""The MLflow model registry: promoting an evaluated run's model under an alias."""

from __future__ import annotations

from typing import TYPE_CHECKING

from leukemia_mlops.errors import InputError

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion


def register_best(
    uri: str, run_id: str, name: str = "leukemia-cnn", alias: str = "champion"
) -> ModelVersion:
    """Register ``runs:/<run_id>/model`` under ``name`` and point ``alias`` at the new version.

    The version is tagged with the run's evaluation metrics (``test/*``, ``eval/*``), so the
    registry shows why it was promoted; a run never evaluated, or without a logged ``model``
    (``logger.mlflow.log_model`` off), is refused.
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(uri, registry_uri=uri)
    try:
        metrics = client.get_run(run_id).data.metrics
        evaluation = {k: v for k, v in metrics.items() if k.startswith(("test/", "eval/"))}
        if not evaluation:
            raise InputError(f"run {run_id} has no evaluation metrics: run the evaluate stage")
        if not any(a.path.endswith("MLmodel") for a in client.list_artifacts(run_id, "model")):
            raise InputError(
                f"run {run_id} has no logged model at runs:/{run_id}/model: "
                "train it with logger.mlflow.log_model=true"
            )
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        tags = {key: str(value) for key, value in sorted(evaluation.items())}
        version = mlflow.register_model(f"runs:/{run_id}/model", name, tags=tags)
        client.set_registered_model_alias(name, alias, version.version)
    except MlflowException as err:
        raise InputError(f"cannot register runs:/{run_id}/model as {name}: {err.message}") from None
    return version
