"""Loading a trained classifier from a checkpoint, an ONNX file or an MLflow model URI."""

from __future__ import annotations

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
