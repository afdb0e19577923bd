"""The served model: cell images in; ``prob_all``, ``label`` (with the threshold it was called at
and that threshold's source) and ``in_distribution`` out.

An MLflow pyfunc model logged from code (:func:`log_image_model` logs this very file, which
ends with ``set_model``), so serving it unpickles nothing: the code is this file and the
installed package, the weights a ``state_dict`` read with ``torch.load(weights_only=True)``,
the settings (module class, network hyperparameters, preprocessing, decision threshold) plain
JSON in ``model_config``.

Each request row gives an image as base64 file bytes (column ``image``) or, where the
deployment names an allowed root, a file path under it on the server (column ``path``); see
:mod:`~.inference.intake` for the limits (pixel count read from the header before decoding,
paths refused alike whatever the reason). A row refused there is answered with its ``error``
and no probability; the other rows go through :func:`~.inference.predict.predict_paths`, the
code of ``predict``, so a served answer equals ``predict``'s for the same file: a detector's
also holds the file's status, cell count and boxes, as ``predict`` gives them (a single-cell
image no box finds gets no probability and no label, status ``no cell found``).

The network is a ``state_dict`` of the module class, or an ONNX file (an fp32 or INT8 export,
scored by ONNX Runtime as ``predict`` scores it).
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.pyfunc import PythonModel
from mlflow.pyfunc.model import PythonModelContext
from torch import nn

from leukemia_mlops.inference.calibrated import Calibration
from leukemia_mlops.inference.detection import YoloScorer
from leukemia_mlops.inference.intake import DEFAULT_MAX_PIXELS, Intake, Refused
from leukemia_mlops.inference.loading import (
    PREPROCESSING_KEYS,
    Validated,
    load_scorer,
    module_scorer,
)
from leukemia_mlops.inference.predict import (
    DEFAULT,
    FALLBACK_THRESHOLD,
    NOT_SCORED,
    Threshold,
    predict_paths,
)
from leukemia_mlops.inference.scorers import Scorer
from leukemia_mlops.models.base import CELL_LOGIT, DETECTIONS, FineTunedModule, class_path
from leukemia_mlops.models.detector import MIN_BOX_SCORE
from leukemia_mlops.models.family import module_class
from leukemia_mlops.tracking.model_logging import torch_requirements

#: Name of the served model in its run (``runs:/<id>/image_model``), beside ``model``.
IMAGE_MODEL = "image_model"
#: ``artifacts`` key of the network's ``state_dict`` file, or of its ONNX export.
WEIGHTS_ARTIFACT, ONNX_ARTIFACT = "weights", "onnx"
#: Request columns: base64 bytes of an image file, or a path under the allowed root.
IMAGE_COLUMN, PATH_COLUMN = "image", "path"
#: Response columns (``predict``'s, less ``file``) and their signature types.
OUTPUT_COLUMNS = {
    "prob_all": "double",
    "label": "string",
    "threshold": "double",
    "threshold_source": "string",
    "calibrated": "boolean",
    "conformal_set": "string",
    "in_distribution": "boolean",
    "ood_reason": "string",
    "error": "string",
}
#: A detector's response adds the file's status (``predict``'s), cell count and boxes (a JSON
#: list of objects with the :data:`BOX_FIELDS` of ``predict``'s boxes table).
DETECTOR_COLUMNS = {"status": "string", "n_cells": "long", "boxes": "string"}
#: The response columns a family adds, by its class's ``served_output``.
SERVED_COLUMNS = {CELL_LOGIT: {}, DETECTIONS: DETECTOR_COLUMNS}
BOX_FIELDS = ["x1", "y1", "x2", "y2", "class", "score"]


@dataclass(frozen=True)
class ServedModel:
    """What the served model needs besides the weights: its module class (a ``_target_``),
    the settings that rebuild its network (``network_settings``), the prepare settings to
    decode images with, the threshold chosen on validation (None: 0.5), for a detector the
    smallest score of a box it answers (``predict``'s ``--min-score``), the request limits
    (:class:`~.inference.intake.Intake`; the server's environment overrides them), and the
    calibration validated with the threshold (``temperature``, conformal ``quantiles`` by class
    name; None: P(ALL) served raw, without sets)."""

    module: str
    network: dict[str, Any]
    image_size: int
    window: int
    fit: str
    threshold: float | None = None
    min_score: float = MIN_BOX_SCORE
    max_pixels: int = DEFAULT_MAX_PIXELS
    allowed_root: str | None = None
    temperature: float | None = None
    quantiles: dict[str, float] | None = None

    @classmethod
    def of(
        cls,
        model: FineTunedModule,
        image_size: int,
        window: int,
        fit: str,
        threshold: float | None = None,
        min_score: float = MIN_BOX_SCORE,
        calibration: Calibration | None = None,
    ) -> ServedModel:
        """The settings of a trained module, served with ``model.net``'s weights."""
        settings = (image_size, window, fit, threshold, min_score)
        calibrated = {} if calibration is None else calibration._asdict()
        return cls(class_path(type(model)), model.network_settings(), *settings, **calibrated)

    def decision(self) -> Threshold:
        """The threshold it labels at: the validated one it was logged with (on the calibrated
        scale where it is calibrated), else 0.5."""
        if self.threshold is None:
            return Threshold(FALLBACK_THRESHOLD, DEFAULT)
        calibration = None
        if self.temperature is not None:
            calibration = Calibration(self.temperature, self.quantiles)
        return Threshold.validated(Validated(self.threshold, calibration))


class ImageModel(PythonModel):
    """Scores image files or bytes exactly as ``predict`` does, with a classifier or a detector."""

    def load_context(self, context: PythonModelContext) -> None:
        config = context.model_config
        self.intake = Intake.of(config)
        # OpenCV's own decompression-bomb guard, read at its first decode: none gets past it.
        os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(self.intake.max_pixels))
        self.settings = {key: config[key] for key in PREPROCESSING_KEYS}
        self.threshold = ServedModel(**config).decision()
        self.min_score = float(config["min_score"])
        if ONNX_ARTIFACT in context.artifacts:
            self.scorer = load_scorer(context.artifacts[ONNX_ARTIFACT])
            return
        state = torch.load(
            context.artifacts[WEIGHTS_ARTIFACT], map_location="cpu", weights_only=True
        )
        self.scorer = _scorer(config["module"], config["network"], state, self.settings)

    def predict(
        self, context: PythonModelContext, model_input: pd.DataFrame, params: dict | None = None
    ) -> pd.DataFrame:
        with tempfile.TemporaryDirectory(prefix="lmo-serve-") as scratch:
            files, refused = request_files(model_input, Path(scratch), self.intake)
            answer = self._score(list(files.values()), Path(scratch)) if files else None
        return self._with_refused(answer, list(files), refused)

    def _score(self, paths: list[Path], scratch: Path) -> pd.DataFrame:
        """``predict``'s answer for the accepted files, in order."""
        boxes_csv = scratch / "boxes.csv"  # written for a detector only
        table = predict_paths(
            self.scorer,
            paths,
            scratch / "predictions.csv",
            **self.settings,
            threshold=self.threshold,
            workers=0,
            boxes_csv=boxes_csv,
            min_score=self.min_score,
        )
        if not isinstance(self.scorer, YoloScorer):
            return table[list(OUTPUT_COLUMNS)]
        return _with_boxes(table, pd.read_csv(boxes_csv, keep_default_na=False))

    def _with_refused(
        self, answer: pd.DataFrame | None, accepted: list[int], refused: dict[int, str]
    ) -> pd.DataFrame:
        """One row per request row, in order: the accepted rows' answers, and for each refused
        row its error, no probability, no label and no conformal set."""
        rows = pd.DataFrame(
            {
                "prob_all": np.nan,
                "label": "",
                "threshold": self.threshold.value,
                "threshold_source": self.threshold.source,
                "calibrated": False,
                "conformal_set": "",
                "in_distribution": False,
                "ood_reason": NOT_SCORED,
                "error": list(refused.values()),
            },
            index=list(refused),
        )
        if isinstance(self.scorer, YoloScorer):
            rows = rows.assign(status=NOT_SCORED, n_cells=0, boxes="[]")
        if answer is None:
            return rows.sort_index().reset_index(drop=True)
        answer = answer.set_axis(accepted)
        combined = pd.concat([answer, rows.astype(answer.dtypes.to_dict())]) if refused else answer
        return combined.sort_index().reset_index(drop=True)


def _scorer(
    module: str, network: dict[str, Any], state: dict[str, torch.Tensor], settings: dict[str, Any]
) -> Scorer | YoloScorer:
    """The scorer ``predict`` makes of a checkpoint, from the network rebuilt and its weights."""
    rebuilt = module_class(module).from_network_settings(network)
    rebuilt.net.load_state_dict(state)
    return module_scorer(rebuilt, IMAGE_MODEL, settings)


def _with_boxes(table: pd.DataFrame, boxes: pd.DataFrame) -> pd.DataFrame:
    """A detector's answer: ``table``'s columns, its ``status``, its ``cells`` as ``n_cells``
    and each file's rows of ``boxes`` (which lists them file after file, ``cells`` rows each)
    as JSON."""
    records = boxes[BOX_FIELDS].to_dict("records")
    ends = np.cumsum(table["cells"].to_numpy())
    per_file = [
        json.dumps(records[end - count : end])
        for count, end in zip(table["cells"], ends, strict=True)
    ]
    return table[list(OUTPUT_COLUMNS)].assign(
        status=table["status"], n_cells=table["cells"], boxes=per_file
    )


def request_files(
    rows: pd.DataFrame, scratch: Path, intake: Intake
) -> tuple[dict[int, Path], dict[int, str]]:
    """The file of each accepted request row (its ``image`` bytes written to ``scratch``, or
    its ``path`` under the allowed root), and the error of each refused one, by row number.

    ``predict`` tells an image by its suffix and decodes by content, so bytes are written
    with a neutral image suffix whatever their format.
    """
    files, refused = {}, {}
    for index, row in enumerate(rows.to_dict("records")):
        image, path = row.get(IMAGE_COLUMN), row.get(PATH_COLUMN)
        try:
            if isinstance(image, str) and image:
                files[index] = scratch / f"{index}.png"
                files[index].write_bytes(intake.image_bytes(image))
            elif isinstance(path, str) and path:
                files[index] = intake.path(path)
            else:
                raise Refused(f"give a base64 '{IMAGE_COLUMN}' or a file '{PATH_COLUMN}'")
        except Refused as err:
            files.pop(index, None)
            refused[index] = f"row {index}: {err}"
    return files, refused


def log_image_model(uri: str, run_id: str, net: nn.Module | Path, served: ServedModel) -> None:
    """Log ``net`` (a module, or an ONNX export's path) as the image-serving pyfunc model
    (:data:`IMAGE_MODEL`) into a run.

    Nothing is pickled: the code is this file, the weights a ``state_dict`` or the ONNX file,
    the settings JSON (``model_config``, also the model's metadata with where the threshold
    came from).
    """
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    config = asdict(served)
    inputs = Schema(
        [ColSpec("string", name, required=False) for name in (IMAGE_COLUMN, PATH_COLUMN)]
    )
    columns = {**OUTPUT_COLUMNS, **SERVED_COLUMNS[module_class(served.module).served_output]}
    outputs = Schema([ColSpec(kind, name) for name, kind in columns.items()])
    source = served.decision().source
    mlflow.set_tracking_uri(uri)
    with (
        tempfile.TemporaryDirectory(prefix="lmo-weights-") as scratch,
        mlflow.start_run(run_id=run_id),
    ):
        if isinstance(net, Path):
            artifacts = {ONNX_ARTIFACT: str(net)}
        else:
            artifacts = {WEIGHTS_ARTIFACT: str(Path(scratch) / "weights.pt")}
            torch.save(net.state_dict(), artifacts[WEIGHTS_ARTIFACT])
        mlflow.pyfunc.log_model(
            name=IMAGE_MODEL,
            python_model=__file__,
            artifacts=artifacts,
            model_config=config,
            metadata={**config, "threshold_source": source},
            signature=ModelSignature(inputs, outputs),
            input_example=_example_request(),
            pip_requirements=torch_requirements(),
        )


def _example_request() -> pd.DataFrame:
    """A request of one image: a bright disk on black, as base64 PNG bytes (the example the
    model's page shows; logging checks that the model answers it)."""
    import cv2

    image = cv2.circle(np.zeros((64, 64, 3), np.uint8), (32, 32), 16, (200, 120, 160), -1)
    encoded = base64.b64encode(cv2.imencode(".png", image)[1].tobytes()).decode()
    return pd.DataFrame({IMAGE_COLUMN: [encoded]})


mlflow.models.set_model(ImageModel())
