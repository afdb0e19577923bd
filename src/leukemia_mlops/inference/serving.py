"""The served classifier: cell images in, ``prob_all``, ``label`` and ``in_distribution`` out.

An MLflow pyfunc model logged from code (:func:`log_image_model` logs this very file, which
ends with ``set_model``), so serving it unpickles nothing: the code is this file and the
installed package, the weights a ``state_dict`` read with ``torch.load(weights_only=True)``,
the settings (backbone, preprocessing, decision threshold) plain JSON in ``model_config``.

Each request row gives an image as base64 file bytes (column ``image``) or a file path on the
server (column ``path``). Images go through :func:`~.inference.predict.predict_paths`, the
code of ``predict``, so a served probability equals ``predict``'s for the same file.
"""

from __future__ import annotations

import base64
import binascii
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.pyfunc import PythonModel
from mlflow.pyfunc.model import PythonModelContext
from torch import nn

from leukemia_mlops.errors import InputError
from leukemia_mlops.inference.predict import FALLBACK_THRESHOLD, predict_paths
from leukemia_mlops.inference.scorers import TorchScorer
from leukemia_mlops.models.backbones import build_classifier
from leukemia_mlops.tracking.model_logging import torch_requirements

#: Name of the served model in its run (``runs:/<id>/image_model``), beside ``model``.
IMAGE_MODEL = "image_model"
#: ``artifacts`` key of the network's ``state_dict`` file.
WEIGHTS_ARTIFACT = "weights"
#: Request columns: base64 bytes of an image file, or a path the server can read.
IMAGE_COLUMN, PATH_COLUMN = "image", "path"
#: Response columns (``predict``'s, less ``file``).
OUTPUT_COLUMNS = ["prob_all", "label", "in_distribution", "ood_reason", "error"]


@dataclass(frozen=True)
class ServedClassifier:
    """What the served model needs besides the weights: the backbone to rebuild, the prepare
    settings to decode images with, and the threshold chosen on validation (None: 0.5)."""

    backbone: str
    image_size: int
    window: int
    fit: str
    threshold: float | None = None


class ImageClassifier(PythonModel):
    """Scores image files or bytes exactly as ``predict`` does."""

    def load_context(self, context: PythonModelContext) -> None:
        config = context.model_config
        net = build_classifier(config["backbone"], "none")
        state = torch.load(
            context.artifacts[WEIGHTS_ARTIFACT], map_location="cpu", weights_only=True
        )
        net.load_state_dict(state)
        self.settings = {k: config[k] for k in ("image_size", "window", "fit")}
        known = config.get("threshold")
        self.threshold = FALLBACK_THRESHOLD if known is None else float(known)
        self.scorer = TorchScorer(net, preprocessing=self.settings)

    def predict(
        self, context: PythonModelContext, model_input: pd.DataFrame, params: dict | None = None
    ) -> pd.DataFrame:
        with tempfile.TemporaryDirectory(prefix="lmo-serve-") as scratch:
            paths = request_files(model_input, Path(scratch))
            table = predict_paths(
                self.scorer,
                paths,
                Path(scratch) / "predictions.csv",
                **self.settings,
                threshold=self.threshold,
                workers=0,
            )
        return table[OUTPUT_COLUMNS]


def request_files(rows: pd.DataFrame, scratch: Path) -> list[Path]:
    """One file per request row: its ``path``, or its ``image`` bytes written to ``scratch``.

    ``predict`` tells an image by its suffix and decodes by content, so bytes are written
    with a neutral image suffix whatever their format.
    """
    files = []
    for index, row in enumerate(rows.to_dict("records")):
        image, path = row.get(IMAGE_COLUMN), row.get(PATH_COLUMN)
        if isinstance(image, str) and image:
            files.append(_write_bytes(image, scratch / f"{index}.png", index))
        elif isinstance(path, str) and path and not Path(path).is_dir():
            files.append(Path(path))
        else:
            raise InputError(
                f"row {index}: give a base64 '{IMAGE_COLUMN}' or a file '{PATH_COLUMN}'"
            )
    return files


def _write_bytes(encoded: str, target: Path, index: int) -> Path:
    try:
        target.write_bytes(base64.b64decode(encoded, validate=True))
    except binascii.Error as err:
        raise InputError(f"row {index}: '{IMAGE_COLUMN}' is not base64 ({err})") from None
    return target


def log_image_model(uri: str, run_id: str, net: nn.Module, served: ServedClassifier) -> None:
    """Log ``net`` as the image-serving pyfunc model (:data:`IMAGE_MODEL`) into a run.

    Nothing is pickled: the code is this file, the weights a ``state_dict``, the settings
    JSON (``model_config``, also the model's metadata with where the threshold came from).
    """
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    config = asdict(served)
    inputs = Schema(
        [ColSpec("string", name, required=False) for name in (IMAGE_COLUMN, PATH_COLUMN)]
    )
    types = ("double", "string", "boolean", "string", "string")
    outputs = Schema(
        [ColSpec(kind, name) for kind, name in zip(types, OUTPUT_COLUMNS, strict=True)]
    )
    source = "fallback 0.5" if served.threshold is None else "validation"
    mlflow.set_tracking_uri(uri)
    with (
        tempfile.TemporaryDirectory(prefix="lmo-weights-") as scratch,
        mlflow.start_run(run_id=run_id),
    ):
        weights = Path(scratch) / "weights.pt"
        torch.save(net.state_dict(), weights)
        mlflow.pyfunc.log_model(
            name=IMAGE_MODEL,
            python_model=__file__,
            artifacts={WEIGHTS_ARTIFACT: str(weights)},
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


mlflow.models.set_model(ImageClassifier())
