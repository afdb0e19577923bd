"""The MLflow model registry: promoting an evaluated run's model under an alias.

Registered names say the task, not the family, so a YOLO champion and a CNN one are versions
of the same model. Aliases are per data identity (``champion-<identity>``, the digest of the
prepare cache: raw data, prepare and split settings): registering the synthetic data's
champion, or another split's, never moves the alias off the real data's model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from leukemia_mlops.errors import InputError

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

REGISTERED_NAME = "leukemia-cell-classifier"
ALIAS_PREFIX = "champion"
IDENTITY_CHARS = 12  # of the data identity in an alias


def champion_alias(data_identity: str) -> str:
    """The alias of the champion of one dataset: ``champion-<first 12 of its identity>``."""
    short = "".join(c for c in data_identity if c.isalnum())[:IDENTITY_CHARS]
    if not short:
        raise InputError("the champion's dataset has no identity: evaluate it first")
    return f"{ALIAS_PREFIX}-{short}"


def register_best(
    uri: str, run_id: str, data_identity: str, name: str = REGISTERED_NAME
) -> ModelVersion:
    """Register ``runs:/<run_id>/model`` under ``name`` and point the alias of its dataset
    (:func:`champion_alias`) at the new version.

    The version is tagged with the run's evaluation metrics (``test/*``, ``eval/*``), so the
    registry shows why it was promoted, and with its data identity, family, threshold and
    commit; a run never evaluated, or without a logged ``model`` (``logger.mlflow.log_model``
    off), is refused.
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    # First: anything below may resolve a runs:/ or logged-model URI through the fluent API,
    # which otherwise opens a default ./mlflow.db.
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient(uri, registry_uri=uri)
    alias = champion_alias(data_identity)
    try:
        run = client.get_run(run_id)
        metrics = run.data.metrics
        evaluation = {k: v for k, v in metrics.items() if k.startswith(("test/", "eval/"))}
        if not evaluation:
            raise InputError(f"run {run_id} has no evaluation metrics: run the evaluate stage")
        if not any(a.path.endswith("MLmodel") for a in client.list_artifacts(run_id, "model")):
            raise InputError(
                f"run {run_id} has no logged model at runs:/{run_id}/model: "
                "train it with logger.mlflow.log_model=true"
            )
        tags = {key: str(value) for key, value in sorted(evaluation.items())}
        tags |= {
            "data_identity": data_identity,
            "family": run.data.tags.get("family", ""),
            "threshold": str(metrics.get("eval/threshold", "")),
            "git_commit": run.data.tags.get("git_commit", ""),
        }
        version = mlflow.register_model(f"runs:/{run_id}/model", name, tags=tags)
        client.set_registered_model_alias(name, alias, version.version)
    except MlflowException as err:
        raise InputError(f"cannot register runs:/{run_id}/model as {name}: {err.message}") from None
    return version
