"""Box mAP of test scenes: COCO's numbers (as torchmetrics computes them) and subject intervals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchmetrics.detection import MeanAveragePrecision

from leukemia_mlops.evaluation.detection import (
    IOU_THRESHOLDS,
    Matched,
    map_intervals,
    match_scene,
    mean_ap,
)

BOOTSTRAP = {"n_resamples": 200, "confidence": 0.95, "seed": 0, "min_subjects": 2}


def random_scenes(count: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Detections scattered around the true boxes of random scenes, with tied scores, false
    boxes, scenes without boxes and scenes without detections."""
    rng = np.random.default_rng(seed)
    found, truth = [], []
    for _ in range(count):
        boxes = int(rng.integers(0, 7))
        corner = rng.uniform(0, 100, (boxes, 2))
        true_boxes = np.concatenate([corner, corner + rng.uniform(10, 30, (boxes, 2))], 1)
        detections = int(rng.integers(0, 40))
        near = true_boxes[rng.integers(0, boxes, detections)] if boxes else None
        guessed = near if near is not None else rng.uniform(0, 100, (detections, 4))
        guessed = guessed + rng.normal(0, 4, (detections, 4))
        guessed[:, 2:] = np.maximum(guessed[:, 2:], guessed[:, :2] + 1)
        found.append(
            {
                "boxes": torch.tensor(guessed, dtype=torch.float32).reshape(-1, 4),
                "scores": torch.tensor(np.round(rng.uniform(0, 1, detections), 2)).float(),
                "labels": torch.from_numpy(rng.integers(0, 2, detections)),
            }
        )
        truth.append(
            {
                "boxes": torch.tensor(true_boxes, dtype=torch.float32).reshape(-1, 4),
                "labels": torch.from_numpy(rng.integers(0, 2, boxes)),
            }
        )
    return found, truth


@pytest.mark.parametrize("chosen", [list(range(30)), [0, 0, 2, 3, 3, 3, 7, 9, 9, 29]])
def test_mean_ap_equals_torchmetrics_on_the_same_scenes(chosen):
    """Scenes drawn twice (as a bootstrap draws them) count twice, as if they were two."""
    found, truth = random_scenes(30, seed=0)
    per_scene = [match_scene(f, t) for f, t in zip(found, truth, strict=True)]
    reference = MeanAveragePrecision(iou_type="bbox")
    reference.update([found[i] for i in chosen], [truth[i] for i in chosen])
    expected = reference.compute()
    ours = mean_ap(per_scene, chosen)
    assert ours["map"] == pytest.approx(float(expected["map"]), abs=1e-6)
    assert ours["map_50"] == pytest.approx(float(expected["map_50"]), abs=1e-6)
    assert 0 < ours["map"] < ours["map_50"] < 1


def scene(found: bool) -> list[Matched]:
    """A scene with one ALL box, which one sure detection finds, or nothing does."""
    none = np.zeros((len(IOU_THRESHOLDS), 0), bool)
    hits = np.ones((len(IOU_THRESHOLDS), 1), bool) if found else none
    scores = np.array([0.9]) if found else np.zeros(0)
    return [Matched(np.zeros(0), none, 0), Matched(scores, hits, 1)]


def test_map_intervals_resample_subjects_with_their_scenes():
    """Subjects 0, 1 (HEM) and 2, 3 (ALL) with two scenes each, where only subject 2's boxes
    are missed. AP is then the share of the 101 recall points up to the recall: 76/101 for
    all scenes (recall 6/8); a resample drawing subject 2 twice, once or never has recall
    4/8, 6/8 or 1, so mAP 51/101, 76/101 or 1, each with probability 1/4, 1/2, 1/4."""
    scene_subject = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    per_scene = [scene(found=subject != 2) for subject in scene_subject]
    label_of = np.array([0, 0, 1, 1])
    intervals = map_intervals(per_scene, scene_subject, label_of, **BOOTSTRAP)
    everything = mean_ap(per_scene, range(len(per_scene)))
    assert intervals["map"].point == everything["map"] == pytest.approx(76 / 101)
    assert intervals["map"].pct_low == pytest.approx(51 / 101)
    assert intervals["map"].pct_high == 1.0
    assert intervals["map"].n_valid == BOOTSTRAP["n_resamples"]
    too_few = map_intervals(per_scene, scene_subject, label_of, **{**BOOTSTRAP, "min_subjects": 3})
    assert np.isnan(too_few["map_50"].pct_low) and too_few["map_50"].n_valid == 0
