"""Evaluation of a trained checkpoint on the tiny prepare cache: real model, files and MLflow."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
from conftest import TINY_SIZE
from mlflow import MlflowClient
from omegaconf import OmegaConf
from PIL import Image
from quiet_trainer import quiet_trainer

from leukemia_mlops.cli import compare as compare_cli
from leukemia_mlops.cli import evaluate as evaluate_cli
from leukemia_mlops.config import build_spec, compose
from leukemia_mlops.data.detection import DetectionDataModule
from leukemia_mlops.data.identity import IDENTITY_FILE, read_identity
from leukemia_mlops.data.prepare import IMAGES_FILE, MANIFEST_FILE, PrepareSpec, prepare_dataset
from leukemia_mlops.data.scenes import SceneSpec
from leukemia_mlops.data.splits import SplitSpec
from leukemia_mlops.evaluation.bootstrap import INTERVAL_KEYS, bootstrap_ci
from leukemia_mlops.evaluation.compare import (
    KEY_METRICS,
    SELECTION_METRIC,
    THROUGHPUT_METRIC,
    champion,
    compare_runs,
    higher_is_better,
    write_comparison,
)
from leukemia_mlops.evaluation.detection import subject_scenes
from leukemia_mlops.evaluation.evaluate import (
    EvaluateSpec,
    evaluate_model,
    gallery_rows,
    log_evaluation,
    mlflow_metrics,
)
from leukemia_mlops.evaluation.gradcam import gradcam, last_conv_block
from leukemia_mlops.evaluation.metrics import BinaryMetrics, binary_metrics
from leukemia_mlops.evaluation.paired import NO_DIFFERENCE
from leukemia_mlops.evaluation.ranking_guard import INVERTED
from leukemia_mlops.inference.calibrated import calibrate
from leukemia_mlops.inference.loading import load_module
from leukemia_mlops.inference.predict import predict_paths
from leukemia_mlops.inference.scorers import TorchScorer, dihedral_views, to_network_input
from leukemia_mlops.models.backbones import build_classifier
from leukemia_mlops.models.detector import YoloDetector, cell_probability
from leukemia_mlops.tracking.datasets import log_data_inputs
from leukemia_mlops.tracking.model_logging import log_classifier
from leukemia_mlops.tracking.registry import REGISTERED_NAME, champion_alias, register_best
from leukemia_mlops.tracking.run_files import PIPELINE_MODELS
from leukemia_mlops.tracking.store import ensure_experiment, local_store_uri

EXPERIMENT = "leukemia-test"
METRICS = tuple(binary_metrics([0.2, 0.8], [0, 1]))
FILES = (
    "metrics.json",
    "predictions.csv",
    "subjects.csv",
    "subjects.png",
    "confusion_matrix.png",
    "roc.png",
    "pr.png",
    "reliability.png",
    "roc.csv",
    "pr.csv",
    "reliability.csv",
    "gallery.png",
)
YOLO_SIZE = 64  # the detector's input side (a multiple of 32), also its cache's side


class Evaluated(NamedTuple):
    metrics: dict
    out_dir: Path
    uri: str
    run_id: str


def evaluate_spec(**changes: Any) -> EvaluateSpec:
    """The stage's spec as ``conf/`` composes it, with test-sized changes."""
    return dataclasses.replace(build_spec(EvaluateSpec, compose().evaluate, "evaluate"), **changes)


def sqlite_store(root: Path) -> tuple[str, str]:
    """A fresh local MLflow store: its URI and the id of the test experiment."""
    uri = f"sqlite:///{root / 'mlflow.db'}"
    return uri, ensure_experiment(uri, EXPERIMENT, root)


@pytest.fixture(scope="module")
def evaluated(tiny_prepared, tiny_checkpoint, tmp_path_factory) -> Evaluated:
    root = tmp_path_factory.mktemp("evaluate")
    uri, experiment_id = sqlite_store(root)
    tags = {"family": "cnn", "backbone": "resnet18"}
    run_id = MlflowClient(uri).create_run(experiment_id, tags=tags).info.run_id
    out_dir = root / "eval"
    # The tiny test split has 2 subjects per class: allow intervals so that they get checked.
    metrics = evaluate_model(
        tiny_checkpoint,
        tiny_prepared,
        out_dir,
        evaluate_spec(n_resamples=50, tta=True, min_subjects=2),
        mlflow_run_id=run_id,
        mlflow_uri=uri,
    )
    return Evaluated(metrics, out_dir, uri, run_id)


@pytest.fixture(scope="module")
def yolo_prepared(tiny_raw, tmp_path_factory) -> Path:
    """The tiny dataset cached at the detector's input side, as the pipeline caches it."""
    out = tmp_path_factory.mktemp("yolo_prepared") / "prepared"
    spec = PrepareSpec(image_size=YOLO_SIZE, workers=1)
    prepare_dataset(tiny_raw, out, spec, SplitSpec(), progress=False, source="synthetic")
    return out


