"""Predict and export with a YOLO detector: box rows, overlays, ONNX parity, the OOD flag."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
from conftest import TINY_SIZE, tree_digest
from mlflow import MlflowClient
from omegaconf import OmegaConf
from quiet_trainer import quiet_trainer
from test_ood import smear
from torch import nn
from torch.utils.data import DataLoader

from leukemia_mlops.cli import export as export_cli
from leukemia_mlops.cli import predict as predict_cli
from leukemia_mlops.data.detection import (
    SCENE,
    CachedBoxedSplit,
    collate,
    detection_transforms,
    make_sample,
)
from leukemia_mlops.data.naming import ALL, HEM
from leukemia_mlops.data.prepare import MANIFEST_FILE
from leukemia_mlops.data.scenes import SceneSpec, choose_cells, compose_scene, crop_cell
from leukemia_mlops.inference.export import ParityError, export_onnx
from leukemia_mlops.inference.loading import file_sha256, load_module, validated_threshold
from leukemia_mlops.inference.predict import BOX_COLUMNS, predict_paths, read_rgb
from leukemia_mlops.inference.scorers import TorchScorer
from leukemia_mlops.models.base import class_path
from leukemia_mlops.models.detector import YoloDetector, cell_probability
from leukemia_mlops.models.yolo import postprocess
from leukemia_mlops.tracking.model_logging import log_classifier

IMG = 64  # the detector's input side
MIN_SCORE = 0.05  # low, so that even a briefly trained detector gives boxes


def composed_scenes(prepared: Path, split: str, count: int, seed: int) -> list:
    """``count`` scenes of the cached cells of ``split`` (see ``data.scenes``)."""
    source = CachedBoxedSplit(prepared, split, 450)
    cells = [crop_cell(source.image(i), source.labels[i], split) for i in range(len(source))]
    rng = np.random.default_rng(seed)
    spec = SceneSpec()
    return [
        compose_scene([cells[i] for i in choose_cells(len(cells), rng, spec)], rng, spec)
        for _ in range(count)
    ]


def train_yolo(tiny_prepared: Path, path: Path, **hparams: Any) -> Path:
    """A small YOLOv3-tiny trained for a few epochs on training cells and composed scenes,
    saved as the checkpoint ``path`` (``hparams``: more of its hyperparameters)."""
    source = CachedBoxedSplit(tiny_prepared, "train", 450)
    transform = detection_transforms(IMG)
    samples = [
        make_sample(transform, source.image(i), source.boxes[i], [label], label)
        for i, label in enumerate(source.labels.tolist())
    ]
    samples += [
        make_sample(transform, scene.image, scene.boxes, scene.labels, SCENE)
        for scene in composed_scenes(tiny_prepared, "train", 32, seed=0)
    ]
    pl.seed_everything(0)
    module = YoloDetector(
        img_size=IMG,
        width_mult=0.25,
        channels_last=False,
        optimizer={"_target_": "torch.optim.AdamW", "lr": 1e-2},
        **hparams,
    )
    trainer = quiet_trainer(
        max_epochs=4,
    )
    trainer.fit(module, DataLoader(samples, batch_size=16, shuffle=True, collate_fn=collate))
    trainer.save_checkpoint(path)
    return path


def blind_detector(path: Path) -> Path:
    """A YOLOv3-tiny whose every box scores ALL 0.09 (objectness 0.1 x class 0.9) and HEM
    0.005: no box above predict's 0.25 floor, yet its validated probability of any image is
    1.0 (HEM's best is under its conf_threshold 0.01). Saved as the checkpoint ``path``."""
    module = YoloDetector(img_size=IMG, width_mult=0.25, channels_last=False)
    logits = {4: 0.1, 5 + ALL: 0.9, 5 + HEM: 0.05}  # objectness, then class probabilities
    for pred in module.net.head.preds:
        nn.init.zeros_(pred.weight)
        bias = pred.bias.detach().view(module.net.head.num_anchors, -1)
        for channel, p in logits.items():
            bias[:, channel] = math.log(p / (1 - p))
    trainer = quiet_trainer()
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def blind_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return blind_detector(tmp_path_factory.mktemp("blind") / "blind.ckpt")


@pytest.fixture(scope="module")
def yolo_checkpoint(tiny_prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_yolo(tiny_prepared, tmp_path_factory.mktemp("yolo") / "best.ckpt")


@pytest.fixture(scope="module")
def scene_folder(tiny_prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three test-split scenes as PNG files (RGB on disk as BGR, as any image file)."""
    folder = tmp_path_factory.mktemp("scenes")
    for number, scene in enumerate(composed_scenes(tiny_prepared, "test", 3, seed=1)):
        cv2.imwrite(str(folder / f"scene_{number}.png"), scene.image[..., ::-1])
    return folder


def expected_detections(checkpoint: Path, image_file: Path) -> dict[str, np.ndarray]:
    """The detector's boxes on a square image file, computed apart from ``predict``: the
    training postprocess on the image resized to the input side, scaled back to its pixels."""
    rgb = cv2.imread(str(image_file))[..., ::-1]
    side = rgb.shape[0]
    assert rgb.shape[1] == side
    resized = cv2.resize(rgb, (IMG, IMG), interpolation=cv2.INTER_AREA)
    detector = load_module(checkpoint).eval()
    batch = torch.from_numpy(resized.copy()).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        outputs = detector(batch)
    (found,) = postprocess(outputs, detector.net.anchors, detector.net.strides, MIN_SCORE, 0.5)
    probability = cell_probability(
        outputs, detector.net.anchors, detector.net.strides, detector.hparams.conf_threshold
    )
    return {
        "boxes": found["boxes"].numpy() * side / IMG,
        "scores": found["scores"].numpy(),
        "prob_all": float(probability[0]),
    }


@pytest.fixture(scope="module")
def scene_predictions(yolo_checkpoint, scene_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("predict")
    before = tree_digest(scene_folder)
    table = predict_paths(
        yolo_checkpoint,
        [scene_folder],
        out / "predictions.csv",
        image_size=TINY_SIZE,
        batch_size=2,
        overlays=out / "overlays",
        min_score=MIN_SCORE,
        workers=0,
    )
    assert tree_digest(scene_folder) == before  # the inputs are never overwritten
    boxes = pd.read_csv(out / "predictions_boxes.csv", keep_default_na=False)
    return out, table, boxes


def test_predict_writes_one_row_per_box_of_each_scene(
    scene_predictions, yolo_checkpoint, scene_folder
):
    _, table, boxes = scene_predictions
    assert list(boxes.columns) == BOX_COLUMNS
    assert len(boxes) > 0
    scenes = sorted(scene_folder.glob("*.png"))
    assert sorted(table["file"]) == [str(p) for p in scenes]
    for path in scenes:
        expected = expected_detections(yolo_checkpoint, path)
        mine = boxes[boxes["file"] == str(path)]
        assert (
            len(mine) == len(expected["scores"]) == table.set_index("file").loc[str(path), "cells"]
        )
        # The two resizes differ by a fraction of a grey level: scores and boxes nearly agree.
        np.testing.assert_allclose(mine["score"], expected["scores"], atol=0.02)
        coords = mine[["x1", "y1", "x2", "y2"]].to_numpy()
        np.testing.assert_allclose(coords, expected["boxes"], atol=1.0)
        assert set(mine["class"]) <= {"ALL", "HEM"}
    # Scenes are like the detector's training images, and hold several cells: no image label.
    assert table["in_distribution"].all() and boxes["in_distribution"].all()
    assert table["prob_all"].isna().all() and (table["label"] == "").all()
    assert (table["status"] == "not a single cell").all()


def test_predict_draws_an_overlay_per_scene(scene_predictions, scene_folder):
    out, _, boxes = scene_predictions
    for path in sorted(scene_folder.glob("*.png")):
        overlay = cv2.imread(str(out / "overlays" / path.name))
        original = cv2.imread(str(path))
        assert overlay.shape == original.shape
        changed = np.any(overlay != original, axis=2)
        x1, y1 = boxes.loc[boxes["file"] == str(path), ["x1", "y1"]].to_numpy()[0].astype(int)
        assert changed[y1 : y1 + 3, x1 : x1 + 3].any()  # the best box's corner is drawn


def test_overlays_never_overwrite_an_input(yolo_checkpoint, scene_folder, tmp_path):
    inputs = tmp_path / "inputs"
    shutil.copytree(scene_folder, inputs)
    before = tree_digest(inputs)
    predict_paths(
        yolo_checkpoint,
        [inputs],
        tmp_path / "p.csv",
        image_size=TINY_SIZE,
        overlays=inputs,  # the overlays folder is the input folder itself
        workers=0,
    )
    after = tree_digest(inputs)
    assert {name: after[name] for name in before} == before
    assert sorted(set(after) - set(before)) == [f"scene_{n}_1.png" for n in range(3)]


def detector_params(tmp_path: Path) -> tuple[Path, Path]:
    """A params file whose reports live under ``tmp_path``, and the YOLO evaluation's path."""
    params = tmp_path / "params.yaml"
    prepare = {"image_size": TINY_SIZE, "window": 450, "fit": "window"}
    paths = {
        "reports_dir": str(tmp_path / "reports"),
        "models_dir": str(tmp_path / "models"),
        "prepared_dir": str(tmp_path / "no-cache"),
        "mlruns_dir": str(tmp_path / "mlruns"),
    }
    OmegaConf.save(OmegaConf.create({"data": {"prepare": prepare}, "paths": paths}), params)
    evaluation = tmp_path / "reports" / "eval" / "detector" / "metrics.json"
    evaluation.parent.mkdir(parents=True)
    return params, evaluation


def test_single_cells_get_the_image_probability_at_the_detectors_validated_threshold(
    yolo_checkpoint, tiny_raw, tiny_prepared, tmp_path, capsys
):
    manifest = pd.read_parquet(tiny_prepared / MANIFEST_FILE)
    folder = tmp_path / "cells"
    folder.mkdir()
    for name in manifest.loc[manifest["split"] == "test", "path"][:4]:
        shutil.copyfile(tiny_raw / name, folder / Path(name).name)
    params, evaluation = detector_params(tmp_path)
    digest = file_sha256(yolo_checkpoint)
    evaluation.write_text(json.dumps({"threshold": 0.0, "checkpoint_sha256": digest}))
    out = tmp_path / "p.csv"
    options = ["--out", str(out), "--params", str(params), "--min-score", str(MIN_SCORE)]
    predict_cli.main([str(yolo_checkpoint), str(folder), *options])
    printed = capsys.readouterr()
    assert "notice" not in printed.err and "at threshold 0, source validation " in printed.out
    table = pd.read_csv(out, keep_default_na=False)
    assert table["in_distribution"].all() and (table["label"] == "ALL").all()
    assert (table["status"] == "cell found").all() and (table["cells"] > 0).all()
    assert (table["threshold"] == 0.0).all() and (table["threshold_source"] == "validation").all()
    for row in table.itertuples():
        expected = expected_detections(yolo_checkpoint, Path(row.file))["prob_all"]
        assert row.prob_all == pytest.approx(expected, abs=0.02)
    assert validated_threshold(yolo_checkpoint, evaluation) == 0.0


# No --min-score: the detector's own floor, MIN_BOX_SCORE (0.25).
@pytest.mark.parametrize(("min_score", "found"), [(None, False), (0.05, True)])
def test_a_single_cell_gets_a_label_only_where_a_box_finds_it(
    blind_checkpoint, tiny_raw, min_score, found, tmp_path, capsys
):
    """An ALL and a HEM cell, which evaluation scores 1.0 each (it ranks every cell, found or
    not): under the floor no box finds them, so no probability and no label, never ALL at
    1.0; above it, found, they get that probability and its label."""
    folder = tmp_path / "cells"
    folder.mkdir()
    for kind in ("all", "hem"):
        shutil.copyfile(next(tiny_raw.rglob(f"*_{kind}.bmp")), folder / f"{kind}.bmp")
    files = sorted(folder.iterdir())
    evaluated = TorchScorer(load_module(blind_checkpoint).cell_logit_network(), device="cpu")
    np.testing.assert_array_equal(evaluated(np.stack([read_rgb(p) for p in files])), [1, 1])
    params, _ = detector_params(tmp_path)
    out = tmp_path / "p.csv"
    options = ["--out", str(out), "--params", str(params)]
    options += [] if min_score is None else ["--min-score", str(min_score)]
    predict_cli.main([str(blind_checkpoint), str(folder), *options, "--threshold", "0.5"])
    table = pd.read_csv(out, keep_default_na=False, na_values={"prob_all": [""]})
    boxes = pd.read_csv(tmp_path / "p_boxes.csv", keep_default_na=False)
    assert table["file"].tolist() == list(map(str, files)) and table["in_distribution"].all()
    assert (table["threshold"] == 0.5).all() and (table["threshold_source"] == "given").all()
    printed = capsys.readouterr().out
    if found:
        assert (table["status"] == "cell found").all() and (table["cells"] > 0).all()
        assert (table["prob_all"] == 1.0).all() and (table["label"] == "ALL").all()
        assert (boxes["score"] > min_score).all() and set(boxes["class"]) == {"ALL"}
        assert ", 0 single cells not found)" in printed
    else:
        assert (table["status"] == "no cell found").all() and (table["cells"] == 0).all()
        assert table["prob_all"].isna().all() and (table["label"] == "").all()
        assert boxes.empty and ", 0 cells found, 2 single cells not found)" in printed


@pytest.fixture(scope="module")
def yolo_onnx(yolo_checkpoint, tiny_prepared, tmp_path_factory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("onnx") / "yolo.onnx"
    return path, export_onnx(yolo_checkpoint, path, None, tiny_prepared, threshold=0.25)


def test_the_onnx_detector_matches_pytorch(yolo_onnx, yolo_checkpoint, tmp_path):
    path, report = yolo_onnx
    assert report["module"] == class_path(YoloDetector) and report["image_size"] == IMG
    assert report["parity_source"] == "prepare cache" and report["parity_images"] == 32
    assert report["max_abs_diff"] <= report["tolerance"] == 1e-4
    assert validated_threshold(path) == 0.25
    with pytest.raises(ParityError, match="differ"):
        export_onnx(yolo_checkpoint, tmp_path / "m.onnx", None, n_images=4, tolerance=-1.0)
    assert not (tmp_path / "m.onnx").exists()
    with pytest.raises(ValueError, match="detector of 64 px inputs, not 48"):
        export_onnx(yolo_checkpoint, tmp_path / "m.onnx", 48)


def test_predict_through_the_onnx_detector_equals_the_checkpoint(
    yolo_onnx, scene_predictions, scene_folder, tmp_path
):
    _, table, boxes = scene_predictions
    onnx_table = predict_paths(
        yolo_onnx[0],
        [scene_folder],
        tmp_path / "p.csv",
        image_size=TINY_SIZE,
        min_score=MIN_SCORE,
        workers=0,
    )
    onnx_boxes = pd.read_csv(tmp_path / "p_boxes.csv", keep_default_na=False)
    assert onnx_table["cells"].tolist() == table["cells"].tolist()
    assert onnx_boxes["class"].tolist() == boxes["class"].tolist()
    columns = ["x1", "y1", "x2", "y2", "score"]
    np.testing.assert_allclose(onnx_boxes[columns], boxes[columns], atol=1e-3)


def test_export_cli_picks_the_detector_family_and_its_evaluation(
    yolo_checkpoint, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # the default export lands in ./exports
    params, evaluation = detector_params(tmp_path)
    checkpoint = tmp_path / "models/detector/checkpoints/best.ckpt"
    checkpoint.parent.mkdir(parents=True)
    shutil.copyfile(yolo_checkpoint, checkpoint)
    digest = file_sha256(checkpoint)
    evaluation.write_text(json.dumps({"threshold": 0.3, "checkpoint_sha256": digest}))
    export_cli.main(["--checkpoint", str(checkpoint), "--params", str(params)])
    report = json.loads(capsys.readouterr().out)
    out = Path("exports/detector.onnx")  # outside the run directory, a DVC output
    assert report["path"] == str(out) and report["module"] == class_path(YoloDetector)
    assert validated_threshold(out) == 0.3


@pytest.mark.parametrize("family", ["cnn", "yolo"])
def test_a_smear_is_flagged_by_either_model(family, tiny_checkpoint, yolo_checkpoint, tmp_path):
    folder = tmp_path / "smears"
    folder.mkdir()
    files = [smear(folder / "photo.jpg", 1226, 652), smear(folder / "square.png", 450, 450, 1)]
    model = tiny_checkpoint if family == "cnn" else yolo_checkpoint
    table = predict_paths(
        model, [folder], tmp_path / "p.csv", image_size=TINY_SIZE, threshold=0.5, min_score=0.0
    )
    assert sorted(table["file"]) == sorted(map(str, files))
    assert not table["in_distribution"].any()
    assert table["ood_reason"].str.contains("background not dark").all()
    labelled = table[table["label"] != ""]
    assert not labelled["in_distribution"].any()  # a label only ever beside its flag
    if family == "cnn":
        assert len(labelled) == len(files)
    else:
        boxes = pd.read_csv(tmp_path / "p_boxes.csv", keep_default_na=False)
        assert len(boxes) > 0 and not boxes["in_distribution"].any()
        assert boxes["ood_reason"].str.contains("background not dark").all()


def refused(main, argv: list[str], capsys) -> str:
    """The one error line a command prints when it exits with status 2."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_bad_models_give_one_line_errors(yolo_checkpoint, scene_folder, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(yolo_checkpoint.read_bytes()[:5000])
    broken_onnx = tmp_path / "model.onnx"
    broken_onnx.write_bytes(b"not a protobuf at all")
    notes = tmp_path / "model.txt"
    notes.write_text("a model?\n")
    predict = [str(scene_folder), "--out", str(tmp_path / "p.csv"), "--params", "absent.yaml"]
    line = refused(predict_cli.main, [str(corrupt), *predict], capsys)
    assert line.startswith(f"error: {corrupt} is not a model checkpoint")
    line = refused(predict_cli.main, [str(broken_onnx), *predict], capsys)
    assert line.startswith(f"error: {broken_onnx} is not an ONNX model")
    line = refused(predict_cli.main, [str(notes), *predict], capsys)
    assert line.startswith("error: model must be a .ckpt or .onnx file")
    out = tmp_path / "m.onnx"
    export = ["--checkpoint", str(corrupt), "--out", str(out), "--params", "absent.yaml"]
    line = refused(export_cli.main, [*export, "--image-size", "48"], capsys)
    assert line.startswith(f"error: {corrupt} is not a model checkpoint")
    assert not out.exists()


def test_an_mlflow_detector_predicts_like_its_checkpoint(
    yolo_checkpoint, scene_predictions, scene_folder, tmp_path
):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("t")).info.run_id
    detector = load_module(yolo_checkpoint)
    for key in ("conf_threshold", "iou_threshold"):  # as training logs its flattened config
        client.log_param(run_id, f"model.{key}", detector.hparams[key])
    log_classifier(uri, run_id, detector.predictor(), IMG)
    _, table, boxes = scene_predictions
    served = predict_paths(
        f"runs:/{run_id}/model",
        [scene_folder],
        tmp_path / "p.csv",
        tracking_uri=uri,
        image_size=TINY_SIZE,
        min_score=MIN_SCORE,
        workers=0,
    )
    served_boxes = pd.read_csv(tmp_path / "p_boxes.csv", keep_default_na=False)
    assert served["cells"].tolist() == table["cells"].tolist()
    columns = ["x1", "y1", "x2", "y2", "score"]
    np.testing.assert_allclose(served_boxes[columns], boxes[columns], atol=1e-4)
