"""What the served model takes: image bytes under a pixel limit read from the header, and paths
only under an allowed root, refused alike whatever the reason. In process, on the real served
model class with a real resnet18 (the server itself: ``test_serving_load.py``)."""

from __future__ import annotations

import base64
import os
import struct
import subprocess
import sys
import zlib
from dataclasses import asdict
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY_SIZE
from mlflow.pyfunc.model import PythonModelContext

from leukemia_mlops.data.images import ImageDecodeError, decode_bgr
from leukemia_mlops.inference.intake import (
    ALLOWED_ROOT_ENV,
    MAX_PIXELS_ENV,
    PATH_REFUSED,
    Intake,
    Refused,
)
from leukemia_mlops.inference.serving import WEIGHTS_ARTIFACT, ImageModel, ServedModel
from leukemia_mlops.models.backbones import build_classifier
from leukemia_mlops.models.base import class_path
from leukemia_mlops.models.classifier import CellClassifier


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png(width: int, height: int, rows: int | None = None) -> bytes:
    """An RGB PNG of black pixels whose header says ``width`` x ``height``, holding ``rows``
    rows of pixel data (None: all of them; fewer: a file that claims more than it holds)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    compressor = zlib.compressobj(9)
    row = b"\0" * (1 + 3 * width)
    data = b"".join(compressor.compress(row) for _ in range(height if rows is None else rows))
    data += compressor.flush()
    chunks = [png_chunk(b"IHDR", header), png_chunk(b"IDAT", data), png_chunk(b"IEND", b"")]
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunks)


#: Checks one file's pixels in a fresh process; prints its refusal and its peak RSS in KiB
#: (``VmHWM``: ``ru_maxrss`` would carry the forking test process's peak across ``exec``).
CHECK_SCRIPT = """
import sys
from pathlib import Path
from leukemia_mlops.inference.intake import DEFAULT_MAX_PIXELS, Refused, check_pixels
try:
    check_pixels(Path(sys.argv[1]).read_bytes(), DEFAULT_MAX_PIXELS)
    print("accepted")
except Refused as err:
    print(err)
