"""End-to-end training through the command lines: 2-process CPU DDP, kill and resume."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
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


def _train(params: Path, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "leukemia_mlops.cli.train", "--params", str(params)]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)


def test_the_train_stage_under_ddp_leaves_complete_outputs(tiny_config, tmp_path):
    # Lightning runs the stage command once more for rank 1: only rank 0 may write.
    cfg = tiny_config("trainer=ddp_cpu", "trainer.max_epochs=1", "datamodule.batch_size=8")
    write_params(cfg, tmp_path / "params.yaml")
    result = _train(tmp_path / "params.yaml", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "distributed_backend=gloo" in result.stderr + result.stdout
    run_dir, reports = tmp_path / "models/model", tmp_path / "reports"
    state = json.loads((run_dir / "run.json").read_text())
    assert state["status"] == "finished"
    assert (reports / "train_model.json").read_text() == (run_dir / "metrics.json").read_text()
    history = (reports / "train_model_history.csv").read_text()
    assert history == (run_dir / "history.csv").read_text() and len(history.splitlines()) == 2
    assert not [p.name for p in (*run_dir.iterdir(), *reports.iterdir()) if p.name.startswith(".")]
    client = MlflowClient(tracking_uri(None, tmp_path / "mlruns"))
    run = client.get_run(state["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert len(client.get_metric_history(run.info.run_id, "val/f1_weighted")) == 1
    assert len(client.search_runs([run.info.experiment_id])) == 1

    # The evaluate stage after it, with the same DDP trainer config: one process scores each
    # test cell once and logs into the DDP run.
    evaluate = [sys.executable, "-m", "leukemia_mlops.cli.evaluate", "--params", "params.yaml"]
    result = subprocess.run(
        [*evaluate, "evaluate.n_resamples=20", "evaluate.tta=false"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((reports / "eval/model/metrics.json").read_text())
    manifest = pd.read_parquet(cfg.paths.prepared_dir + "/manifest.parquet")
    assert metrics["counts"]["test_cells"] == int((manifest["split"] == "test").sum())
    assert "test/f1_weighted" in client.get_run(run.info.run_id).data.metrics


def test_torchrun_ranks_share_rank_zeros_run_directory_and_resume(tiny_prepared, tmp_path):
    # torchrun starts every rank at once and each resolves its own Hydra run directory (here
    # run_<RANK>, as two ${now} seconds would): only rank 0's is made, read and written.
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [
        str(torchrun),
        "--nproc-per-node=2",
        "-m",
        "leukemia_mlops.train",
        "trainer=ddp_cpu",
        f"paths.prepared_dir={tiny_prepared}",
        f"paths.mlruns_dir={tmp_path / 'mlruns'}",
        "data.prepare.image_size=48",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        "datamodule.batch_size=8",
        "datamodule.num_workers=0",
        "logger.mlflow.log_model=false",
        "hydra.run.dir=run_${oc.env:RANK}",
    ]
    for attempt in ("fresh", "resumed"):
        result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, (attempt, result.stderr[-3000:])
        state = json.loads((tmp_path / "run_0/run.json").read_text())
        assert state["status"] == "finished"
        assert not (tmp_path / "run_1").exists()  # rank 1 writes no Hydra directory of its own
        # Mark the run unfinished: every rank must resume from rank 0's last.ckpt alike.
        state["status"] = "running"
        (tmp_path / "run_0/run.json").write_text(json.dumps(state))
    assert "Restoring states from the checkpoint" in result.stderr + result.stdout
