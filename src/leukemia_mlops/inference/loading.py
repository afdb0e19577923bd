"""Loading a trained model (classifier or detector) from a checkpoint, an ONNX file or an MLflow
model URI, and the decision threshold validated for it."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from leukemia_mlops.errors import InputError, MissingInputError
from leukemia_mlops.inference.detection import DETECTOR_KEYS, THRESHOLD_KEYS, YoloScorer
from leukemia_mlops.inference.scorers import (
    OnnxNetwork,
    OnnxScorer,
    Scorer,
    TorchNetwork,
    TorchScorer,
)
from leukemia_mlops.models.base import FineTunedModule
from leukemia_mlops.models.classifier import CellClassifier
from leukemia_mlops.models.detector import YoloDetector

M = TypeVar("M", bound=FineTunedModule)

#: Preprocessing settings a model may declare; they must match what images are prepared with.
PREPROCESSING_KEYS = ("image_size", "window", "fit")
_MLFLOW_URI = re.compile(r"^(runs|models):/")
_ALLOW_PICKLE = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"
#: Where the validated decision threshold travels: ONNX metadata key, MLflow metric of the
#: evaluate stage (logged into the training run), ``metrics.json`` key of the checkpoint.
ONNX_THRESHOLD_KEY = "validated_threshold"
MLFLOW_THRESHOLD_METRIC = "eval/threshold"
CHECKPOINT_DIGEST_KEY = "checkpoint_sha256"


def checkpoint_family(checkpoint: str | Path) -> str:
    """``yolo`` for a ``YoloDetector`` checkpoint, else ``cnn`` (by its hyperparameters, read
    safely without the weights; a file that is no Lightning checkpoint is an InputError)."""
    path = _existing(checkpoint, "checkpoint")
    try:
        hparams = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get(
            "hyper_parameters", {}
        )
    except Exception as err:  # pickle and zip errors alike mean "not our checkpoint"
        first_line = next(iter(str(err).splitlines()), "")
        raise InputError(
            f"{path} is not a CellClassifier checkpoint, nor a YoloDetector one "
            f"({type(err).__name__}: {first_line})"
        ) from None
    return "yolo" if "variant" in hparams else "cnn"


def load_classifier(checkpoint: str | Path) -> CellClassifier:
    """A trained classifier from a Lightning checkpoint, read safely (``weights_only``)."""
    return _load_module(CellClassifier, checkpoint)


def load_detector(checkpoint: str | Path) -> YoloDetector:
    """A trained detector from a Lightning checkpoint, read safely; its initial weights are in
    the checkpoint already (their file may be gone by now)."""
    return _load_module(YoloDetector, checkpoint, weights="none")


def _load_module(cls: type[M], checkpoint: str | Path, **overrides: Any) -> M:
    path = _existing(checkpoint, "checkpoint")
    try:
        return cls.load_from_checkpoint(path, map_location="cpu", weights_only=True, **overrides)
    except Exception as err:  # pickle, zip and key errors alike mean "not our checkpoint"
        first_line = next(iter(str(err).splitlines()), "")
        raise InputError(
            f"{path} is not a {cls.__name__} checkpoint ({type(err).__name__}: {first_line})"
        ) from None


def _existing(path: str | Path, what: str) -> Path:
    if not Path(path).is_file():
        raise MissingInputError(f"no such {what}: {path}")
    return Path(path)


def is_mlflow_uri(source: str | Path) -> bool:
    """Whether ``source`` names an MLflow model (``runs:/...`` or ``models:/...``)."""
    return bool(_MLFLOW_URI.match(str(source)))


def load_scorer(source: str | Path, tracking_uri: str | None = None) -> Scorer | YoloScorer:
    """A scorer for a ``.ckpt`` or ``.onnx`` file or an MLflow ``runs:/``/``models:/`` URI: a
    :class:`YoloScorer` for a detector (told by the checkpoint, the ONNX output or the MLflow
    signature), else a classifier's."""
    text = str(source)
    if is_mlflow_uri(text):
        return _mlflow_scorer(text, tracking_uri)
    path = _existing(source, "model file")
    if path.suffix == ".onnx":
        network = OnnxNetwork(path)
        if network.output_rank == 1:
            return OnnxScorer(path)
        return detector_scorer(network, {**network.metadata, "img_size": network.input_size}, path)
    if path.suffix == ".ckpt":
        if checkpoint_family(path) == "yolo":
            detector = load_detector(path)
            return detector_scorer(TorchNetwork(detector.predictor()), detector.hparams, path)
        module = load_classifier(path)
        declared = {k: module.hparams[k] for k in PREPROCESSING_KEYS if k in module.hparams}
        return TorchScorer(module.net, preprocessing=declared)
    raise InputError(f"model must be a .ckpt or .onnx file or a runs:/ or models:/ URI: {text}")


