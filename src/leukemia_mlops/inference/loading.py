"""Loading a trained classifier from a checkpoint, an ONNX file or an MLflow model URI."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from leukemia_mlops.errors import InputError, MissingInputError
from leukemia_mlops.inference.scorers import OnnxScorer, Scorer, TorchScorer
from leukemia_mlops.models.classifier import CellClassifier

#: Preprocessing settings a model may declare; they must match what images are prepared with.
PREPROCESSING_KEYS = ("image_size", "window", "fit")
_MLFLOW_URI = re.compile(r"^(runs|models):/")
_ALLOW_PICKLE = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"
#: Where the validated decision threshold travels: ONNX metadata key, MLflow metric of the
#: evaluate stage (logged into the training run), ``metrics.json`` key of the checkpoint.
ONNX_THRESHOLD_KEY = "validated_threshold"
MLFLOW_THRESHOLD_METRIC = "eval/threshold"
CHECKPOINT_DIGEST_KEY = "checkpoint_sha256"


def load_classifier(checkpoint: str | Path) -> CellClassifier:
    """A trained classifier from a Lightning checkpoint, read safely (``weights_only``)."""
    path = Path(checkpoint)
    if not path.is_file():
        raise MissingInputError(f"no such checkpoint: {path}")
    try:
        return CellClassifier.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and key errors alike mean "not our checkpoint"
        first_line = next(iter(str(err).splitlines()), "")
        raise InputError(
            f"{path} is not a CellClassifier checkpoint ({type(err).__name__}: {first_line})"
        ) from None


def is_mlflow_uri(source: str | Path) -> bool:
    """Whether ``source`` names an MLflow model (``runs:/...`` or ``models:/...``)."""
    return bool(_MLFLOW_URI.match(str(source)))


def load_scorer(source: str | Path, tracking_uri: str | None = None) -> Scorer:
    """A scorer for a ``.ckpt`` or ``.onnx`` file or an MLflow ``runs:/``/``models:/`` URI."""
    text = str(source)
    if is_mlflow_uri(text):
        return _mlflow_scorer(text, tracking_uri)
    path = Path(source)
    if not path.is_file():
        raise MissingInputError(f"no such model file: {path}")
    if path.suffix == ".onnx":
        return OnnxScorer(path)
    if path.suffix == ".ckpt":
        module = load_classifier(path)
        declared = {k: module.hparams[k] for k in PREPROCESSING_KEYS if k in module.hparams}
        return TorchScorer(module.net, preprocessing=declared)
    raise InputError(f"model must be a .ckpt or .onnx file or a runs:/ or models:/ URI: {text}")


def _mlflow_scorer(uri: str, tracking_uri: str | None) -> TorchScorer:
    """An MLflow PyTorch model; its input signature tells the image size it was logged with."""
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    # MLflow unpickles a model saved in its pickle format unless this is false (its default is
    # true): refuse such files, as torch.load(weights_only=True) does, unless the user opts in.
    # Models logged by this project are pt2 archives, which load without pickle.
    opted_in = _ALLOW_PICKLE in os.environ
    os.environ.setdefault(_ALLOW_PICKLE, "false")
    try:
        net = mlflow.pytorch.load_model(uri, map_location="cpu")
    finally:
        if not opted_in:
            del os.environ[_ALLOW_PICKLE]
    signature = mlflow.models.get_model_info(uri).signature
    shape = signature.inputs.inputs[0].shape if signature is not None else None
    return TorchScorer(net, preprocessing={"image_size": shape[-1]} if shape else {})


def file_sha256(path: str | Path) -> str:
    """The SHA-256 hex digest of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def evaluation_threshold(evaluation: str | Path, checkpoint: str | Path) -> float | None:
    """The threshold of the evaluate stage's ``metrics.json`` if it evaluated ``checkpoint``.

    The file records the digest of the checkpoint it scored; another checkpoint's evaluation
    (a stale file, a retrained model) gives None, never its threshold.
    """
    if not Path(checkpoint).is_file():
        raise MissingInputError(f"no such checkpoint: {checkpoint}")
    path = Path(evaluation)
    if not path.is_file():
        return None
    metrics = json.loads(path.read_text())
    if metrics.get(CHECKPOINT_DIGEST_KEY) != file_sha256(checkpoint):
        return None
    return _threshold_value(metrics.get("threshold"), path)


def validated_threshold(
    source: str | Path, evaluation: str | Path | None = None, tracking_uri: str | None = None
) -> float | None:
    """The decision threshold chosen on validation for a model, None where none is known.

    A ``.ckpt`` takes it from ``evaluation`` (see :func:`evaluation_threshold`), an ONNX file
    from its metadata (written by the export), an MLflow model from its run's
    ``eval/threshold`` metric (logged by the evaluate stage).
    """
    text = str(source)
    if is_mlflow_uri(text):
        return _mlflow_threshold(text, tracking_uri)
    path = Path(source)
    if path.suffix == ".onnx":
        import onnx

        props = {
            p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props
        }
        value = props.get(ONNX_THRESHOLD_KEY)
        return None if value is None else _threshold_value(float(value), path)
    return None if evaluation is None else evaluation_threshold(evaluation, path)


def _mlflow_threshold(uri: str, tracking_uri: str | None) -> float | None:
    """The ``eval/threshold`` metric of the run an MLflow model was logged from."""
    import mlflow
    from mlflow import MlflowClient

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    run_id = mlflow.models.get_model_info(uri).run_id
    if run_id is None:
        return None
    value = MlflowClient().get_run(run_id).data.metrics.get(MLFLOW_THRESHOLD_METRIC)
    return None if value is None else _threshold_value(value, uri)


def _threshold_value(value: object, where: str | Path) -> float:
    """``value`` as a threshold, or an InputError naming ``where`` it came from."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise InputError(f"{where} holds no valid decision threshold (got {value!r})")
    return float(value)
