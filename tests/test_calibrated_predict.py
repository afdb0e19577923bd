"""The temperature and the conformal quantiles travel with the threshold (metrics.json, ONNX
metadata, MLflow metrics), and ``predict`` writes calibrated P(ALL), the conformal set of each
cell and, from C-NMC names, one row per subject."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
from conftest import TINY_SIZE as SIZE
from mlflow import MlflowClient
from omegaconf import OmegaConf

from leukemia_mlops.cli import export as export_cli
from leukemia_mlops.cli import predict as predict_cli
from leukemia_mlops.data.prepare import MANIFEST_FILE
from leukemia_mlops.evaluation.evaluate import EvaluateSpec, evaluate_model, log_evaluation
from leukemia_mlops.inference.calibrated import (
    calibrate,
    calibrated_threshold,
    prediction_sets,
    set_names,
)
from leukemia_mlops.inference.loading import (
    ONNX_QUANTILE_KEYS,
    ONNX_TEMPERATURE_KEY,
    evaluation_decision,
    load_module,
    validated_decision,
)
from leukemia_mlops.inference.predict import VALIDATION, Threshold, predict_paths
from leukemia_mlops.tracking.model_logging import log_classifier


@pytest.fixture(scope="module")
def report(tiny_checkpoint, tiny_prepared, tmp_path_factory) -> tuple[Path, dict]:
    """The tiny checkpoint's evaluation: its metrics.json and content."""
    out = tmp_path_factory.mktemp("calibrated_eval")
    spec = EvaluateSpec(n_resamples=2, min_subjects=2, tta=False, seed=0, batch_size=64)
    metrics = evaluate_model(tiny_checkpoint, tiny_prepared, out, spec)
    return out / "metrics.json", metrics


@pytest.fixture(scope="module")
def named_cells(tiny_raw, tiny_prepared, tmp_path_factory) -> Path:
    """Validation-split files under their C-NMC training names, which carry subject and label
    (the test split's come from the numbered prelim-phase files, whose names carry neither)."""
    folder = tmp_path_factory.mktemp("named")
    manifest = pd.read_parquet(tiny_prepared / MANIFEST_FILE)
    for path in manifest.loc[manifest["split"] == "val", "path"]:
        shutil.copyfile(tiny_raw / path, folder / Path(path).name)
    return folder


def test_predict_writes_calibrated_probabilities_and_conformal_sets(
    report, tiny_checkpoint, named_cells, tmp_path
):
    path, metrics = report
    temperature, threshold = metrics["temperature"], metrics["threshold"]
    raw = predict_paths(
        tiny_checkpoint,
        [named_cells],
        tmp_path / "raw.csv",
        image_size=SIZE,
        threshold=Threshold(threshold, VALIDATION),  # a bare validated threshold: raw P(ALL)
    )
    out = predict_paths(
        tiny_checkpoint, [named_cells], tmp_path / "p.csv", image_size=SIZE, evaluation=path
    )
    assert not raw["calibrated"].any() and (raw["conformal_set"] == "").all()
    assert out["calibrated"].all() and (out["threshold_source"] == VALIDATION).all()
    np.testing.assert_allclose(out["prob_all"], calibrate(raw["prob_all"], temperature))
    assert out["threshold"].iloc[0] == pytest.approx(calibrated_threshold(threshold, temperature))
    assert (out["label"] == raw["label"]).all()  # monotone: the same calls
    quantiles = metrics["conformal"]["quantile"]
    expected = set_names(prediction_sets(out["prob_all"].to_numpy(), quantiles))
    assert out["conformal_set"].tolist() == expected
    assert set(expected) <= {"ALL", "HEM", "ALL+HEM", "none"}


def test_onnx_and_mlflow_models_carry_the_calibration(
    report, tiny_checkpoint, tiny_prepared, tmp_path
):
    path, metrics = report
    known = evaluation_decision(path, tiny_checkpoint)
    assert known.threshold == metrics["threshold"]
    assert known.calibration.temperature == metrics["temperature"]
    assert known.calibration.quantiles == metrics["conformal"]["quantile"]

    onnx_path = tmp_path / "model.onnx"
    argv = ["--checkpoint", str(tiny_checkpoint), "--out", str(onnx_path), "--metrics", str(path)]
    export_cli.main([*argv, "--image-size", str(SIZE), "--params", str(tmp_path / "no.yaml")])
    props = {p.key: p.value for p in onnx.load(onnx_path).metadata_props}
    assert float(props[ONNX_TEMPERATURE_KEY]) == metrics["temperature"]
    assert set(ONNX_QUANTILE_KEYS.values()) <= set(props)
    assert validated_decision(onnx_path) == known

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("t")).info.run_id
    log_classifier(uri, run_id, load_module(tiny_checkpoint).net, SIZE)
    (tmp_path / "eval").mkdir()
    log_evaluation(uri, run_id, metrics, tmp_path / "eval")
    assert client.get_run(run_id).data.metrics["eval/temperature"] == metrics["temperature"]
    assert validated_decision(f"runs:/{run_id}/model", tracking_uri=uri) == known


def test_predict_by_subject_diagnoses_each_named_subject(
    report, tiny_checkpoint, named_cells, tmp_path, capsys
):
    path, metrics = report
    params = tmp_path / "params.yaml"
    prepare = {"image_size": SIZE, "window": 450, "fit": "window"}
    paths = {"reports_dir": str(tmp_path / "reports"), "mlruns_dir": str(tmp_path / "mlruns")}
    OmegaConf.save(OmegaConf.create({"data": {"prepare": prepare}, "paths": paths}), params)
    unnamed = tmp_path / "unnamed"  # a cell under another name and a stray file: left out
    unnamed.mkdir()
    shutil.copyfile(next(named_cells.iterdir()), unnamed / "cell.bmp")
    (unnamed / "notes.txt").write_text("a stray note\n")
    out = tmp_path / "p.csv"
    argv = [str(tiny_checkpoint), str(named_cells), str(unnamed), "--out", str(out)]
    predict_cli.main([*argv, "--params", str(params), "--metrics", str(path), "--by-subject"])
    assert "diagnosed at the validated patient threshold" in capsys.readouterr().out
    subjects = pd.read_csv(tmp_path / "p_subjects.csv")
    expected = pd.read_csv(path.parent / "subjects.csv").query("split == 'val'")
    assert sorted(subjects["subject"].astype(str)) == sorted(expected["subject"].astype(str))
    merged = subjects.merge(expected.astype({"subject": str}), on="subject")
    np.testing.assert_allclose(merged["score_x"], merged["score_y"], atol=1e-5)
    called = np.where(merged["prediction"] == 1, "ALL", "HEM")
    assert (merged["diagnosis"] == called).all()
    assert (subjects["threshold"] == metrics["patient"]["threshold"]).all()

    with pytest.raises(SystemExit) as exit_info:
        predict_cli.main(
            [str(tiny_checkpoint), str(unnamed), "--params", str(params), "--by-subject"]
        )
    assert exit_info.value.code == 2
    assert "no file name carries a subject" in capsys.readouterr().err