def detector_scorer(
    network: Callable[[np.ndarray], np.ndarray], settings: Any, source: str | Path
) -> YoloScorer:
    """A :class:`YoloScorer` from the detector's ``img_size``, ``conf_threshold`` and
    ``iou_threshold`` settings (hyperparameters, ONNX metadata or its run's ``model`` params)."""
    missing = [key for key in DETECTOR_KEYS if settings.get(key) is None]
    if missing:
        raise InputError(f"{source} is a detector without its settings {', '.join(missing)}")
    size, conf, iou = (settings[key] for key in DETECTOR_KEYS)
    return YoloScorer(network, int(size), float(conf), float(iou))


def _mlflow_scorer(uri: str, tracking_uri: str | None) -> TorchScorer | YoloScorer:
    """An MLflow PyTorch model; its signature tells the image size it was logged with, and
    its output a detector (``[B, N, 5 + C]``, decoded with its run's ``model`` settings)."""
    import mlflow
    from mlflow import MlflowClient

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
    info = mlflow.models.get_model_info(uri)
    signature = info.signature
    shape = signature.inputs.inputs[0].shape if signature is not None else None
    output = signature.outputs.inputs[0].shape if signature is not None else None
    if output is not None and len(output) == 3:
        params = MlflowClient().get_run(info.run_id).data.params
        settings = {key: params.get(f"model.{key}") for key in THRESHOLD_KEYS}
        return detector_scorer(TorchNetwork(net), {**settings, "img_size": shape[-1]}, uri)
    return TorchScorer(net, preprocessing={"image_size": shape[-1]} if shape else {})


def file_sha256(path: str | Path) -> str:
    """The SHA-256 hex digest of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def evaluation_threshold(
    evaluation: str | Path | Sequence[Path], checkpoint: str | Path
) -> float | None:
    """The threshold of the evaluate stage's ``metrics.json`` (or of whichever of several)
    that evaluated ``checkpoint``.

    The file records the digest of the checkpoint it scored; another checkpoint's evaluation
    (a stale file, a retrained model) gives None, never its threshold.
    """
    _existing(checkpoint, "checkpoint")
    reports = [evaluation] if isinstance(evaluation, str | Path) else evaluation
    digest = file_sha256(checkpoint)
    for path in map(Path, reports):
        if not path.is_file():
            continue
        metrics = json.loads(path.read_text())
        if metrics.get(CHECKPOINT_DIGEST_KEY) == digest:
            return _threshold_value(metrics.get("threshold"), path)
    return None


def validated_threshold(
    source: str | Path,
    evaluation: str | Path | Sequence[Path] | None = None,
    tracking_uri: str | None = None,
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
        value = onnx_metadata(path).get(ONNX_THRESHOLD_KEY)
        return None if value is None else _threshold_value(float(value), path)
    return None if evaluation is None else evaluation_threshold(evaluation, path)


def onnx_metadata(path: str | Path) -> dict[str, str]:
    """The metadata properties of an ONNX model (the graph itself is not read)."""
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


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
