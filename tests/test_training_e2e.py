"""End-to-end training through the command lines: 2-process CPU DDP, kill and resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from leukemia_mlops.config import write_params
from leukemia_mlops.tracking.store import tracking_uri

pytestmark = pytest.mark.slow


def test_ddp_over_two_cpu_processes(tiny_prepared, tmp_path):
    overrides = [
        "trainer=ddp_cpu",
        f"paths.prepared_dir={tiny_prepared}",
        f"paths.mlruns_dir={tmp_path / 'mlruns'}",
        "data.prepare.image_size=48",
        "trainer.max_epochs=2",
        "trainer.enable_progress_bar=false",
        "datamodule.batch_size=8",
        "datamodule.num_workers=0",
        "logger.mlflow.log_model=false",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "leukemia_mlops.train", *overrides],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "distributed_backend=gloo" in result.stderr + result.stdout
    run = json.loads((tmp_path / "run/run.json").read_text())
    assert run["status"] == "finished"
    client = MlflowClient(tracking_uri(None, tmp_path / "mlruns"))
    history = client.get_metric_history(run["mlflow_run_id"], "val/f1_weighted")
    assert len(history) == 2
    runs = client.search_runs([client.get_run(run["mlflow_run_id"]).info.experiment_id])
    assert len(runs) == 1  # only rank 0 logs


def _wait_for_epoch(run_dir: Path, epoch: int, process: subprocess.Popen, timeout: float) -> None:
    """Wait until ``last.ckpt`` holds at least ``epoch`` finished epochs."""
    history = run_dir / "checkpoints/last.ckpt"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "training ended before it could be killed"
        if history.is_file():
            import torch

            try:
                state = torch.load(history, map_location="cpu", weights_only=True)
            except (RuntimeError, EOFError):
                state = {}
            if state.get("epoch", -1) + 1 >= epoch:
                return
        time.sleep(0.5)
    raise AssertionError("no checkpoint in time")


def test_killed_run_resumes_into_the_same_mlflow_run(tiny_prepared, tiny_config, tmp_path):
    cfg = tiny_config("trainer.max_epochs=4", "callbacks.early_stopping.patience=10")
    params = tmp_path / "params.yaml"
    write_params(cfg, params)
    command = [sys.executable, "-m", "leukemia_mlops.cli.train", "--params", str(params)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    run_dir = tmp_path / "models/cnn"

    process = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    _wait_for_epoch(run_dir, 2, process, timeout=300)
    process.send_signal(signal.SIGKILL)
    process.wait()
    first_id = json.loads((run_dir / "run.json").read_text())["mlflow_run_id"]
    assert json.loads((run_dir / "run.json").read_text())["status"] == "running"

    resumed = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    state = json.loads((run_dir / "run.json").read_text())
    assert state["mlflow_run_id"] == first_id and state["status"] == "finished"
    assert "Restoring states from the checkpoint" in resumed.stderr
    client = MlflowClient(tracking_uri(None, tmp_path / "mlruns"))
    for key in ("val/f1_weighted", "train/loss", "val/loss"):
        steps = [m.step for m in client.get_metric_history(first_id, key)]
        assert len(steps) == 4 and len(set(steps)) == 4, (key, steps)
    assert len(client.search_runs([client.get_run(first_id).info.experiment_id])) == 1
