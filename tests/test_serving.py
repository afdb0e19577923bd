"""The logged image model (``mlflow models serve`` of it, for the classifier) answers as
``predict`` does, for a classifier and for a detector, from image bytes and from paths under
the root its deployment allows."""

from __future__ import annotations

import base64
import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import cv2
import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY_SIZE
from mlflow import MlflowClient
from omegaconf import OmegaConf
from test_predict_yolo import (
    MIN_SCORE,
    blind_detector,
    composed_scenes,
    detector_params,
    train_yolo,
)
from torch import nn

from bench.serving import serving
from leukemia_mlops.cli import predict as predict_cli
from leukemia_mlops.inference.calibrated import Calibration, calibrate, calibrated_threshold
from leukemia_mlops.inference.intake import ALLOWED_ROOT_ENV
from leukemia_mlops.inference.loading import load_module
from leukemia_mlops.inference.serving import (
    BOX_FIELDS,
    IMAGE_MODEL,
    ServedModel,
    log_image_model,
)
from leukemia_mlops.models.backbones import build_classifier
from leukemia_mlops.models.base import class_path
from leukemia_mlops.models.classifier import CellClassifier
from leukemia_mlops.tracking.model_logging import log_classifier

pytestmark = pytest.mark.slow
BACKBONE = "resnet18"
#: A validated calibration the served model is logged with: T = 2 softens P(ALL); with both
#: quantiles 0.55 a cell gets both classes where its calibrated P(ALL) is within 0.45-0.55.
CALIBRATION = Calibration(2.0, {"ALL": 0.55, "HEM": 0.55})


@pytest.fixture(scope="module")
def two_images(tiny_raw: Path) -> list[Path]:
    """An ALL and a HEM training image."""
    return [next(tiny_raw.rglob(f"*_{kind}.bmp")) for kind in ("all", "hem")]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[Path, str, str, nn.Module]:
    """(folder, tracking URI, run id, network): a run holding an untrained resnet18 as
    training logs it (serving must reproduce any network's numbers)."""
    folder = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("serving")).info.run_id
    torch.manual_seed(0)
    net = build_classifier(BACKBONE)
    log_classifier(uri, run_id, net, TINY_SIZE)
    return folder, uri, run_id, net


@pytest.fixture(scope="module")
def predicted(store, two_images) -> pd.DataFrame:
    """``predict``'s table for the two images, from the run's PyTorch model."""
    folder, uri, run_id, _ = store
    params = folder / "params.yaml"
    config = {
        "data": {"prepare": {"image_size": TINY_SIZE, "window": 450, "fit": "window"}},
        "paths": {"reports_dir": str(folder / "reports"), "mlruns_dir": str(folder)},
        "logger": {"mlflow": {"tracking_uri": uri}},
    }
    OmegaConf.save(OmegaConf.create(config), params)
    out = folder / "predictions.csv"
    model = f"runs:/{run_id}/model"
    predict_cli.main([model, *map(str, two_images), "--out", str(out), "--params", str(params)])
    return pd.read_csv(out)


@pytest.fixture(scope="module")
def logged(store, predicted) -> tuple[str, str, float]:
    """(tracking URI, image model URI, threshold): the same network logged as the served
    model, with a validated threshold between the two images' probabilities and a validated
    calibration (:data:`CALIBRATION`)."""
    _, uri, run_id, net = store
    probs = predicted["prob_all"].to_numpy()
    assert probs[0] != probs[1], "the two images must score differently to test the threshold"
    threshold = float(probs.mean())
    served = ServedModel(
        class_path(CellClassifier),
        {"backbone": BACKBONE},
        TINY_SIZE,
        450,
        "window",
        threshold,
        **CALIBRATION._asdict(),
    )
    log_image_model(uri, run_id, net, served)
    return uri, f"runs:/{run_id}/{IMAGE_MODEL}", threshold


@pytest.fixture
def server(logged, tiny_raw, tmp_path) -> Iterator[str]:
    """``mlflow models serve`` of the image model with pickle refused, reading paths under the
    tiny raw set; yields its URL."""
    uri, model, _ = logged
    with serving(uri, model, tmp_path / "serve.log", {ALLOWED_ROOT_ENV: str(tiny_raw)}) as served:
        yield served.url


def post(url: str, payload: dict) -> list[dict]:
    request = urllib.request.Request(
        f"{url}/invocations",
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())["predictions"]


def test_served_model_answers_images_as_predict_does(server, predicted, logged, two_images):
    """One image as base64 bytes, one as a path: predict's probabilities calibrated with the
    validated temperature, their conformal sets, the validated threshold's labels (one each
    side, the threshold on the calibrated scale) and the in-distribution flag."""
    encoded = base64.b64encode(two_images[0].read_bytes()).decode()
    split = {"columns": ["image", "path"], "data": [[encoded, None], [None, str(two_images[1])]]}
    answer = pd.DataFrame(post(server, {"dataframe_split": split}))
    calibrated = calibrate(predicted["prob_all"].to_numpy(), CALIBRATION.temperature)
    np.testing.assert_allclose(answer["prob_all"], calibrated, rtol=1e-6)
    assert list(answer["calibrated"]) == [True, True]
    assert list(answer["conformal_set"]) == CALIBRATION.sets(answer["prob_all"].to_numpy())
    expected = np.where(predicted["prob_all"] > logged[2], "ALL", "HEM")
    assert list(answer["label"]) == list(expected)
    served_threshold = calibrated_threshold(logged[2], CALIBRATION.temperature)
    np.testing.assert_allclose(answer["threshold"], [served_threshold] * 2, rtol=1e-9)
    assert list(answer["threshold_source"]) == ["validation"] * 2
    assert list(answer["in_distribution"]) == list(predicted["in_distribution"])