@pytest.fixture(scope="module")
def yolo_checkpoint(yolo_prepared, tmp_path_factory) -> Path:
    """A quarter-width YOLOv3-tiny trained for one epoch on the tiny cache (poor, but real)."""
    path = tmp_path_factory.mktemp("yolo_checkpoint") / "yolo.ckpt"
    pl.seed_everything(0)
    module = YoloDetector(img_size=YOLO_SIZE, width_mult=0.25, channels_last=False)
    datamodule = DetectionDataModule(
        str(yolo_prepared), YOLO_SIZE, batch_size=16, num_workers=0, train_scenes=4, val_scenes=2
    )
    trainer = quiet_trainer(
        max_epochs=1,
    )
    trainer.fit(module, datamodule=datamodule)
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def yolo_evaluated(evaluated, yolo_prepared, yolo_checkpoint, tmp_path_factory) -> Evaluated:
    """The detector evaluated like the CNN, logged into its own run of the same store."""
    client = MlflowClient(evaluated.uri)
    experiment_id = client.get_run(evaluated.run_id).info.experiment_id
    tags = {"family": "yolo", "backbone": "yolov3_tiny"}
    run_id = client.create_run(experiment_id, tags=tags).info.run_id
    out_dir = tmp_path_factory.mktemp("yolo_eval") / "yolo"
    metrics = evaluate_model(
        yolo_checkpoint,
        yolo_prepared,
        out_dir,
        evaluate_spec(n_resamples=50, tta=True, min_subjects=2, scenes_per_subject=2),
        mlflow_run_id=run_id,
        mlflow_uri=evaluated.uri,
    )
    return Evaluated(metrics, out_dir, evaluated.uri, run_id)


def test_metrics_json_holds_every_section(evaluated, tiny_prepared):
    on_disk = json.loads(
        (evaluated.out_dir / "metrics.json").read_text(), parse_constant=pytest.fail
    )
    assert on_disk == evaluated.metrics
    assert 0 <= on_disk["threshold"] <= 1
    for section in ("test", "test_default"):
        expected = {f"{m}_{part}" for m in METRICS for part in INTERVAL_KEYS} | set(METRICS)
        assert set(on_disk[section]) == expected
        for metric in METRICS:  # every interval beside its count of valid resamples
            assert 0 < on_disk[section][f"{metric}_n_valid"] <= 50, metric
    assert set(on_disk["val_selection"]) == set(METRICS)
    assert "selection" in on_disk["roles"]["val_selection"]
    assert "estimate" in on_disk["roles"]["test"]
    calibration, conformal = on_disk["calibration"], on_disk["conformal"]
    assert calibration["temperature"] == on_disk["temperature"] > 0
    assert calibration["fitted_on"] == conformal["fitted_on"] == "validation"
    for part in ("before", "after"):
        assert {"top_label_ece", "brier", "brier_bca_low", "top_label_ece_bca_high"} <= set(
            calibration[part]
        )
    assert calibration["before"]["top_label_ece"] == on_disk["test"]["top_label_ece"]
    assert conformal["alpha"] == 0.1 and set(conformal["quantile"]) == {"ALL", "HEM"}
    for name in ("coverage_ALL", "coverage_HEM", "abstention_rate"):
        assert 0 <= conformal[name] <= 1 and conformal[f"{name}_bca_low"] is not None
    patient = on_disk["patient"]
    assert (patient["n_all_subjects"], patient["n_hem_subjects"]) == (2, 2)
    assert patient["rule"] == "mean_log_odds" and patient["interval"].startswith("Clopper")
    assert patient["sensitivity_low"] <= patient["sensitivity"] <= patient["sensitivity_high"]
    ood = on_disk["ood"]
    assert ood["flagged"] == 0 and ood["test_cells"] == on_disk["counts"]["test_cells"]
    assert on_disk["bootstrap"]["test_subjects"] == {"HEM": 2, "ALL": 2}
    assert on_disk["bootstrap"]["intervals"] == "percentile and BCa"
    # What the scores were computed with: fp32 on this CPU, and the libraries' versions.
    scoring = on_disk["scoring"]
    assert (scoring["device"], scoring["precision"]) == ("cpu", "32-true")
    assert scoring["versions"]["torch"] == version("torch")
    assert set(scoring["versions"]) >= {"torchmetrics", "numpy", "leukemia-mlops"}
    tta = on_disk["tta"]
    assert set(tta) == {
        "threshold", "temperature", "val_selection", "test", "test_default",
        "calibration", "conformal", "patient",
    }  # fmt: skip
    assert set(tta["test"]) == set(on_disk["test"])
    manifest = pd.read_parquet(tiny_prepared / MANIFEST_FILE)
    for split in ("val", "test"):
        rows = manifest[manifest["split"] == split]
        assert on_disk["counts"][f"{split}_cells"] == len(rows)
        assert on_disk["counts"][f"{split}_subjects"] == rows["subject"].nunique()


