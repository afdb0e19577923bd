"""Loading a trained model (classifier or detector) from a checkpoint, an ONNX file or an MLflow
model URI, and what was validated for it: the decision threshold, the temperature and the
conformal quantiles (:class:`Validated`)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from leukemia_mlops.errors import InputError, MissingInputError, first_line
from leukemia_mlops.inference.calibrated import Calibration, check_temperature
from leukemia_mlops.inference.detection import DETECTOR_KEYS, THRESHOLD_KEYS, YoloScorer
from leukemia_mlops.inference.scorers import (
    OnnxNetwork,
    OnnxScorer,
    Scorer,
    TorchNetwork,
    TorchScorer,
)
from leukemia_mlops.labels import CLASS_NAMES
from leukemia_mlops.models import family
from leukemia_mlops.models.base import CELL_LOGIT, DETECTIONS, FineTunedModule

#: Preprocessing settings a model may declare; they must match what images are prepared with.
PREPROCESSING_KEYS = ("image_size", "window", "fit")
_MLFLOW_URI = re.compile(r"^(runs|models):/")
_ALLOW_PICKLE = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"
#: Where the validated decision threshold travels: ONNX metadata key, MLflow metric of the
#: evaluate stage (logged into the training run), ``metrics.json`` key of the checkpoint.
ONNX_THRESHOLD_KEY = "validated_threshold"
MLFLOW_THRESHOLD_METRIC = "eval/threshold"
#: The temperature and the conformal quantiles travel beside it: ``metrics.json``'s
#: ``temperature`` and ``conformal.quantile``, these ONNX keys and these MLflow metrics.
ONNX_TEMPERATURE_KEY = "temperature"
MLFLOW_TEMPERATURE_METRIC = "eval/temperature"
ONNX_QUANTILE_KEYS = {name: f"conformal_quantile_{name}" for name in CLASS_NAMES}
MLFLOW_QUANTILE_METRICS = {name: f"eval/conformal/quantile/{name}" for name in CLASS_NAMES}
CHECKPOINT_DIGEST_KEY = "checkpoint_sha256"


#: What torch raises reading a file that is no checkpoint, memory-mapped (which needs torch's
#: zip format): not a zip archive, a corrupt one, a truncated one (mmap's OSError), content it
#: refuses to unpickle.
NOT_A_CHECKPOINT = (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, OSError)
#: How ``load_state_dict`` refuses weights that do not fit the module they are loaded into.
_WEIGHTS_DO_NOT_FIT = "Error(s) in loading state_dict"


def read_checkpoint(checkpoint: str | Path, what: str) -> dict[str, Any]:
    """A Lightning checkpoint's content, read safely and without its weights (memory-mapped);
    a file that is none is an InputError saying it is not ``what``. Only torch's errors of a
    file it cannot read are caught: any other exception is a bug and keeps its traceback."""
    path = _existing(checkpoint, "checkpoint")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except NOT_A_CHECKPOINT as err:
        raise InputError(
            f"{path} is not {what} ({type(err).__name__}: {first_line(err)})"
        ) from None
    if not isinstance(content, dict) or not isinstance(content.get("state_dict"), dict):
        raise InputError(f"{path} is not {what} (no Lightning state_dict in it)")
    return content


def checkpoint_class(checkpoint: str | Path) -> type[FineTunedModule]:
    """The module class a checkpoint names (see :func:`~.models.family.checkpoint_class`), read
    safely without the weights; a file that is no such checkpoint is an InputError."""
    read_checkpoint(checkpoint, "a model checkpoint")
    return family.checkpoint_class(checkpoint)


def load_module(checkpoint: str | Path) -> FineTunedModule:
    """The trained module of a Lightning checkpoint, of the class it names, read safely
    (``weights_only``; see :meth:`~.models.base.FineTunedModule.load_trained`)."""
    cls = checkpoint_class(checkpoint)
    try:
        return cls.load_trained(str(checkpoint))
    except RuntimeError as err:  # its weights do not fit the module its settings build
        if not str(err).startswith(_WEIGHTS_DO_NOT_FIT):
            raise
        raise InputError(
            f"{checkpoint} is not a {cls.__name__} checkpoint ({first_line(err)})"
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
        return module_scorer(load_module(path), path)
    raise InputError(f"model must be a .ckpt or .onnx file or a runs:/ or models:/ URI: {text}")


def module_scorer(
    module: FineTunedModule, source: str | Path, preprocessing: dict[str, Any] | None = None
) -> Scorer | YoloScorer:
    """The scorer of a trained module's served network, as its class's output needs
    (:data:`MODULE_SCORERS`); ``preprocessing`` adds to what a cell classifier declares."""
    return MODULE_SCORERS[module.served_output](module, source, preprocessing or {})


def _cell_logit_scorer(
    module: FineTunedModule, source: str | Path, preprocessing: dict[str, Any]
) -> TorchScorer:
    declared = {k: module.hparams[k] for k in PREPROCESSING_KEYS if k in module.hparams}
    return TorchScorer(module.serving_network(), preprocessing={**declared, **preprocessing})


def _detections_scorer(
    module: FineTunedModule, source: str | Path, preprocessing: dict[str, Any]
) -> YoloScorer:
    """Letterboxed inputs of any size (``preprocessing`` does not apply)."""
    return detector_scorer(TorchNetwork(module.serving_network()), module.hparams, source)


#: How a module's served network becomes a scorer, by its class's ``served_output``.
MODULE_SCORERS: dict[str, Callable[..., Scorer | YoloScorer]] = {
    CELL_LOGIT: _cell_logit_scorer,
    DETECTIONS: _detections_scorer,
}


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


class Validated(NamedTuple):
    """What the evaluate stage validated for a model: the decision threshold on its raw P(ALL)
    and, where known, the calibration of P(ALL) (temperature, conformal quantiles)."""

    threshold: float
    calibration: Calibration | None = None

    def onnx_metadata(self) -> dict[str, float]:
        """The ONNX metadata that carries it (:data:`ONNX_THRESHOLD_KEY` and the rest)."""
        metadata = {ONNX_THRESHOLD_KEY: self.threshold}
        if self.calibration is not None:
            metadata[ONNX_TEMPERATURE_KEY] = self.calibration.temperature
            for name, value in (self.calibration.quantiles or {}).items():
                metadata[ONNX_QUANTILE_KEYS[name]] = value
        return metadata


def report_decision(metrics: dict[str, Any], where: str | Path) -> Validated:
    """What an evaluation report (``metrics.json``) validated; a report from before the
    calibration has a threshold only."""
    conformal = metrics.get("conformal") or {}
    return _validated(
        metrics.get("threshold"), metrics.get("temperature"), conformal.get("quantile"), where
    )


def _validated(
    threshold: object, temperature: object, quantiles: dict[str, object] | None, where: str | Path
) -> Validated:
    """Checked values as a :class:`Validated`, or an InputError naming ``where``."""
    calibration = None
    if temperature is not None:
        if quantiles is not None:
            quantiles = {name: _threshold_value(quantiles.get(name), where) for name in CLASS_NAMES}
        calibration = Calibration(check_temperature(temperature, where), quantiles)
    return Validated(_threshold_value(threshold, where), calibration)


def evaluation_report(
    evaluation: str | Path | Sequence[Path], checkpoint: str | Path
) -> tuple[dict[str, Any], Path] | None:
    """The evaluate stage's ``metrics.json`` (or whichever of several) that evaluated
    ``checkpoint``, and its path.

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
            return metrics, path
    return None


