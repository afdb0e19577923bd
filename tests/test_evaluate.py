"""Evaluation of a trained checkpoint on the tiny prepare cache: real model, files and MLflow."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY_SIZE
from mlflow import MlflowClient
from omegaconf import OmegaConf
from PIL import Image

from leukemia_mlops.cli import evaluate as evaluate_cli
from leukemia_mlops.config import build_spec, compose
from leukemia_mlops.data.prepare import IMAGES_FILE, MANIFEST_FILE
from leukemia_mlops.evaluation.compare import KEY_METRICS, compare_runs, write_comparison
from leukemia_mlops.evaluation.evaluate import (
    INTERVAL_KEYS,
    EvaluateSpec,
    evaluate_model,
    gallery_rows,
    log_evaluation,
    mlflow_metrics,
)
from leukemia_mlops.evaluation.gradcam import gradcam, last_conv_block
from leukemia_mlops.evaluation.metrics import binary_metrics
from leukemia_mlops.inference.loading import load_classifier
from leukemia_mlops.inference.predict import predict_paths
from leukemia_mlops.inference.scorers import TorchScorer, dihedral_views, to_network_input
from leukemia_mlops.models.backbones import build_classifier
from leukemia_mlops.tracking.model_logging import log_classifier
from leukemia_mlops.tracking.registry import register_best
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
    assert set(on_disk["subject"]) == {"accuracy", "sensitivity", "specificity", "f1_weighted"}
    assert on_disk["bootstrap"]["test_subjects"] == {"HEM": 2, "ALL": 2}
    assert on_disk["bootstrap"]["intervals"] == "percentile and BCa"
    tta = on_disk["tta"]
    assert set(tta) == {"threshold", "val_selection", "test", "test_default", "subject"}
    assert set(tta["test"]) == set(on_disk["test"])
    manifest = pd.read_parquet(tiny_prepared / MANIFEST_FILE)
    for split in ("val", "test"):
        rows = manifest[manifest["split"] == split]
        assert on_disk["counts"][f"{split}_cells"] == len(rows)
        assert on_disk["counts"][f"{split}_subjects"] == rows["subject"].nunique()


def test_intervals_contain_their_point_estimates(evaluated):
    for section in (evaluated.metrics["test"], evaluated.metrics["test_default"]):
        for metric in ("accuracy", "f1_weighted", "sensitivity", "specificity"):
            point, low, high = (section[metric + s] for s in ("", "_low", "_high"))
            assert low <= point <= high, metric


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
            metrics["test"][f"{metric}_low"] is None
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

    metrics = evaluate_model(
        tiny_checkpoint, flipped, tmp_path / "eval", evaluate_spec(n_resamples=5)
    )
    assert metrics["threshold"] == evaluated.metrics["threshold"]
    assert metrics["val_selection"] == evaluated.metrics["val_selection"]
    original = evaluated.metrics["test"]["accuracy"]
    assert metrics["test"]["accuracy"] == pytest.approx(1 - original)


def test_mlflow_run_receives_metrics_and_artifacts(evaluated):
    client = MlflowClient(evaluated.uri)
    logged = client.get_run(evaluated.run_id).data.metrics
    expected = mlflow_metrics(evaluated.metrics)
    assert logged == expected
    assert logged["test/f1_weighted"] == evaluated.metrics["test"]["f1_weighted"]
    assert (
        logged["eval/val_selection/f1_weighted"]
        == evaluated.metrics["val_selection"]["f1_weighted"]
    )
    assert logged["test/f1_weighted_n_valid"] == evaluated.metrics["test"]["f1_weighted_n_valid"]
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
        "evaluate": {**OmegaConf.to_container(compose().evaluate), "n_resamples": 5},
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
    assert metrics["bootstrap"]["intervals"].startswith("none, too few subjects")


def test_a_scorer_scales_uint8_on_its_device_exactly_as_training_does():
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    scorer = TorchScorer(build_classifier("resnet18"), device="cpu")
    assert torch.equal(scorer.tensor(images), torch.from_numpy(to_network_input(images)))
    assert scorer.autocast is None  # mixed precision only on a GPU
    with pytest.raises(ValueError, match="expected uint8 images"):
        scorer.tensor(images.astype(np.float32))