def test_intervals_contain_their_point_estimates(evaluated):
    """Percentile and BCa (or BC) intervals hold their point, and are the stratified subject
    bootstrap of the test cells in ``predictions.csv``: not a cell bootstrap, not ``(0, 1)``."""
    cells = pd.read_csv(evaluated.out_dir / "predictions.csv")
    cells = cells[cells["split"] == "test"]
    thresholds = {"test": evaluated.metrics["threshold"], "test_default": 0.5}
    spec = evaluate_spec(n_resamples=50, min_subjects=2)
    widths = []
    for name, threshold in thresholds.items():
        section = evaluated.metrics[name]
        expected = bootstrap_ci(
            cells["prob_all"].to_numpy(),
            cells["label"].to_numpy(),
            cells["subject"].astype(str).to_numpy(),
            BinaryMetrics(threshold),
            **spec.bootstrap(),
        )
        for metric in ("accuracy", "f1_weighted", "sensitivity", "specificity"):
            ci = expected[metric]
            adjusted = ci.adjusted
            point, low, high, adj_low, adj_high = (
                section[metric + suffix]
                for suffix in ("", "_pct_low", "_pct_high", f"_{adjusted}_low", f"_{adjusted}_high")
            )
            assert low <= point <= high, metric
            assert adj_low <= point <= adj_high, metric
            assert (point, low, high, adj_low, adj_high) == pytest.approx(
                (ci.point, ci.pct_low, ci.pct_high, ci.bca_low, ci.bca_high), abs=1e-6
            ), metric
            widths.append(high - low)
    assert min(widths) < 1  # not the whole (0, 1) range everywhere


def test_too_few_subjects_gives_no_interval_and_says_so(tiny_prepared, tiny_checkpoint, tmp_path):
    spec = evaluate_spec(n_resamples=5, tta=False)
    assert spec.min_subjects > 2  # conf's rule, stricter than the tiny split's 2 per class
    metrics = evaluate_model(tiny_checkpoint, tiny_prepared, tmp_path, spec)
    report = metrics["bootstrap"]["intervals"]
    assert (
        report
        == f"none, too few subjects: 2 HEM and 2 ALL, fewer than {spec.min_subjects} per class"
    )
    for metric in METRICS:
        assert metrics["test"][f"{metric}_n_valid"] == 0
        assert (
            metrics["test"][f"{metric}_pct_low"] is None
            and metrics["test"][f"{metric}_bca_high"] is None
        )
    assert metrics["test"]["accuracy"] is not None


def test_report_files_are_written(evaluated, tiny_prepared):
    out = evaluated.out_dir
    assert {p.name for p in out.iterdir()} == set(FILES)
    for name in FILES:
        if name.endswith(".png"):
            with Image.open(out / name) as image:
                assert image.format == "PNG"
    for name in ("roc.csv", "pr.csv", "reliability.csv"):
        table = pd.read_csv(out / name)
        assert len(table) > 0 and not table.isna().any().any(), name

    predictions = pd.read_csv(out / "predictions.csv")
    assert list(predictions.columns) == [
        "path", "subject", "split", "label", "prob_all", "pred", "prob_all_tta", "pred_tta",
    ]  # fmt: skip
    manifest = pd.read_parquet(tiny_prepared / MANIFEST_FILE)
    assert len(predictions) == manifest["split"].isin(["val", "test"]).sum()
    threshold = evaluated.metrics["threshold"]
    assert (predictions["pred"] == (predictions["prob_all"] > threshold)).all()
    test = predictions[predictions["split"] == "test"]
    accuracy = (test["pred"] == test["label"]).mean()
    assert accuracy == pytest.approx(evaluated.metrics["test"]["accuracy"])

    subjects = pd.read_csv(out / "subjects.csv")
    tested = subjects[subjects["split"] == "test"]
    assert set(tested["subject"].astype(str)) == set(test["subject"].astype(str))
    assert list(subjects.columns) == ["subject", "split", "label", "n_cells", "score", "prediction"]
    patient = evaluated.metrics["patient"]
    assert (subjects["prediction"] == (subjects["score"] > patient["threshold"])).all()
    assert patient["sensitivity"] == (tested.loc[tested["label"] == 1, "prediction"] == 1).mean()


def test_threshold_is_chosen_on_validation_only(
    evaluated, tiny_prepared, tiny_checkpoint, tmp_path
):
    """Flipping every test label moves every test metric but leaves the threshold alone, and
    the temperature, the conformal quantiles and the patient threshold too."""
    flipped = tmp_path / "prepared"
    flipped.mkdir()
    for name in (IMAGES_FILE, IDENTITY_FILE):  # the identity: the window the OOD rule uses
        shutil.copyfile(tiny_prepared / name, flipped / name)
    manifest = pd.read_parquet(tiny_prepared / MANIFEST_FILE)
    is_test = manifest["split"] == "test"
    manifest.loc[is_test, "label"] = 1 - manifest.loc[is_test, "label"]
    manifest.to_parquet(flipped / MANIFEST_FILE, index=False)

    metrics = evaluate_model(
        tiny_checkpoint, flipped, tmp_path / "eval", evaluate_spec(n_resamples=5)
    )
    for section in ("threshold", "temperature", "val_selection"):
        assert metrics[section] == evaluated.metrics[section], section
    assert metrics["conformal"]["quantile"] == evaluated.metrics["conformal"]["quantile"]
    assert metrics["patient"]["threshold"] == evaluated.metrics["patient"]["threshold"]
    original = evaluated.metrics["test"]["accuracy"]
    assert metrics["test"]["accuracy"] == pytest.approx(1 - original)


