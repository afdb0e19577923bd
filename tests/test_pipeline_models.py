"""Which model each pipeline stage trains or tunes: `model` (either family) and `detector`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import DictConfig

from leukemia_mlops.cli.sweep import search_space
from leukemia_mlops.config import compose, stage_outs, write_params
from leukemia_mlops.inference.loading import checkpoint_class
from leukemia_mlops.models.detector import YoloDetector

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("overrides", "space"),
    [
        ([], "cnn_optuna"),
        (["model=efficientnet_b0"], "cnn_optuna"),
        (["model=yolov3_tiny"], "yolo_optuna"),
        (["model=yolov3_tiny", "sweep.hparams_search=cnn_optuna"], "cnn_optuna"),
    ],
)
def test_the_sweep_searches_the_space_of_the_model_it_tunes(overrides, space):
    assert search_space(compose(overrides)) == space


def test_stage_outs_name_each_output_once():
    outs = stage_outs("train", REPO / "dvc.yaml")
    assert outs[:2] == ["models/model", "reports/train_model.json"]


def train_stage(params: DictConfig, workdir: Path) -> subprocess.CompletedProcess:
    """The DVC train stage's command on ``params``, as ``dvc repro`` runs it in ``workdir``."""
    (workdir / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())
    (workdir / "best.yaml").write_text("tuned: false\n")
    write_params(params, workdir / "params.yaml")
    command = [sys.executable, "-m", "leukemia_mlops.cli.train", "--best-params", "best.yaml"]
    env = {**os.environ, "DVC_STAGE": "train"}
    return subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True)


def test_the_train_stage_trains_a_yolo_model_as_a_hydra_run_does(tiny_config, tmp_path):
    """`dvc exp run -S model=yolov3_tiny`: the one `model` key holds a YOLO, and the train
    stage trains it into its own output, models/model, as for any CNN."""
    params = tiny_config(
        "model=yolov3_tiny",
        "model.img_size=64",
        "model.width_mult=0.25",
        "model.scenes.train_scenes=4",
        "model.scenes.val_scenes=2",
        "trainer.max_epochs=1",
        "paths.models_dir=models",
        "paths.reports_dir=reports",
    )
    done = train_stage(params, tmp_path)
    assert done.returncode == 0, done.stderr
    assert checkpoint_class(tmp_path / "models/model/checkpoints/best.ckpt") is YoloDetector
    metrics = json.loads((tmp_path / "reports/train_model.json").read_text())
    assert {"val_map_50", "val_f1_weighted"} <= set(metrics)


def test_the_train_stage_refuses_to_write_outside_its_output(tmp_path):
    """Another `paths.models_dir` would train where DVC does not look: one clear line before
    any training, and nothing written."""
    done = train_stage(compose(["paths.models_dir=elsewhere"]), tmp_path)
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the train stage writes models/model, ")
    assert "not elsewhere/model" in last and "paths.models_dir" in last
    assert not (tmp_path / "elsewhere").exists()
