"""A family is a class: a third one, defined only in ``tests/third_family.py``, goes through
train, evaluate, compare, predict, ONNX export and ``mlflow models serve`` with no change to
``src/`` (the recipe of ARCHITECTURE.md's "Where a new family goes")."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import TINY_SIZE
from test_serving import post, serving
from third_family import TinyFamily

from leukemia_mlops.evaluation.compare import compare_runs
from leukemia_mlops.evaluation.evaluate import EvaluateSpec, evaluate_model
from leukemia_mlops.inference.export import export_onnx
from leukemia_mlops.inference.intake import ALLOWED_ROOT_ENV
from leukemia_mlops.inference.loading import checkpoint_class, report_decision
from leukemia_mlops.inference.predict import predict_paths
from leukemia_mlops.inference.serving import IMAGE_MODEL, OUTPUT_COLUMNS
from leukemia_mlops.models.base import class_path
from leukemia_mlops.tracking.run_files import RunFiles, store_uri
from leukemia_mlops.training.run import run_training

pytestmark = pytest.mark.slow

#: The ``model`` config of the third family: the CNN's, its class and its own keys swapped in.
THIRD_FAMILY = (
    "model._target_=third_family.TinyFamily",
    "model.family=tiny",
    *(f"~model.{key}" for key in ("backbone", "weights", "dropout", "channels_last")),
    *(f"~model.{key}" for key in ("compile", "compile_mode", "compile_backend")),
    "+model.width=4",
    "model.warmup_epochs=0",
    "model.scheduler=none",
    "trainer.max_epochs=1",
)


def test_a_third_family_needs_no_change_to_src(tiny_config, tiny_prepared, tiny_raw, tmp_path):
    cfg = tiny_config(*THIRD_FAMILY)
    run = RunFiles(tmp_path / "models" / "model")
    run_training(cfg, run.root)
    checkpoint, uri, run_id = run.best_checkpoint, store_uri(cfg), run.mlflow_run_id()
    assert checkpoint_class(checkpoint) is TinyFamily  # the checkpoint names its class

    spec = EvaluateSpec(n_resamples=20, min_subjects=2, tta=True, seed=0, batch_size=64)
    metrics = evaluate_model(
        checkpoint, tiny_prepared, tmp_path / "eval", spec, mlflow_run_id=run_id, mlflow_uri=uri
    )
    assert "detection" not in metrics and (tmp_path / "eval" / "gallery.png").is_file()

    table = compare_runs(uri, cfg.logger.mlflow.experiment_name)
    assert (table["family"].tolist(), table["backbone"].tolist()) == (["tiny"], ["tiny4"])

    images = [next(tiny_raw.rglob(f"*_{kind}.bmp")) for kind in ("all", "hem")]
    evaluation = tmp_path / "eval" / "metrics.json"
    predicted = predict_paths(
        checkpoint, images, tmp_path / "p.csv", image_size=TINY_SIZE, evaluation=evaluation
    )
    assert set(predicted["threshold_source"]) == {"validation"}
    assert "status" not in predicted and not (tmp_path / "p_boxes.csv").exists()

    onnx = tmp_path / "tiny.onnx"
    decision = report_decision(metrics, evaluation)
    report = export_onnx(
        checkpoint,
        onnx,
        TINY_SIZE,
        tiny_prepared,
        threshold=decision.threshold,
        calibration=decision.calibration,
    )
    assert report["module"] == class_path(TinyFamily)
    exported = predict_paths(onnx, images, tmp_path / "o.csv", image_size=TINY_SIZE)
    np.testing.assert_allclose(exported["prob_all"], predicted["prob_all"], atol=1e-5)
    assert exported["threshold"].tolist() == predicted["threshold"].tolist()

    request = {"dataframe_split": {"columns": ["path"], "data": [[str(p)] for p in images]}}
    # Where the family's module lies, and the root the served model may read paths under.
    tests_dir = {"PYTHONPATH": str(Path(__file__).parent), ALLOWED_ROOT_ENV: str(tiny_raw)}
    model = f"runs:/{run_id}/{IMAGE_MODEL}"
    with serving(uri, model, tmp_path / "serve.log", tests_dir) as served:
        answer = pd.DataFrame(post(served.url, request))
    assert list(answer.columns) == list(OUTPUT_COLUMNS)
    np.testing.assert_allclose(answer["prob_all"], predicted["prob_all"], rtol=1e-6)
    assert answer["label"].tolist() == predicted["label"].tolist()
    assert answer["conformal_set"].tolist() == predicted["conformal_set"].tolist()
