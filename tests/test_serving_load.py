"""A real ``mlflow models serve`` of the image model on 127.0.0.1: under load from 1, 4 and 16
concurrent clients nothing is lost and nothing fails, its memory stays flat, malformed payloads
each get a clear refusal (never a 500) and server-side paths are refused alike whether the file
exists or not. Latencies are measured by the benchmark (``bench/serving.py``), never asserted."""

from __future__ import annotations

import base64
import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import TINY_SIZE
from mlflow import MlflowClient
from test_intake import png

from bench.serving import (
    RSS_GROWTH_LIMIT,
    Server,
    image_request,
    load_run,
    post,
    predictions,
    serving,
)
from leukemia_mlops.inference.intake import ALLOWED_ROOT_ENV, PATH_REFUSED
from leukemia_mlops.inference.serving import IMAGE_MODEL, ServedModel, log_image_model
from leukemia_mlops.models.backbones import build_classifier
from leukemia_mlops.models.base import class_path
from leukemia_mlops.models.classifier import CellClassifier

pytestmark = pytest.mark.slow
#: Requests of the load test (the benchmark sends 2,000).
REQUESTS = 300


@pytest.fixture(scope="module")
def cells(tiny_raw: Path) -> list[Path]:
    """Eight training cells of the tiny set, ALL and HEM."""
    return sorted(tiny_raw.rglob("*.bmp"))[:8]


@pytest.fixture(scope="module")
def root(cells, tmp_path_factory) -> Path:
    """The deployment's allowed root: a cell, and a symlink to a file outside it."""
    base = tmp_path_factory.mktemp("served")
    (base / "root").mkdir()
    (base / "outside").mkdir()
    shutil.copyfile(cells[0], base / "root" / "cell.bmp")
    shutil.copyfile(cells[1], base / "outside" / "secret.bmp")
    (base / "root" / "link.bmp").symlink_to(base / "outside" / "secret.bmp")
    return base / "root"


@pytest.fixture(scope="module")
def server(root, tmp_path_factory) -> Iterator[Server]:
    """The served model of an untrained resnet18 (any network's numbers must hold), with
    ``root`` allowed."""
    folder = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("load", str(folder / "artifacts"))
    run_id = client.create_run(experiment).info.run_id
    torch.manual_seed(0)
    served = ServedModel(
        class_path(CellClassifier), {"backbone": "resnet18"}, TINY_SIZE, 450, "window"
    )
    log_image_model(uri, run_id, build_classifier("resnet18"), served)
    model = f"runs:/{run_id}/{IMAGE_MODEL}"
    with serving(uri, model, folder / "serve.log", {ALLOWED_ROOT_ENV: str(root)}) as running:
        yield running


def rows(*cells: tuple[str | None, str | None]) -> bytes:
    """A request of ``(image, path)`` rows."""
    split = {"columns": ["image", "path"], "data": [list(cell) for cell in cells]}
    return json.dumps({"dataframe_split": split}).encode()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_under_load_nothing_is_lost_nothing_fails_and_memory_stays_flat(server, cells):
    run = load_run(server, [image_request([path]) for path in cells], REQUESTS)
    assert run.answered == REQUESTS
    for phase in [run.warmup, *run.phases]:
        assert dict(phase.classes) == {"ok": phase.requests}, phase.clients
    assert [phase.clients for phase in run.phases] == [1, 4, 16]
    assert run.rss_growth <= RSS_GROWTH_LIMIT, run.rss


def test_malformed_payloads_are_refused_clearly_and_the_server_keeps_answering(server, cells):
    """Per-row errors for bad images (a 64-megapixel PNG among them, refused from its header:
    the server's memory does not take its 192 MB), 4xx for bad requests, never a 500."""
    cell = cells[0].read_bytes()
    before = server.rss()
    answer = post(
        server.url,
        rows(
            (b64(b"plain text, not an image"), None),
            (b64(cell[: len(cell) // 2]), None),
            (b64(png(8000, 8000)), None),
            (b64(cell), None),
        ),
    )
    assert answer.status == 200
    errors = [row["error"] for row in predictions(answer)]
    assert "not an image" in errors[0]
    assert "not a decodable image" in errors[1]
    assert "8000 x 8000 pixels is above the limit" in errors[2]
    assert errors[3] == ""
    assert server.rss() - before < 150 * 2**20
    refusals = {
        "empty body": post(server.url, b""),
        "not JSON": post(server.url, b"{not json"),
        "no rows key": post(server.url, json.dumps({"rows": []}).encode()),
        "wrong content type": post(server.url, b64(cell).encode(), "image/png"),
        "text content type": post(server.url, rows((b64(cell), None)), "text/plain"),
        # No Content-Type given: urllib sends a form's, as browsers and curl -d do.
        "no content type": post(server.url, rows((b64(cell), None)), None),
    }
    for name, refused in refusals.items():
        assert 400 <= refused.status < 500, (name, refused.status, refused.body[:300])
    again = post(server.url, image_request([cells[1]]))
    assert again.status == 200 and predictions(again)[0]["error"] == ""


def test_server_side_paths_are_refused_alike_and_read_only_under_the_root(server, root):
    """/etc/passwd, a missing file, traversals out (to a file that exists and one that does
    not) and a symlink pointing out all get the same answer; a file under the root is read."""
    refused = [
        "/etc/passwd",
        "/etc/no-such-file-here",
        "../outside/secret.bmp",
        "../outside/missing.bmp",
        "link.bmp",
        str(root / ".." / "outside" / "secret.bmp"),
    ]
    answer = post(server.url, rows(*[(None, path) for path in refused], (None, "cell.bmp")))
    assert answer.status == 200
    answered = predictions(answer)
    for index, row in enumerate(answered[:-1]):
        assert row["error"] == f"row {index}: {PATH_REFUSED}", refused[index]
        assert math.isnan(row["prob_all"]) and row["label"] == ""
    assert answered[-1]["error"] == "" and 0 <= answered[-1]["prob_all"] <= 1