def evaluation_decision(
    evaluation: str | Path | Sequence[Path], checkpoint: str | Path
) -> Validated | None:
    """What the evaluation of ``checkpoint`` validated (see :func:`evaluation_report`)."""
    found = evaluation_report(evaluation, checkpoint)
    return None if found is None else report_decision(*found)


def validated_decision(
    source: str | Path,
    evaluation: str | Path | Sequence[Path] | None = None,
    tracking_uri: str | None = None,
) -> Validated | None:
    """What was validated for a model, None where nothing is known.

    A ``.ckpt`` takes it from ``evaluation`` (see :func:`evaluation_decision`), an ONNX file
    from its metadata (written by the export), an MLflow model from its run's ``eval/``
    metrics (logged by the evaluate stage).
    """
    text = str(source)
    if is_mlflow_uri(text):
        return _mlflow_decision(text, tracking_uri)
    path = Path(source)
    if path.suffix == ".onnx":
        return _known(
            onnx_metadata(path), ONNX_THRESHOLD_KEY, ONNX_TEMPERATURE_KEY, ONNX_QUANTILE_KEYS, path
        )
    return None if evaluation is None else evaluation_decision(evaluation, path)


def validated_threshold(
    source: str | Path,
    evaluation: str | Path | Sequence[Path] | None = None,
    tracking_uri: str | None = None,
) -> float | None:
    """The decision threshold chosen on validation for a model (on its raw P(ALL)), None
    where none is known (see :func:`validated_decision`)."""
    known = validated_decision(source, evaluation, tracking_uri)
    return None if known is None else known.threshold


def _known(
    values: dict[str, Any],
    threshold_key: str,
    temperature_key: str,
    quantile_keys: dict[str, str],
    where: str | Path,
) -> Validated | None:
    """A :class:`Validated` from flat key-value pairs (ONNX metadata, a run's metrics)."""
    if values.get(threshold_key) is None:
        return None

    def number(key: str) -> float | None:
        return None if values.get(key) is None else float(values[key])

    quantiles = {name: number(key) for name, key in quantile_keys.items()}
    known = None if None in quantiles.values() else quantiles
    return _validated(number(threshold_key), number(temperature_key), known, where)


def onnx_metadata(path: str | Path) -> dict[str, str]:
    """The metadata properties of an ONNX model (the graph itself is not read)."""
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def _mlflow_decision(uri: str, tracking_uri: str | None) -> Validated | None:
    """What the ``eval/`` metrics of the run an MLflow model was logged from validated."""
    import mlflow
    from mlflow import MlflowClient

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    run_id = mlflow.models.get_model_info(uri).run_id
    if run_id is None:
        return None
    metrics = MlflowClient().get_run(run_id).data.metrics
    keys = (MLFLOW_THRESHOLD_METRIC, MLFLOW_TEMPERATURE_METRIC, MLFLOW_QUANTILE_METRICS)
    return _known(metrics, *keys, uri)


def _threshold_value(value: object, where: str | Path) -> float:
    """``value`` as a threshold, or an InputError naming ``where`` it came from."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise InputError(f"{where} holds no valid decision threshold (got {value!r})")
    return float(value)