def test_mlflow_run_receives_metrics_and_artifacts(evaluated):
    client = MlflowClient(evaluated.uri)
    logged = client.get_run(evaluated.run_id).data.metrics
    expected = mlflow_metrics(evaluated.metrics)
    assert logged.pop(THROUGHPUT_METRIC) > 0  # the speed column of compare, MLflow only
    assert logged == expected
    assert logged["test/f1_weighted"] == evaluated.metrics["test"]["f1_weighted"]
    assert (
        logged["eval/val_selection/f1_weighted"]
        == evaluated.metrics["val_selection"]["f1_weighted"]
    )
    assert logged["test/f1_weighted_n_valid"] == evaluated.metrics["test"]["f1_weighted_n_valid"]
    # The headline of the calibration, the conformal sets, the patient and the OOD rule.
    assert logged["eval/temperature"] == evaluated.metrics["temperature"]
    for key in (
        "calibration/after/top_label_ece", "conformal/coverage_ALL", "conformal/abstention_rate",
        "patient/sensitivity", "patient/specificity_low", "ood/false_alarm_rate",
    ):  # fmt: skip
        assert f"eval/{key}" in logged, key
    artifacts = {Path(a.path).name for a in client.list_artifacts(evaluated.run_id, "evaluation")}
    assert artifacts == set(FILES)


def test_the_detector_is_scored_with_the_classifiers_protocol(evaluated, yolo_evaluated):
    """Same sections, metrics, intervals and TTA as the CNN, plus box mAP on test scenes."""
    cnn, yolo = evaluated.metrics, yolo_evaluated.metrics
    assert set(yolo) == set(cnn) | {"detection"}
    sections = ("val_selection", "test", "test_default", "counts", "tta")
    for section in (*sections, "calibration", "conformal", "patient", "ood"):
        assert set(yolo[section]) == set(cnn[section]), section
    assert yolo["bootstrap"] == cnn["bootstrap"]  # the same test subjects, the same resamples
    assert {p.name for p in yolo_evaluated.out_dir.iterdir()} == set(FILES)
    predictions = pd.read_csv(yolo_evaluated.out_dir / "predictions.csv")
    val = predictions[predictions["split"] == "val"]
    expected = binary_metrics(
        val["prob_all"].to_numpy(), val["label"].to_numpy(), yolo["threshold"]
    )
    selection = {key: math.nan if v is None else v for key, v in yolo["val_selection"].items()}
    assert selection == pytest.approx(expected, nan_ok=True)
    assert (predictions["pred"] == (predictions["prob_all"] > yolo["threshold"])).all()


def test_the_detectors_cell_probability_is_its_validation_score(
    yolo_evaluated, yolo_checkpoint, yolo_prepared
):
    """``prob_all`` of a YOLO model is :func:`cell_probability` of its raw outputs, the
    number its training validates (and picks checkpoints) with."""
    detector = load_module(yolo_checkpoint).eval()
    manifest = pd.read_parquet(yolo_prepared / MANIFEST_FILE)
    rows = manifest.index[manifest["split"] == "test"]
    cache = np.load(yolo_prepared / IMAGES_FILE, mmap_mode="r")
    images = torch.from_numpy(np.asarray(cache[rows])).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        net = detector.net
        expected = cell_probability(
            net(images), net.anchors, net.strides, detector.hparams.conf_threshold
        )
    predictions = pd.read_csv(yolo_evaluated.out_dir / "predictions.csv")
    scored = predictions[predictions["split"] == "test"]["prob_all"].to_numpy()
    np.testing.assert_allclose(scored, expected.numpy(), rtol=0, atol=1e-5)


def test_detection_map_has_subject_intervals(yolo_evaluated, yolo_prepared):
    detection = yolo_evaluated.metrics["detection"]
    manifest = pd.read_parquet(yolo_prepared / MANIFEST_FILE)
    test_subjects = manifest.loc[manifest["split"] == "test", "subject"].nunique()
    assert detection["scenes"] == 2 * test_subjects
    spec = SceneSpec()
    assert spec.min_cells * detection["scenes"] <= detection["boxes"]
    assert detection["boxes"] <= spec.max_cells * detection["scenes"]
    for key in ("map", "map_50"):
        assert 0 <= detection[key] <= 1
        assert detection[f"{key}_pct_low"] <= detection[key] <= detection[f"{key}_pct_high"]
        assert 0 < detection[f"{key}_n_valid"] <= 50
    assert detection["map"] <= detection["map_50"]
    logged = MlflowClient(yolo_evaluated.uri).get_run(yolo_evaluated.run_id).data.metrics
    assert logged["eval/detection/map_50"] == detection["map_50"]