status = Path("/proc/self/status").read_text().splitlines()
print(next(line.split()[1] for line in status if line.startswith("VmHWM:")))
"""


def checked_in_a_fresh_process(path: Path) -> tuple[str, int]:
    """(the check's answer, the peak RSS in MiB of the process that checked the file)."""
    done = subprocess.run(
        [sys.executable, "-c", CHECK_SCRIPT, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    answer, peak_kib = done.stdout.strip().splitlines()
    return answer, int(peak_kib) // 1024


def test_a_huge_image_is_refused_from_its_header_before_any_decoding(tmp_path):
    """Two PNGs of 8000 x 8000 pixels: one whole (a 64-megapixel decompression bomb: 190 KB
    of zlib, 192 MB of pixels), one whose data stops after a row. Both refusals name the
    size, which for the second only the header gives (OpenCV fails on its missing rows), and
    the process that checks them never holds the 192 MB a decode writes (peak RSS < 100 MiB)."""
    for name, rows in (("bomb.png", None), ("claims.png", 1)):
        path = tmp_path / name
        path.write_bytes(png(8000, 8000, rows))
        answer, peak_mib = checked_in_a_fresh_process(path)
        assert answer == "image of 8000 x 8000 pixels is above the limit of 16,777,216 pixels"
        assert peak_mib < 100, (name, peak_mib)
    with pytest.raises(ImageDecodeError):
        decode_bgr((tmp_path / "claims.png").read_bytes())  # what decoding first answers
    small = tmp_path / "small.png"
    small.write_bytes(png(64, 64))
    assert checked_in_a_fresh_process(small)[0] == "accepted"


@pytest.fixture
def server_files(tmp_path: Path) -> dict[str, Path]:
    """An allowed root holding a cell image and a symlink out of it, beside an outside image."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    image = cv2.circle(np.zeros((64, 64, 3), np.uint8), (32, 32), 16, (200, 120, 160), -1)
    for folder in (root, outside):
        cv2.imwrite(str(folder / "cell.png"), image)
    (root / "link.png").symlink_to(outside / "cell.png")
    (root / "inner.png").symlink_to(root / "cell.png")
    return {"root": root, "outside": outside}


def refused_paths(files: dict[str, Path]) -> list[str]:
    """A file outside (it exists), a missing one, traversals out (to a file that exists and to
    one that does not), a symlink pointing out, and the root folder itself."""
    return [
        "/etc/passwd",
        "/etc/no-such-file-here",
        "../outside/cell.png",
        "../outside/missing.png",
        str(files["root"] / ".." / "outside" / "cell.png"),
        "link.png",
        str(files["root"]),
    ]


def test_paths_are_refused_alike_outside_the_root_and_read_inside(server_files):
    intake = Intake(allowed_root=server_files["root"])
    for given in refused_paths(server_files):
        with pytest.raises(Refused) as refusal:
            intake.path(given)
        assert str(refusal.value) == PATH_REFUSED, given
    inside = (server_files["root"] / "cell.png").resolve()
    assert intake.path("cell.png") == intake.path(str(inside)) == inside
    assert intake.path("inner.png") == inside  # a symlink that stays inside is followed
    with pytest.raises(Refused, match=PATH_REFUSED):
        Intake().path(str(inside))  # no root named: no path at all


def test_the_deployment_environment_sets_the_limits(server_files):
    config = {"max_pixels": 100, "allowed_root": None}
    assert Intake.of(config, {}) == Intake(100, None)
    environ = {MAX_PIXELS_ENV: "5000", ALLOWED_ROOT_ENV: str(server_files["root"])}
    assert Intake.of(config, environ) == Intake(5000, server_files["root"])
    with pytest.raises(ValueError, match="must be an integer"):
        Intake.of({}, {MAX_PIXELS_ENV: "lots"})
    with pytest.raises(ValueError, match="not a folder"):
        Intake.of({}, {ALLOWED_ROOT_ENV: str(server_files["root"] / "cell.png")})


@pytest.fixture
def served(tmp_path: Path, server_files, monkeypatch) -> ImageModel:
    """The served model class, loaded as the server loads it, with an allowed root."""
    torch.manual_seed(0)
    net = build_classifier("resnet18")
    weights = tmp_path / "weights.pt"
    torch.save(net.state_dict(), weights)
    config = ServedModel(
        class_path(CellClassifier),
        {"backbone": "resnet18"},
        TINY_SIZE,
        450,
        "window",
        allowed_root=str(server_files["root"]),
    )
    monkeypatch.delenv(ALLOWED_ROOT_ENV, raising=False)
    monkeypatch.delenv(MAX_PIXELS_ENV, raising=False)
    model = ImageModel()
    model.load_context(PythonModelContext({WEIGHTS_ARTIFACT: str(weights)}, asdict(config)))
    return model


def encoded(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_bad_rows_get_their_own_error_and_good_rows_their_answer(served, server_files):
    """Each malformed row is answered in its place with a clear error and no probability;
    the valid rows between them are scored, in order."""
    cell = (server_files["root"] / "cell.png").read_bytes()
    rows = {
        "valid bytes": (encoded(cell), None),
        "not an image": (encoded(b"just some text, not pixels"), None),
        "truncated png": (encoded(cell[: len(cell) // 2]), None),
        "header says huge": (encoded(png(8000, 8000, rows=1)), None),
        "not base64": ("%%% not base64 %%%", None),
        "empty row": (None, None),
        "valid path": (None, "cell.png"),
        "passwd": (None, "/etc/passwd"),
        "missing": (None, "/etc/no-such-file-here"),
    }
    table = pd.DataFrame(list(rows.values()), columns=["image", "path"])
    answer = served.predict(None, table).set_axis(list(rows))
    errors = answer["error"]
    scored = ["valid bytes", "valid path"]
    assert (errors[scored] == "").all() and answer.loc[scored, "prob_all"].notna().all()
    probs = answer.loc[scored, "prob_all"]
    assert probs.iloc[0] == pytest.approx(probs.iloc[1], rel=1e-6)  # one file, two ways
    assert answer.drop(index=scored)["prob_all"].isna().all()
    assert (answer.drop(index=scored)["label"] == "").all()
    assert "not an image" in errors["not an image"]
    assert "not a decodable image" in errors["truncated png"]
    assert "above the limit" in errors["header says huge"]
    assert "not base64" in errors["not base64"]
    assert "give a base64 'image' or a file 'path'" in errors["empty row"]
    assert errors["passwd"] == "row 7: " + PATH_REFUSED
    assert errors["missing"] == "row 8: " + PATH_REFUSED


def test_the_pixel_limit_is_the_deployments(served, server_files, monkeypatch, tmp_path):
    """The environment's limit, read at load: a 64 x 64 image over a 1,000-pixel limit."""
    monkeypatch.setenv(MAX_PIXELS_ENV, "1000")
    weights = tmp_path / "weights.pt"
    torch.save(served.scorer.net.state_dict(), weights)
    config = asdict(
        ServedModel(class_path(CellClassifier), {"backbone": "resnet18"}, 48, 450, "window")
    )
    model = ImageModel()
    model.load_context(PythonModelContext({WEIGHTS_ARTIFACT: str(weights)}, config))
    cell = encoded((server_files["root"] / "cell.png").read_bytes())
    answer = model.predict(None, pd.DataFrame({"image": [cell]}))
    assert "64 x 64 pixels is above the limit of 1,000" in answer["error"][0]
    assert os.environ[MAX_PIXELS_ENV] == "1000"