def test_logged_image_model_states_its_threshold_and_needs_no_pickle(logged, monkeypatch):
    uri, model, threshold = logged
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    mlflow.set_tracking_uri(uri)
    loaded = mlflow.pyfunc.load_model(model)
    metadata = loaded.metadata.metadata
    assert metadata["threshold"] == threshold and metadata["threshold_source"] == "validation"
    answer = loaded.predict(pd.DataFrame({"path": [""]}))
    assert answer["error"][0] == "row 0: give a base64 'image' or a file 'path'"


@pytest.fixture(scope="module")
def detector_files(two_images, tiny_prepared, tmp_path_factory) -> list[Path]:
    """An ALL cell (an image of one cell) and a scene of several test cells."""
    scene = composed_scenes(tiny_prepared, "test", 1, seed=1)[0]
    path = tmp_path_factory.mktemp("detector_files") / "scene.png"
    cv2.imwrite(str(path), scene.image[..., ::-1])
    return [two_images[0], path]


@pytest.fixture(scope="module")
def detector_predicted(detector_files, tiny_prepared, tmp_path_factory):
    """(checkpoint, files table, boxes table): a tiny trained detector, and what the predict
    CLI writes for the two files with it."""
    folder = tmp_path_factory.mktemp("detector")
    # Between the cell's best HEM and ALL scores (0.11, 0.15): P(ALL) 1, not 0.58 at 0.01.
    checkpoint = train_yolo(tiny_prepared, folder / "yolo.ckpt", conf_threshold=0.12)
    params, _ = detector_params(folder)
    out = folder / "predictions.csv"
    options = ["--out", str(out), "--params", str(params), "--min-score", str(MIN_SCORE)]
    predict_cli.main([str(checkpoint), *map(str, detector_files), *options, "--threshold", "0.5"])
    table = pd.read_csv(out, keep_default_na=False, na_values={"prob_all": [""]})
    boxes = pd.read_csv(folder / "predictions_boxes.csv", keep_default_na=False)
    return checkpoint, table, boxes


def test_served_detector_answers_as_predict_does(
    store, detector_predicted, detector_files, monkeypatch
):
    """Both images as base64 bytes: predict's probability, cell counts and boxes, equal to the
    last bit (the same code on the same bytes), and labels at the validated threshold."""
    _, uri, _, _ = store
    checkpoint, table, boxes = detector_predicted
    cell = table["prob_all"][0]
    threshold = float(cell + (cell > 0.5)) / 2  # calls the cell the other way than 0.5 does
    client = MlflowClient(uri)
    run_id = client.create_run(client.get_experiment_by_name("serving").experiment_id).info.run_id
    detector = load_module(checkpoint)
    log_image_model(
        uri,
        run_id,
        detector.net,
        ServedModel.of(detector, TINY_SIZE, 450, "window", threshold, MIN_SCORE),
    )
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    mlflow.set_tracking_uri(uri)
    loaded = mlflow.pyfunc.load_model(f"runs:/{run_id}/{IMAGE_MODEL}")
    images = [base64.b64encode(path.read_bytes()).decode() for path in detector_files]
    answer = loaded.predict(pd.DataFrame({"image": images}))

    assert list(answer.columns) == loaded.metadata.get_output_schema().input_names()
    assert answer["prob_all"][0] == cell and np.isnan(answer["prob_all"][1])
    assert list(answer["label"]) == ["ALL" if cell > threshold else "HEM", ""]
    assert answer["label"][0] != table["label"][0]  # at 0.5: the threshold must count
    assert list(answer["threshold"]) == [threshold] * 2
    assert list(answer["threshold_source"]) == ["validation"] * 2
    assert list(answer["status"]) == list(table["status"]) == ["cell found", "not a single cell"]
    assert list(answer["in_distribution"]) == list(table["in_distribution"])
    assert list(answer["n_cells"]) == list(table["cells"]) and answer["n_cells"][1] > 0
    for row, path in enumerate(detector_files):
        expected = boxes.loc[boxes["file"] == str(path), BOX_FIELDS].to_dict("records")
        assert json.loads(answer["boxes"][row]) == expected


def test_a_served_detector_gives_no_label_to_a_cell_no_box_finds(
    store, two_images, tmp_path, monkeypatch
):
    """A detector logged without a validated threshold, none of whose boxes reaches the 0.25
    floor: the ALL cell is not found (no probability, no label, though its validated
    probability is 1.0), and the row says it was to be called at the default 0.5."""
    _, uri, _, _ = store
    detector = load_module(blind_detector(tmp_path / "blind.ckpt"))
    client = MlflowClient(uri)
    run_id = client.create_run(client.get_experiment_by_name("serving").experiment_id).info.run_id
    served = ServedModel.of(detector, TINY_SIZE, 450, "window")
    log_image_model(uri, run_id, detector.net, served)
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    monkeypatch.setenv(ALLOWED_ROOT_ENV, str(two_images[0].parent))
    mlflow.set_tracking_uri(uri)
    loaded = mlflow.pyfunc.load_model(f"runs:/{run_id}/{IMAGE_MODEL}")
    assert loaded.metadata.metadata["threshold_source"] == "default"
    answer = loaded.predict(pd.DataFrame({"path": [str(two_images[0])]})).iloc[0]
    assert answer["status"] == "no cell found" and answer["n_cells"] == 0
    assert np.isnan(answer["prob_all"]) and answer["label"] == ""
    assert json.loads(answer["boxes"]) == [] and answer["in_distribution"]
    assert (answer["threshold"], answer["threshold_source"]) == (0.5, "default")
