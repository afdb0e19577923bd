"""Faults survived: a stage killed half-way leaves nothing half-written behind, and a training
killed in a known epoch resumes into the same weights, bit for bit, as one never killed."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tree_digest
from mlflow import MlflowClient

from leukemia_mlops.config import compose, write_params
from leukemia_mlops.data.synthetic import SyntheticSpec, generate_cnmc
from leukemia_mlops.models.metrics import MONITOR
from leukemia_mlops.tracking.run_files import RunFiles
from leukemia_mlops.tracking.store import tracking_uri

pytestmark = pytest.mark.slow


def written_rows(cache: Path) -> int:
    """How many images of a cache being filled hold pixels (0 while the file is not there)."""
    try:
        images = np.load(cache, mmap_mode="r")
    except (FileNotFoundError, ValueError):  # not created yet, or its header not yet complete
        return 0
    return int(images.reshape(len(images), -1).any(axis=1).sum())


def test_prepare_killed_half_way_leaves_no_partial_cache(tmp_path: Path):
    raw = tmp_path / "data/raw"
    generate_cnmc(
        raw,
        SyntheticSpec(n_train_subjects=9, n_prelim_subjects=2, cells_per_subject=200),
        workers=2,
    )
    before = tree_digest(raw)
    params = tmp_path / "params.yaml"
    write_params(compose(["data.prepare.workers=1", "data.prepare.image_size=64"]), params)
    command = [sys.executable, "-m", "leukemia_mlops.cli.prepare", "--params", str(params)]

    process = subprocess.Popen(command, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    partial = tmp_path / "data/prepared.tmp"
    deadline = time.monotonic() + 120
    # Kill on an observed event: the first decoded image reaching the cache, with ~2,200 to go.
    while written_rows(partial / "images.npy") == 0:
        assert process.poll() is None, "prepare finished before it could be killed"
        assert time.monotonic() < deadline, "prepare never wrote an image"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert partial.exists() and not (tmp_path / "data/prepared").exists()
    total = sum(1 for _ in raw.rglob("*.bmp"))
    assert 0 < written_rows(partial / "images.npy") < total  # the kill landed mid-decode

    subprocess.run(command, cwd=tmp_path, check=True, capture_output=True)
    images = np.load(tmp_path / "data/prepared/images.npy", mmap_mode="r")
    manifest = pd.read_parquet(tmp_path / "data/prepared/manifest.parquet")
    assert len(images) == len(manifest) == sum(1 for _ in raw.rglob("*.bmp"))
    assert images[-1].any(), "the last image of the cache was never written"
    assert not partial.exists()
    assert tree_digest(raw) == before


def stop_after_epochs(
    process: subprocess.Popen, files: RunFiles, mlruns: Path, epochs: int, log: Path
) -> list[int]:
    """Freeze ``process`` (SIGSTOP) once its run holds ``epochs`` validation points in the
    store (each is written as an epoch ends); returns the steps it holds while frozen."""
    client = MlflowClient(tracking_uri(None, mlruns))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert process.poll() is None, f"training ended unkilled: {log.read_text()[-3000:]}"
        run_id = (
            json.loads(files.state.read_text()).get("mlflow_run_id")
            if files.state.is_file()
            else None
        )
        if run_id and len(client.get_metric_history(run_id, MONITOR)) >= epochs:
            process.send_signal(signal.SIGSTOP)
            return sorted(m.step for m in client.get_metric_history(run_id, MONITOR))
        time.sleep(0.05)
    raise AssertionError(f"{epochs} epochs not logged in time")


def train(params: Path, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "leukemia_mlops.cli.train", "--params", str(params)]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)


def histories(mlruns: Path, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Every metric of the run as its (step, value) points."""
    client = MlflowClient(tracking_uri(None, mlruns))
    return {
        key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
        for key in client.get_run(run_id).data.metrics
    }


def assert_same_weights(checkpoint: Path, reference: Path) -> None:
    """Every tensor of the two checkpoints' ``state_dict`` is equal, bit for bit."""
    ours = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    theirs = torch.load(reference, map_location="cpu", weights_only=True)["state_dict"]
    assert ours.keys() == theirs.keys()
    differ = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not differ, f"{len(differ)} tensors differ, first {differ[:3]}"


def test_a_run_killed_in_epoch_3_resumes_into_the_weights_of_a_run_never_killed(
    tiny_config, tmp_path
):
    # Two loader workers, a frozen-backbone warm-up epoch and augmentation: every source of
    # randomness a resume could get wrong.
    cfg = tiny_config(
        "trainer.max_epochs=4", "callbacks.early_stopping.patience=10", "datamodule.num_workers=2"
    )
    write_params(cfg, tmp_path / "params.yaml")
    files = RunFiles(tmp_path / "models/model")
    log = tmp_path / "train.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "leukemia_mlops.cli.train", "--params", "params.yaml"],
            cwd=tmp_path,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        logged = stop_after_epochs(process, files, tmp_path / "mlruns", 2, log)
    finally:
        process.kill()
        process.wait()
    assert len(logged) == 2  # killed in the third of four epochs, as intended
    state = json.loads(files.state.read_text())
    assert state["status"] == "running" and not files.metrics.exists()

    resumed = train(tmp_path / "params.yaml", tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restoring states from the checkpoint" in resumed.stderr
    after = json.loads(files.state.read_text())
    assert after["mlflow_run_id"] == state["mlflow_run_id"] and after["status"] == "finished"
    points = histories(tmp_path / "mlruns", state["mlflow_run_id"])
    steps = [step for step, _ in points[MONITOR]]
    assert len(steps) == 4 and steps[:2] == logged  # epochs 3 and 4 came from the resume

    # The same config, never interrupted, in a directory of its own.
    reference = tmp_path / "reference"
    reference.mkdir()
    cfg.paths.models_dir = str(reference / "models")
    cfg.paths.mlruns_dir = str(reference / "mlruns")
    write_params(cfg, reference / "params.yaml")
    uninterrupted = train(reference / "params.yaml", reference)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    theirs = RunFiles(reference / "models/model")
    assert_same_weights(files.last_checkpoint, theirs.last_checkpoint)
    assert_same_weights(files.best_checkpoint, theirs.best_checkpoint)
    reference_id = json.loads(theirs.state.read_text())["mlflow_run_id"]
    assert histories(reference / "mlruns", reference_id) == points  # no step lost or repeated