def test_test_scenes_are_composed_per_test_subject(yolo_prepared):
    scenes = subject_scenes(yolo_prepared, YOLO_SIZE, SceneSpec(), 3, seed=0)
    manifest = pd.read_parquet(yolo_prepared / MANIFEST_FILE)
    test = manifest[manifest["split"] == "test"]
    assert sorted(scenes.subjects) == sorted(test["subject"].astype(str).unique())
    assert np.bincount(scenes.scene_subject).tolist() == [3] * len(scenes.subjects)
    for (image, target), owner in zip(scenes.samples, scenes.scene_subject, strict=True):
        assert image.shape == (3, YOLO_SIZE, YOLO_SIZE)
        label = test.loc[test["subject"].astype(str) == scenes.subjects[owner], "label"].iloc[0]
        assert scenes.label_of[owner] == label
        assert (target["labels"] == label).all()  # one subject's cells share its class
    again = subject_scenes(yolo_prepared, YOLO_SIZE, SceneSpec(), 3, seed=0)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(scenes.samples, again.samples, strict=True))


def evaluated_run(
    uri: str, family: str, val_auroc: float, test_f1: float, prepared: Path, digest: str | None
) -> str:
    """A run with hand-made evaluation metrics (``val_auroc``: the selection metric), tested on
    ``prepared``'s test split: its identity, or the data identity ``digest``."""
    client = MlflowClient(uri)
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    tags = {"family": family, "backbone": "resnet18" if family == "cnn" else "yolov3_tiny"}
    run_id = client.create_run(experiment_id, tags=tags).info.run_id
    metrics = {
        "threshold": 0.5,
        "val_selection": {"auroc": val_auroc, "f1_weighted": 0.5},
        "test": {"f1_weighted": test_f1, "auroc": 0.7},
    }
    with tempfile.TemporaryDirectory() as report:
        log_evaluation(uri, run_id, metrics, report)
    manifest = prepared / MANIFEST_FILE
    identity = read_identity(prepared)
    if digest is not None:
        identity = dataclasses.replace(identity, digest=digest)
    log_data_inputs(uri, run_id, manifest, identity, {"test": "test"})
    return run_id


def tiny_model(uri: str, run_id: str) -> None:
    """Log a small network as the run's ``model`` (what training logs when asked to)."""
    net = torch.nn.Sequential(
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 1)
    )
    log_classifier(uri, run_id, net, 8)


def test_comparison_lists_both_families_in_the_same_columns(
    evaluated, yolo_evaluated, tiny_prepared, yolo_prepared, tmp_path
):
    table = compare_runs(evaluated.uri, EXPERIMENT)
    rows = table.set_index("family")
    assert set(rows.index) == {"cnn", "yolo"}
    assert (table["dataset"] == "synthetic-test").all()
    # Each row's data is the cache it was evaluated on: two image sizes here, two identities
    # (the pipeline's one cache puts both families in one group).
    assert rows.loc["cnn", "digest"] == read_identity(tiny_prepared).digest
    assert rows.loc["yolo", "digest"] == read_identity(yolo_prepared).digest
    for family, result in (("cnn", evaluated), ("yolo", yolo_evaluated)):
        assert rows.loc[family, "run_id"] == result.run_id
        expected = mlflow_metrics(result.metrics)
        assert rows.loc[family, THROUGHPUT_METRIC] > 0
        for key in set(KEY_METRICS) - {THROUGHPUT_METRIC}:
            value = rows.loc[family, key]
            assert value == expected.get(key) or (math.isnan(value) and key not in expected)
        assert rows.loc[family, "warning"] == "; ".join(result.metrics["warnings"])
    assert not math.isnan(rows.loc["yolo", "eval/detection/map_50"])
    markdown, csv = write_comparison(table, tmp_path / "comparison.md")
    assert yolo_evaluated.run_id in markdown.read_text()
    written = pd.read_csv(csv).fillna({"warning": ""})  # CSV reads an empty text as NaN
    pd.testing.assert_frame_equal(written, table, check_dtype=False)
    with pytest.raises(ValueError, match="no MLflow experiment"):
        compare_runs(evaluated.uri, "no-such-experiment")
    with pytest.raises(ValueError, match="validation metric"):
        compare_runs(evaluated.uri, EXPERIMENT, "test/f1_weighted")


