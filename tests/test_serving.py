"""``mlflow models serve`` of the logged image model answers as ``predict`` does."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY_SIZE
from mlflow import MlflowClient
from omegaconf import OmegaConf
from servers import free_port
from torch import nn

from leukemia_mlops.cli import predict as predict_cli
from leukemia_mlops.inference.serving import IMAGE_MODEL, ServedClassifier, log_image_model
from leukemia_mlops.models.backbones import build_classifier
from leukemia_mlops.tracking.model_logging import log_classifier

pytestmark = pytest.mark.slow
START_TIMEOUT_S = 120
BACKBONE = "resnet18"


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
    model, with a validated threshold between the two images' probabilities."""
    _, uri, run_id, net = store
    probs = predicted["prob_all"].to_numpy()
    assert probs[0] != probs[1], "the two images must score differently to test the threshold"
    threshold = float(probs.mean())
    served = ServedClassifier(BACKBONE, TINY_SIZE, 450, "window", threshold)
    log_image_model(uri, run_id, net, served)
    return uri, f"runs:/{run_id}/{IMAGE_MODEL}", threshold


@pytest.fixture
def server(logged, tmp_path) -> Iterator[str]:
    """``mlflow models serve`` of the image model with pickle refused; yields its URL."""
    uri, model, _ = logged
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false",
        # The server runs ``uvicorn`` by name: the venv's programs come first, as activated.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model]
    command += ["--env-manager", "local", "--host", "127.0.0.1", "-p", str(port), "-w", "1"]
    log = tmp_path / "serve.log"
    with log.open("wb") as stream:
        process = subprocess.Popen(
            command, stdout=stream, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        _wait_for_ping(f"http://127.0.0.1:{port}", process, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError):  # the CLI and the uvicorn it started
            os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


def _wait_for_ping(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow models serve exited: {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            time.sleep(0.3)
    raise RuntimeError(f"mlflow models serve did not answer /ping: {log.read_text()[-3000:]}")


def _post(url: str, payload: dict) -> list[dict]:
    request = urllib.request.Request(
        f"{url}/invocations",
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())["predictions"]


def test_served_model_answers_images_as_predict_does(server, predicted, logged, two_images):
    """One image as base64 bytes, one as a path: predict's probabilities, the validated
    threshold's labels (one each side) and the in-distribution flag."""
    encoded = base64.b64encode(two_images[0].read_bytes()).decode()
    split = {"columns": ["image", "path"], "data": [[encoded, None], [None, str(two_images[1])]]}
    answer = pd.DataFrame(_post(server, {"dataframe_split": split}))
    np.testing.assert_allclose(answer["prob_all"], predicted["prob_all"], rtol=1e-6)
    expected = np.where(predicted["prob_all"] > logged[2], "ALL", "HEM")
    assert list(answer["label"]) == list(expected)
    assert list(answer["in_distribution"]) == list(predicted["in_distribution"])


def test_logged_image_model_states_its_threshold_and_needs_no_pickle(logged, monkeypatch):
    uri, model, threshold = logged
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    mlflow.set_tracking_uri(uri)
    loaded = mlflow.pyfunc.load_model(model)
    metadata = loaded.metadata.metadata
    assert metadata["threshold"] == threshold and metadata["threshold_source"] == "validation"
    with pytest.raises(Exception, match="give a base64 'image' or a file 'path'"):
        loaded.predict(pd.DataFrame({"path": [""]}))
