"""Which model each pipeline stage trains or tunes: `model` is the CNN, `detector` the YOLO."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from leukemia_mlops.cli.sweep import search_space
from leukemia_mlops.config import compose, stage_outs, write_params

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
    assert stage_outs("train", REPO / "dvc.yaml")[:2] == ["models/cnn", "reports/train_cnn.json"]


def test_the_train_stage_refuses_a_model_it_does_not_write(tmp_path):
    """`dvc exp run -S model=yolov3_tiny` would train into models/yolo, another stage's output:
    one clear line before any training, and nothing written."""
    (tmp_path / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())
    (tmp_path / "best.yaml").write_text("tuned: false\n")
    write_params(compose(["model=yolov3_tiny"]), tmp_path / "params.yaml")
    command = [sys.executable, "-m", "leukemia_mlops.cli.train", "--best-params", "best.yaml"]
    env = {**os.environ, "DVC_STAGE": "train"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the train stage writes models/cnn, ")
    assert "not models/yolo" in last and "model@detector" in last
    assert not (tmp_path / "models").exists()