def test_register_picks_the_champion_of_one_dataset_by_validation(tiny_prepared, tmp_path, capsys):
    params = write_params(tmp_path / "params.yaml", tmp_path, tiny_prepared)
    uri = local_store_uri(tmp_path / "mlruns")
    ensure_experiment(uri, EXPERIMENT, tmp_path / "mlruns")
    by_test = evaluated_run(
        uri, "cnn", val_auroc=0.80, test_f1=0.95, prepared=tiny_prepared, digest=None
    )
    by_val = evaluated_run(
        uri, "yolo", val_auroc=0.90, test_f1=0.70, prepared=tiny_prepared, digest=None
    )
    elsewhere = evaluated_run(uri, "cnn", 0.99, 0.99, tiny_prepared, digest="other-data")
    MlflowClient(uri).set_tag(elsewhere, "backbone", "resnet50")

    out = tmp_path / "comparison.md"
    compare_cli.main(["--params", str(params), "--out", str(out)])
    table = pd.read_csv(out.with_suffix(".csv"), dtype={"digest": str})
    main = table.loc[table["run_id"] == by_val, "digest"].item()
    assert main != "other-data"
    # Grouped by dataset, each group best first by validation: the other dataset's better
    # scores sit in their own group, and the test score never orders a group.
    assert table["run_id"].tolist() in ([by_val, by_test, elsewhere], [elsewhere, by_val, by_test])
    assert champion(table, main)["run_id"] == by_val

    def register(*extra: str) -> str:
        with pytest.raises(SystemExit) as exit_info:
            compare_cli.main(["--params", str(params), "--out", str(out), "--register", *extra])
        assert exit_info.value.code == 2
        return capsys.readouterr().err.splitlines()[-1]

    assert "--dataset" in register()  # two datasets: which one is never guessed
    assert register("--dataset", main) == (
        f"error: run {by_val} has no logged model at runs:/{by_val}/model: "
        "train it with logger.mlflow.log_model=true"
    )
    for run_id in (by_test, by_val):
        tiny_model(uri, run_id)
    # As a user runs it: a fresh process, no MLFLOW_* variable, in a folder of its own.
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    command = [sys.executable, "-m", "leukemia_mlops.cli.compare", "--params", str(params)]
    command += ["--out", str(out), "--register", "--dataset", main]
    done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert list(work.iterdir()) == []  # no stray ./mlflow.db
    registered = MlflowClient(uri).get_model_version_by_alias(REGISTERED_NAME, champion_alias(main))
    assert registered.run_id == by_val
    assert registered.tags["data_identity"] == main
    assert (registered.tags["family"], registered.tags["threshold"]) == ("yolo", "0.5")
    with pytest.raises(ValueError, match="validation metric"):
        champion(compare_runs(uri, EXPERIMENT, "test/f1_weighted"), main)


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v3_large"])
def test_gradcam_maps_every_image(backbone):
    torch.manual_seed(0)
    net = build_classifier(backbone).eval()
    images = torch.rand(2, 3, 32, 32)
    for classes in (None, torch.tensor([1, 0])):
        maps = gradcam(net, images, classes)
        assert maps.shape == (2, 32, 32)
        assert torch.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    assert not last_conv_block(net.backbone)._forward_hooks


class RedVersusGreen(torch.nn.Module):
    """A classifier whose ALL logit is the mean red minus the mean green of the image.

    Its stride-2 "backbone" passes the red and the green channel through as two feature maps;
    the head averages them globally, as a CNN's pooling head does.
    """

    def __init__(self) -> None:
        super().__init__()
        conv = torch.nn.Conv2d(3, 2, kernel_size=2, stride=2, bias=False)
        with torch.no_grad():
            conv.weight.zero_()
            conv.weight[0, 0] = 0.25  # feature 0: red, averaged over 2x2 pixels
            conv.weight[1, 1] = 0.25  # feature 1: green
        self.backbone = torch.nn.Sequential(conv)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.backbone(images).mean(dim=(2, 3))
        return features[:, 0] - features[:, 1]


def test_gradcam_points_at_the_evidence_for_each_class():
    """A red square is the evidence for ALL, a green one for HEM: each map must peak there."""
    image = torch.zeros(1, 3, 32, 32)
    image[0, 0, 4:12, 4:12] = 1.0  # red, top left
    image[0, 1, 20:28, 18:26] = 1.0  # green, bottom right
    red = (slice(4, 12), slice(4, 12))
    green = (slice(20, 28), slice(18, 26))
    for classes, evidence, other in ((None, red, green), (torch.tensor([0]), green, red)):
        cam = gradcam(RedVersusGreen().eval(), image, classes)[0]
        peak = divmod(int(cam.argmax()), 32)
        assert evidence[0].start <= peak[0] < evidence[0].stop, (classes, peak)
        assert evidence[1].start <= peak[1] < evidence[1].stop, (classes, peak)
        inner = tuple(slice(side.start + 1, side.stop - 1) for side in evidence)  # off the edge
        assert cam[inner].min() == pytest.approx(1.0)  # the whole square, at full strength
        assert cam[other].max() == 0.0  # the other class's evidence gets none
        assert cam[:, 28:].max() == 0.0  # nor does the empty background


def test_tta_is_invariant_to_the_symmetries_of_the_square():
    torch.manual_seed(0)
    scorer = TorchScorer(build_classifier("resnet18"), tta=True, device="cpu")
    image = np.random.default_rng(0).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    views = dihedral_views(torch.from_numpy(image).permute(0, 3, 1, 2))
    assert torch.equal(views[0].permute(0, 2, 3, 1), torch.from_numpy(image))
    assert len({view.numpy().tobytes() for view in views}) == 8
    moved = torch.cat(views).permute(0, 2, 3, 1).contiguous().numpy()
    probs = scorer(moved)
    np.testing.assert_allclose(probs, probs[0], rtol=0, atol=1e-6)


def test_gallery_shows_confident_right_then_wrong_calls():
    probs = np.array([0.9, 0.6, 0.1, 0.45, 0.95, 0.2])
    labels = np.array([1, 0, 0, 1, 0, 1])
    assert gallery_rows(probs, labels, 0.5, 2).tolist() == [0, 2, 4, 5]


