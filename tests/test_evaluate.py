"""Evaluation of a trained checkpoint on the tiny prepare cache: real model, files and MLflow."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY_SIZE
from mlflow import MlflowClient
from omegaconf import OmegaConf
from PIL import Image

from leukemia_mlops.cli import evaluate as evaluate_cli
from leukemia_mlops.data.prepare import IMAGES_FILE, MANIFEST_FILE
from leukemia_mlops.evaluation.compare import KEY_METRICS, compare_runs, write_comparison
from leukemia_mlops.evaluation.evaluate import (
    evaluate_model,
    gallery_rows,
    log_evaluation,
    mlflow_metrics,
)
from leukemia_mlops.evaluation.export import register_best
from leukemia_mlops.evaluation.gradcam import gradcam, last_conv_block
from leukemia_mlops.evaluation.metrics import binary_metrics
from leukemia_mlops.evaluation.predict import (
    TorchScorer,
    dihedral_views,
    load_classifier,
    predict_paths,
)
from leukemia_mlops.models.backbones import build_classifier
from leukemia_mlops.tracking.models import log_classifier
from leukemia_mlops.tracking.store import ensure_experiment

EXPERIMENT = "leukemia-test"
METRICS = tuple(binary_metrics([0.2, 0.8], [0, 1]))
FILES = (
    "metrics.json",
    "predictions.csv",
    "subjects.csv",
    "confusion_matrix.png",
    "roc.png",
    "pr.png",
    "reliability.png",
    "roc.csv",
    "pr.csv",
    "reliability.csv",
    "gradcam.png",
)


class Evaluated(NamedTuple):
    metrics: dict
    out_dir: Path
    uri: str
    run_id: str


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
    metrics = evaluate_model(
        tiny_checkpoint,
        tiny_prepared,
        out_dir,
        n_resamples=50,
        tta=True,
        mlflow_run_id=run_id,
        mlflow_uri=uri,
    )
    return Evaluated(metrics, out_dir, uri, run_id)


def test_metrics_json_holds_every_section(evaluated, tiny_prepared):
    on_disk = json.loads(
        (evaluated.out_dir / "metrics.json").read_text(), parse_constant=pytest.fail
    )
    assert on_disk == evaluated.metrics
    assert 0 <= on_disk["threshold"] <= 1
    for section in ("test", "test_default"):
        for metric in METRICS:
            assert {metric, f"{metric}_low", f"{metric}_high"} <= set(on_disk[section])
    assert set(on_disk["val"]) == set(METRICS)
    assert set(on_disk["subject"]) == {"accuracy", "sensitivity", "specificity", "f1_weighted"}
    tta = on_disk["tta"]
    assert set(tta) == {"threshold", "val", "test", "test_default", "subject"}
    assert set(tta["test"]) == set(on_disk["test"])
    manifest = pd.read_parquet(tiny_prepared / MANIFEST_FILE)
    for split in ("val", "test"):
        rows = manifest[manifest["split"] == split]
        assert on_disk["counts"][f"{split}_cells"] == len(rows)
        assert on_disk["counts"][f"{split}_subjects"] == rows["subject"].nunique()


def test_intervals_contain_their_point_estimates(evaluated):
    for section in (evaluated.metrics["test"], evaluated.metrics["test_default"]):
        for metric in METRICS:
            point, low, high = (section[metric + s] for s in ("", "_low", "_high"))
            if low is not None:
                assert low <= point <= high, metric


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
    assert set(subjects["subject"].astype(str)) == set(test["subject"].astype(str))


def test_threshold_is_chosen_on_validation_only(
    evaluated, tiny_prepared, tiny_checkpoint, tmp_path
):
    """Flipping every test label moves every test metric but leaves the threshold alone."""
    flipped = tmp_path / "prepared"
    flipped.mkdir()
    shutil.copyfile(tiny_prepared / IMAGES_FILE, flipped / IMAGES_FILE)
    manifest = pd.read_parquet(tiny_prepared / MANIFEST_FILE)
    is_test = manifest["split"] == "test"
    manifest.loc[is_test, "label"] = 1 - manifest.loc[is_test, "label"]
    manifest.to_parquet(flipped / MANIFEST_FILE, index=False)

    metrics = evaluate_model(tiny_checkpoint, flipped, tmp_path / "eval", n_resamples=5)
    assert metrics["threshold"] == evaluated.metrics["threshold"]
    assert metrics["val"] == evaluated.metrics["val"]
    original = evaluated.metrics["test"]["accuracy"]
    assert metrics["test"]["accuracy"] == pytest.approx(1 - original)


def test_mlflow_run_receives_metrics_and_artifacts(evaluated):
    client = MlflowClient(evaluated.uri)
    logged = client.get_run(evaluated.run_id).data.metrics
    expected = mlflow_metrics(evaluated.metrics)
    assert logged == expected
    assert logged["test/f1_weighted"] == evaluated.metrics["test"]["f1_weighted"]
    assert logged["eval/val/f1_weighted"] == evaluated.metrics["val"]["f1_weighted"]
    artifacts = {Path(a.path).name for a in client.list_artifacts(evaluated.run_id, "evaluation")}
    assert artifacts == set(FILES)


def test_comparison_keeps_the_best_run_per_backbone(evaluated, tmp_path):
    client = MlflowClient(evaluated.uri)
    experiment_id = client.get_run(evaluated.run_id).info.experiment_id
    worse = json.loads(json.dumps(evaluated.metrics))
    worse["test"]["f1_weighted"] = evaluated.metrics["test"]["f1_weighted"] - 0.1
    yolo = {"threshold": 0.5, "test": {"f1_weighted": 0.5, "auroc": 0.6}}
    for tags, metrics in (
        ({"family": "cnn", "backbone": "resnet18"}, worse),
        ({"family": "yolo", "backbone": "darknet53"}, yolo),
    ):
        run_id = client.create_run(experiment_id, tags=tags).info.run_id
        log_evaluation(evaluated.uri, run_id, metrics, evaluated.out_dir)
    client.create_run(experiment_id, tags={"family": "cnn", "backbone": "resnet50"})  # unevaluated

    table = compare_runs(evaluated.uri, EXPERIMENT)
    scores = {
        ("cnn", "resnet18"): evaluated.metrics["test"]["f1_weighted"],
        ("yolo", "darknet53"): 0.5,
    }
    groups = list(zip(table["family"], table["backbone"], strict=True))
    assert groups == sorted(scores, key=scores.get, reverse=True)
    best = table.set_index("backbone").loc["resnet18"]
    assert best["run_id"] == evaluated.run_id
    expected = mlflow_metrics(evaluated.metrics)
    for key in KEY_METRICS:
        assert best[key] == expected[key] or (math.isnan(best[key]) and key not in expected), key
    assert math.isnan(table.set_index("backbone").loc["darknet53", "test/sensitivity"])

    markdown, csv = write_comparison(table, tmp_path / "comparison.md")
    assert evaluated.run_id in markdown.read_text()
    pd.testing.assert_frame_equal(pd.read_csv(csv), table, check_dtype=False)
    with pytest.raises(ValueError, match="no MLflow experiment"):
        compare_runs(evaluated.uri, "no-such-experiment")


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
    net = load_classifier(tiny_checkpoint).net
    log_classifier(evaluated.uri, evaluated.run_id, net, TINY_SIZE)
    version = register_best(evaluated.uri, evaluated.run_id)

    client = MlflowClient(evaluated.uri)
    champion = client.get_model_version_by_alias("leukemia-cnn", "champion")
    assert (champion.version, champion.run_id) == (version.version, evaluated.run_id)
    tagged = float(champion.tags["test/f1_weighted"])
    assert tagged == evaluated.metrics["test"]["f1_weighted"]

    manifest = pd.read_parquet(tiny_prepared / MANIFEST_FILE)
    rows = manifest.index[manifest["split"] == "test"][:3]
    files = [tiny_raw / path for path in manifest.loc[rows, "path"]]
    table = predict_paths(
        "models:/leukemia-cnn@champion",
        files,
        tmp_path / "predictions.csv",
        image_size=TINY_SIZE,
        batch_size=3,
        tracking_uri=evaluated.uri,
    )
    cache = np.load(tiny_prepared / IMAGES_FILE, mmap_mode="r")
    expected = TorchScorer(net, device="cpu")(np.asarray(cache[rows]))
    np.testing.assert_allclose(table["prob_all"], expected, rtol=0, atol=1e-5)

    experiment_id = client.get_run(evaluated.run_id).info.experiment_id
    unevaluated = client.create_run(experiment_id).info.run_id
    with pytest.raises(ValueError, match="no evaluation metrics"):
        register_best(evaluated.uri, unevaluated)


def write_params(path: Path, root: Path, prepared: Path) -> Path:
    params = {
        "paths": {
            "prepared_dir": str(prepared),
            "models_dir": str(root / "models"),
            "reports_dir": str(root / "reports"),
            "mlruns_dir": str(root / "mlruns"),
        },
        "logger": {"mlflow": {"tracking_uri": None}},
        "evaluate": {"n_resamples": 5},
    }
    OmegaConf.save(OmegaConf.create(params), path)
    return path


def test_evaluate_stage_reads_params(tiny_prepared, tiny_checkpoint, tmp_path, capsys):
    params = write_params(tmp_path / "params.yaml", tmp_path, tiny_prepared)
    with pytest.raises(SystemExit) as exit_info:
        evaluate_cli.main(["--params", str(params)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("error: no such checkpoint")

    best = tmp_path / "models/cnn/checkpoints/best.ckpt"
    best.parent.mkdir(parents=True)
    shutil.copyfile(tiny_checkpoint, best)
    evaluate_cli.main(["--params", str(params)])
    metrics = json.loads((tmp_path / "reports/eval/metrics.json").read_text())
    assert metrics["bootstrap"]["n_resamples"] == 5
