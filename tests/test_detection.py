"""YOLO detection path: scene composer, box augmentation, module weights and a 1-epoch run."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from leukemia_mlops.data.detection import DetectionDataModule, detection_transforms, make_sample
from leukemia_mlops.data.images import CELL_THRESHOLD, cell_box
from leukemia_mlops.data.scenes import Cell, SceneSpec, compose_scene, crop_cell
from leukemia_mlops.errors import ConfigError
from leukemia_mlops.models.backbones import WeightsError
from leukemia_mlops.models.detector import YoloDetector, cell_probability
from leukemia_mlops.models.yolo import save_darknet_weights
from leukemia_mlops.models.yolo.postprocess import postprocess
from leukemia_mlops.training.run import run_training

SMALL = {"variant": "yolov3_tiny", "img_size": 64, "width_mult": 0.25}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def datamodule(tiny_prepared):
    dm = DetectionDataModule(
        str(tiny_prepared), img_size=96, num_workers=0, train_scenes=4, val_scenes=4
    )
    dm.setup()
    return dm


@pytest.mark.parametrize("noise", [0, 4])
def test_scene_boxes_are_the_pasted_cells(datamodule, noise):
    source = datamodule.val_scenes.source
    cells = [crop_cell(source.image(i), source.labels[i], "val") for i in range(6)]
    scene = compose_scene(cells, np.random.default_rng(noise), SceneSpec(noise=noise))
    assert scene.split == "val"
    assert scene.labels.tolist() == [cell.label for cell in cells]
    outside = np.ones(scene.image.shape[:2], bool)
    for (x0, y0, x1, y1), cell in zip(scene.boxes, cells, strict=True):
        region = scene.image[y0:y1, x0:x1]
        # The cell's non-black pixels reach every edge of its box, and are the cell's own.
        assert cell_box(region) == (0, 0, x1 - x0, y1 - y0)
        mask = cell.pixels.max(axis=2) > CELL_THRESHOLD
        np.testing.assert_array_equal(region[mask], cell.pixels[mask])
        assert outside[y0:y1, x0:x1].all(), "boxes overlap"
        outside[y0:y1, x0:x1] = False
    assert scene.image[outside].max() <= noise  # nothing but background outside the boxes


def test_scenes_never_mix_splits(datamodule):
    source = datamodule.val_scenes.source
    val = crop_cell(source.image(0), source.labels[0], "val")
    train = Cell(val.pixels, val.label, "train")
    with pytest.raises(ValueError, match="one split"):
        compose_scene([val, train], np.random.default_rng(0), SceneSpec(min_cells=2))
    train_scenes = datamodule.datasets["train"].datasets[0]
    assert (train_scenes.source.split, datamodule.val_scenes.source.split) == ("train", "val")


def test_box_augmentation_keeps_boxes_on_the_cell(datamodule):
    source = datamodule.val_scenes.source
    transform = detection_transforms(96, strength=1.0, flips=True)
    transform.set_random_seed(0)
    for i in range(12):
        image = source.image(i % len(source))
        box = np.array(cell_box(image), np.float32)
        for _ in range(3):
            out, target = make_sample(transform, image, box, [1], 1)
            found = cell_box(out.permute(1, 2, 0).numpy())
            assert len(target["boxes"]) == 1
            assert np.abs(np.array(found) - target["boxes"][0].numpy()).max() <= 2.0


def test_cell_probability_from_best_class_scores():
    anchors = torch.tensor([[[16.0, 16.0]]])
    raw = torch.full((2, 1, 2, 2, 7), -20.0)
    raw[0, 0, 0, 0, 4:] = torch.tensor([20.0, 0.0, 20.0])  # a sure box, P(HEM)=0.5, P(ALL)=1
    p_all = cell_probability([raw], anchors, [32], conf_threshold=0.01)
    assert p_all.tolist() == pytest.approx([1 / 1.5, 0.5])  # image 2 has no box: 0.5


def _logit(p: float) -> float:
    return float(np.log(p / (1 - p)))


def test_map_of_known_detections_equals_the_hand_computed_ap():
    """Raw maps decoded by ``postprocess`` into the detector's own mAP metric.

    A 2x2 grid of stride 32 with one 16 px anchor and zero offsets decodes to four exact boxes:
    cell (col, row) -> [32 col + 8, 32 row + 8, 32 col + 24, 32 row + 24].
    ALL (class 1): ground truth at cells (0, 0) and (1, 1); detections (0, 0) 0.9 (hit),
    (1, 0) 0.8 (false), (1, 1) 0.7 (hit): precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1. COCO's
    101-point AP: 51 recall points up to 0.5 at precision 1, 50 above at 2/3.
    HEM (class 0): one box at (0, 1), found with score 0.6: AP 1. Every hit has IoU 1, so mAP
    over IoU 0.5:0.95 equals mAP at 0.5.
    """
    module = YoloDetector(**SMALL)
    raw = torch.full((1, 1, 2, 2, 7), -20.0)  # [B, anchors, rows, cols, xywh + obj + 2 classes]
    raw[..., :4] = 0.0
    for (col, row), score, label in (
        ((0, 0), 0.9, 1),
        ((1, 0), 0.8, 1),
        ((1, 1), 0.7, 1),
        ((0, 1), 0.6, 0),
    ):
        raw[0, 0, row, col, 4] = _logit(score)
        raw[0, 0, row, col, 5 + label] = 20.0
    detections = postprocess(
        [raw],
        torch.tensor([[[16.0, 16.0]]]),
        [32],
        module.hparams.conf_threshold,
        module.hparams.iou_threshold,
    )
    truth = {
        "boxes": torch.tensor([[8.0, 8, 24, 24], [40, 40, 56, 56], [8, 40, 24, 56]]),
        "labels": torch.tensor([1, 1, 0]),
    }
    module.val_map.update(detections, [truth])
    result = module.val_map.compute()
    ap_all = (51 * 1.0 + 50 * 2 / 3) / 101
    assert result["map_50"].item() == pytest.approx((ap_all + 1.0) / 2, abs=1e-4)
    assert result["map"].item() == pytest.approx((ap_all + 1.0) / 2, abs=1e-4)


def test_darknet_backbone_weights_load_through_the_module(tmp_path):
    torch.manual_seed(0)
    source = YoloDetector(**SMALL)
    path = tmp_path / "tiny.conv.7"
    save_darknet_weights(source.net.backbone, path)
    torch.manual_seed(1)
    loaded = YoloDetector(**SMALL, weights=str(path))
    for key, value in source.net.backbone.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(loaded.net.backbone.state_dict()[key], value)
    assert not torch.equal(loaded.net.head.preds[0].weight, source.net.head.preds[0].weight)
    checkpoint = tmp_path / "detector.pt"
    torch.save(source.state_dict(), checkpoint)
    from_torch = YoloDetector(**SMALL, weights=str(checkpoint))
    torch.testing.assert_close(
        from_torch.net.backbone.state_dict(), source.net.backbone.state_dict()
    )


@pytest.mark.parametrize("name", ["missing.weights", "darknet53.conv.74", "missing.ckpt"])
def test_missing_weights_file_is_a_clear_error(tmp_path, name):
    with pytest.raises(WeightsError, match="no such file"):
        YoloDetector(**SMALL, weights=str(tmp_path / name))


def test_one_epoch_yolo_run_logs_detection_and_cell_metrics(tiny_config, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = tiny_config(
        "model=yolov3_tiny",
        "model.img_size=64",
        "model.width_mult=0.25",
        "model.scenes.train_scenes=8",
        "model.scenes.val_scenes=4",
        "trainer.max_epochs=1",
        "logger.mlflow.log_model=true",
    )
    run_dir = tmp_path / "run"
    best = run_training(cfg, run_dir)
    assert 0.0 <= best <= 1.0
    assert (run_dir / "checkpoints/best.ckpt").is_file()
    assert (run_dir / "checkpoints/last.ckpt").is_file()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {"val_map_50", "val_map", "val_f1_weighted", "train_loss"} <= set(metrics)
    run_id = json.loads((run_dir / "run.json").read_text())["mlflow_run_id"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert {"val/map_50", "val/map", "val/f1_weighted", "train/box_loss"} <= set(run.data.metrics)
    assert run.data.tags["family"] == "yolo"
    assert run.data.tags["backbone"] == "yolov3_tiny"
    assert {a.path for a in client.list_artifacts(run_id)} >= {"checkpoints", "overlays"}
    assert len(client.list_artifacts(run_id, "overlays")) == 4
    (model,) = client.search_logged_models(
        [run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'"
    )
    mlflow.set_tracking_uri(client.tracking_uri)
    served = mlflow.pytorch.load_model(model.model_uri)
    assert served(torch.zeros(1, 3, 64, 64)).shape == (1, 3 * (4 * 4 + 2 * 2), 7)


def _first_training_batch(tiny_prepared, seed: int) -> torch.Tensor:
    dm = DetectionDataModule(
        str(tiny_prepared), img_size=64, num_workers=0, batch_size=4, train_scenes=4, seed=seed
    )
    dm.setup()
    images, _ = next(iter(dm.train_dataloader()))
    return images


def test_datamodule_seed_gives_the_training_scenes_and_order(tiny_prepared):
    same = _first_training_batch(tiny_prepared, 1), _first_training_batch(tiny_prepared, 1)
    assert torch.equal(*same)
    assert not torch.equal(same[0], _first_training_batch(tiny_prepared, 2))


def test_detection_reads_its_loader_keys_from_the_datamodule_section(tiny_config, caplog):
    cfg = tiny_config("model=yolov3_tiny", "seed=1", "datamodule.seed=7")
    dm = DetectionDataModule.from_config(cfg)
    assert (dm.seed, dm.loaders.seed) == (7, 7)
    assert dm.balance == "loss"
    assert "datamodule.balance=loss" in caplog.text  # the default trains, with a word


def test_balance_sampler_draws_single_cells_class_balanced(tiny_prepared):
    dm = DetectionDataModule(
        str(tiny_prepared), img_size=64, num_workers=0, train_scenes=4, balance="sampler"
    )
    dm.setup()
    probabilities = dm.train_dataloader().sampler.probabilities
    labels = dm.datasets["train"].datasets[1].source.labels
    assert np.bincount(labels).min() < np.bincount(labels).max()  # the split is imbalanced
    scenes, cells = probabilities[:4], probabilities[4:]
    assert cells[labels == 0].sum() == pytest.approx(cells[labels == 1].sum())
    assert scenes.sum() == pytest.approx(4 / (4 + len(labels)))  # scenes keep their share
    plain = DetectionDataModule(str(tiny_prepared), img_size=64, num_workers=0, train_scenes=4)
    plain.setup()
    assert plain.train_dataloader().sampler.probabilities is None


@pytest.mark.parametrize(
    ("key", "value"),
    [("augment_on", "device"), ("augment_on", "gpu"), ("balance", "weighted")],
)
def test_detection_refuses_datamodule_settings_it_cannot_honour(tiny_prepared, key, value):
    with pytest.raises(ConfigError, match=f"datamodule.{key}"):
        DetectionDataModule(str(tiny_prepared), **{key: value})