def test_registered_champion_serves_the_evaluated_model(
    evaluated, tiny_checkpoint, tiny_raw, tiny_prepared, tmp_path
):
    net = load_module(tiny_checkpoint).net
    log_classifier(evaluated.uri, evaluated.run_id, net, TINY_SIZE)
    version = register_best(evaluated.uri, evaluated.run_id, "synthetic0digest")

    client = MlflowClient(evaluated.uri)
    champion = client.get_model_version_by_alias(
        REGISTERED_NAME, champion_alias("synthetic0digest")
    )
    assert (champion.version, champion.run_id) == (version.version, evaluated.run_id)
    tagged = float(champion.tags["test/f1_weighted"])
    assert tagged == evaluated.metrics["test"]["f1_weighted"]

    manifest = pd.read_parquet(tiny_prepared / MANIFEST_FILE)
    rows = manifest.index[manifest["split"] == "test"][:3]
    files = [tiny_raw / path for path in manifest.loc[rows, "path"]]
    table = predict_paths(
        f"models:/{REGISTERED_NAME}@{champion_alias('synthetic0digest')}",
        files,
        tmp_path / "predictions.csv",
        image_size=TINY_SIZE,
        batch_size=3,
        tracking_uri=evaluated.uri,
    )
    cache = np.load(tiny_prepared / IMAGES_FILE, mmap_mode="r")
    raw = TorchScorer(net, device="cpu")(np.asarray(cache[rows]))
    # Calibrated with the temperature its run's evaluation logged (eval/temperature).
    expected = calibrate(raw, evaluated.metrics["temperature"])
    assert table["calibrated"].all()
    np.testing.assert_allclose(table["prob_all"], expected, rtol=0, atol=1e-5)

    experiment_id = client.get_run(evaluated.run_id).info.experiment_id
    unevaluated = client.create_run(experiment_id).info.run_id
    with pytest.raises(ValueError, match="no evaluation metrics"):
        register_best(evaluated.uri, unevaluated, "synthetic0digest")


def write_params(path: Path, root: Path, prepared: Path) -> Path:
    params = {
        "paths": {
            "prepared_dir": str(prepared),
            "models_dir": str(root / "models"),
            "reports_dir": str(root / "reports"),
            "mlruns_dir": str(root / "mlruns"),
        },
        "logger": {"mlflow": {"tracking_uri": None, "experiment_name": EXPERIMENT}},
        "evaluate": {
            **OmegaConf.to_container(compose().evaluate),
            "n_resamples": 5,
            "scenes_per_subject": 1,
        },
    }
    OmegaConf.save(OmegaConf.create(params), path)
    return path


def test_evaluate_stage_scores_each_pipeline_model_of_either_family_into_its_run(
    yolo_prepared, tiny_checkpoint, yolo_checkpoint, tmp_path, capsys
):
    """Each key's model is scored by its own family's protocol, wherever it sits: here the YOLO
    is `model` (as after `dvc exp run -S model=yolov3_tiny`) and the CNN is `detector`."""
    params = write_params(tmp_path / "params.yaml", tmp_path, yolo_prepared)
    uri = local_store_uri(tmp_path / "mlruns")
    experiment_id = ensure_experiment(uri, EXPERIMENT, tmp_path / "mlruns")
    client = MlflowClient(uri)
    run_ids = {}
    families = {"model": "yolo", "detector": "cnn"}
    checkpoints = {"cnn": tiny_checkpoint, "yolo": yolo_checkpoint}
    for key, family in families.items():
        run_dir = tmp_path / "models" / key
        (run_dir / "checkpoints").mkdir(parents=True)
        shutil.copyfile(checkpoints[family], run_dir / "checkpoints/best.ckpt")
        run_ids[key] = client.create_run(experiment_id, tags={"family": family}).info.run_id
        (run_dir / "run.json").write_text(json.dumps({"mlflow_run_id": run_ids[key]}))
    # The detector's test scenes are laid out as its training composed them: one cell each.
    one_cell = {"model": {"scenes": {"min_cells": 1, "max_cells": 1, "noise": 0}}}
    OmegaConf.save(OmegaConf.create(one_cell), tmp_path / "models/model/config.yaml")
    evaluate_cli.main(["--params", str(params)])
    assert PIPELINE_MODELS == ("model", "detector")
    for key, family in families.items():
        metrics = json.loads((tmp_path / f"reports/eval/{key}/metrics.json").read_text())
        assert metrics["bootstrap"]["n_resamples"] == 5
        logged = client.get_run(run_ids[key]).data.metrics
        assert logged.pop(THROUGHPUT_METRIC) > 0
        compared = {k: logged.pop(k) for k in list(logged) if k.startswith("comparison/")}
        assert {"comparison/auroc/point", "comparison/balanced_accuracy/point"} <= set(compared)
        assert logged == mlflow_metrics(metrics), key
        assert ("eval/detection/map" in logged) == (family == "yolo")
    reports = {key: json.loads((tmp_path / f"reports/eval/{key}/metrics.json").read_text())
               for key in families}  # fmt: skip
    detection = reports["model"]["detection"]
    assert detection["boxes"] == detection["scenes"]
    # The headline, DVC's metrics file: `model`'s numbers first, then the detector's, the same
    # whatever the family, rounded, each under its own name.
    shown = json.loads((tmp_path / "reports/metrics.json").read_text())
    assert list(shown) == [
        "f1", "f1_bca_low", "f1_bca_high", "auroc", "det_f1", "det_auroc",
        "det_auroc_bca_low", "d_auroc", "d_auroc_bca_low", "d_auroc_bca_high", "verdict",
    ]  # fmt: skip
    for name, key, number in [("f1", "model", "f1_weighted"), ("det_auroc", "detector", "auroc")]:
        assert shown[name] == round(reports[key]["test"][number], 3)
    # Both models compared on the same test cells: `model` minus `detector`, and its verdict
    # (2 test subjects per class here: no interval, so no difference is shown).
    comparison = json.loads((tmp_path / "reports/model_vs_detector.json").read_text())
    difference = reports["model"]["test"]["auroc"] - reports["detector"]["test"]["auroc"]
    assert comparison["auroc"]["point"] == pytest.approx(difference)
    assert shown["d_auroc"] == round(comparison["auroc"]["point"], 3)
    assert (shown["d_auroc_bca_low"], shown["verdict"]) == (None, NO_DIFFERENCE)
    for key in families:
        tags = client.get_run(run_ids[key]).data.tags
        assert tags["comparison_verdict"] == NO_DIFFERENCE
    assert not (tmp_path / "reports/eval/metrics.json").exists()

    # A model never trained is skipped; no model at all is an error.
    shutil.rmtree(tmp_path / "reports")
    (tmp_path / "models/model/checkpoints/best.ckpt").unlink()
    evaluate_cli.main(["--params", str(params)])
    assert [p.name for p in (tmp_path / "reports/eval").iterdir()] == ["detector"]
    (tmp_path / "models/detector/checkpoints/best.ckpt").unlink()
    with pytest.raises(SystemExit) as exit_info:
        evaluate_cli.main(["--params", str(params)])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("error: no such checkpoint")
    assert "models/model/" in last and "models/detector/" in last


def test_a_scorer_scales_uint8_on_its_device_exactly_as_training_does():
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    scorer = TorchScorer(build_classifier("resnet18"), device="cpu")
    assert torch.equal(scorer.tensor(images), torch.from_numpy(to_network_input(images)))
    assert scorer.autocast is None  # mixed precision only on a GPU
    with pytest.raises(ValueError, match="expected uint8 images"):
        scorer.tensor(images.astype(np.float32))


def test_a_model_ranking_backwards_is_flagged_in_its_report_and_log(
    tiny_prepared, tiny_checkpoint, tmp_path, caplog
):
    """The tiny CNN with its logits negated (its head's weights and bias) ranks every pair of
    cells the other way round; evaluate says so in ``metrics.json`` and the log."""
    checkpoint = torch.load(tiny_checkpoint, weights_only=True)
    head = [key for key in checkpoint["state_dict"] if key.startswith("net.head.")]
    assert head
    for key in head:
        checkpoint["state_dict"][key] = -checkpoint["state_dict"][key]
    negated = tmp_path / "negated.ckpt"
    torch.save(checkpoint, negated)
    spec = evaluate_spec(n_resamples=50, tta=False, min_subjects=2)
    original = evaluate_model(tiny_checkpoint, tiny_prepared, tmp_path / "original", spec)
    with caplog.at_level("WARNING", logger="leukemia_mlops.evaluation.evaluate"):
        flipped = evaluate_model(negated, tiny_prepared, tmp_path / "negated", spec)
    for split in ("val_selection", "test"):
        assert flipped[split]["auroc"] == pytest.approx(1 - original[split]["auroc"])
    assert original["val_selection"]["auroc"] > 0.5  # the premise: the tiny model learned
    assert original["warnings"] == []
    assert flipped["warnings"] and all(INVERTED in w for w in flipped["warnings"])
    assert flipped["warnings"][0].startswith("validation AUROC")
    written = json.loads((tmp_path / "negated/metrics.json").read_text())
    assert written["warnings"] == flipped["warnings"]
    assert INVERTED in caplog.text


def test_compare_ranks_a_lower_is_better_metric_lowest_first(tiny_prepared, tmp_path):
    """Calibration error and loss rank lowest first; AUROC highest first."""
    uri = local_store_uri(tmp_path / "mlruns")
    ensure_experiment(uri, EXPERIMENT, tmp_path / "mlruns")
    calibrated = evaluated_run(uri, "cnn", 0.80, 0.9, tiny_prepared, digest=None)
    sharper = evaluated_run(uri, "cnn", 0.90, 0.9, tiny_prepared, digest=None)
    client = MlflowClient(uri)
    ece = "eval/val_selection/top_label_ece"
    for run_id, value in ((calibrated, 0.02), (sharper, 0.20)):
        client.log_metric(run_id, ece, value)
    for metric, best in [(ece, calibrated), (SELECTION_METRIC, sharper)]:
        table = compare_runs(uri, EXPERIMENT, metric)  # one row: the group's best run
        assert table["run_id"].tolist() == [best], metric
    for lower in ("val/loss", ece, "eval/val_selection/p_all_ece"):
        assert not higher_is_better(lower), lower
    assert higher_is_better("eval/val_selection/auroc")
