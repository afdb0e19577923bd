"""A YOLO model's box scores on test scenes: mAP with subject-bootstrap intervals, and overlays.

Each test scene is composed (by :mod:`leukemia_mlops.data.scenes`, as the validation scenes
are) from the cells of ONE test subject, so scenes belong to subjects as cells do, and the
stratified subject bootstrap resamples them with their subject. Unlike the validation scenes,
a test scene therefore holds one class.

mAP follows COCO, as pycocotools (behind torchmetrics' ``MeanAveragePrecision``) computes it:
per scene and class, detections best first are matched greedily to the free box of highest
IoU at each threshold 0.50:0.05:0.95; pooled over scenes, precision is made monotone and read
at 101 recall points; the mean runs over the classes that have boxes. Matching is done once
per scene and a resample only pools again, so 1000 resamples take seconds where one
pycocotools evaluation of a few dozen scenes takes most of a second.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from leukemia_mlops.data.detection import (
    SCENE,
    CachedBoxedSplit,
    Sample,
    collate,
    detection_transforms,
    make_sample,
)
from leukemia_mlops.data.identity import read_identity
from leukemia_mlops.data.scenes import SceneSpec, choose_cells, compose_scene, crop_cell
from leukemia_mlops.errors import InputError
from leukemia_mlops.evaluation.bootstrap import Interval, subject_intervals
from leukemia_mlops.evaluation.plots import image_grid
from leukemia_mlops.labels import CLASS_NAMES
from leukemia_mlops.models.detector import YoloDetector
from leukemia_mlops.models.yolo import postprocess

# The thresholds torchmetrics hands pycocotools: float32 steps, so a recall of exactly 0.2 sits
# below the recall point float32(0.2), as it does in the detector's validation mAP.
IOU_THRESHOLDS = np.array(torch.linspace(0.5, 0.95, 10).tolist())
RECALL_POINTS = np.array(torch.linspace(0.0, 1.0, 101).tolist())
MAX_DETECTIONS = 100  # per scene and class, as COCO's maxDets
NUM_CLASSES = 2
OVERLAY_SCENES = 6
MAP_KEYS = ("map", "map_50")


@dataclass(frozen=True)
class Matched:
    """One scene's detections of one class, best first: their scores, whether each found a box
    at each IoU threshold (``hits [thresholds, detections]``), and the scene's box count."""

    scores: np.ndarray
    hits: np.ndarray
    n_truth: int


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every xyxy box of ``a`` with every box of ``b`` (float64, ``[len(a), len(b)]``)."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    low = np.maximum(a[:, None, :2], b[None, :, :2])
    high = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(high - low, 0, None).prod(-1)
    area = lambda boxes: (boxes[:, 2:] - boxes[:, :2]).prod(-1)  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _greedy_hits(iou: np.ndarray) -> np.ndarray:
    """COCO's matching: each detection in turn takes the free box of highest IoU (the last of
    equals) if that IoU reaches the threshold; ``[thresholds, detections]``."""
    hits = np.zeros((len(IOU_THRESHOLDS), iou.shape[0]), bool)
    for t, threshold in enumerate(IOU_THRESHOLDS):
        free = np.ones(iou.shape[1], bool)
        for d, row in enumerate(iou):
            candidates = np.where(free & (row >= min(threshold, 1 - 1e-10)), row, -1.0)
            if candidates.size and candidates.max() >= 0:
                free[candidates.size - 1 - np.argmax(candidates[::-1])] = False
                hits[t, d] = True
    return hits


def match_scene(found: dict[str, Tensor], truth: dict[str, Tensor]) -> list[Matched]:
    """One scene's detections (``boxes``, ``scores``, ``labels``) matched to its true boxes,
    per class."""
    boxes, scores, labels = (found[key].cpu().numpy() for key in ("boxes", "scores", "labels"))
    true_boxes, true_labels = truth["boxes"].cpu().numpy(), truth["labels"].cpu().numpy()
    matched = []
    for label in range(NUM_CLASSES):
        mine = labels == label
        order = np.argsort(-scores[mine], kind="mergesort")[:MAX_DETECTIONS]
        targets = true_boxes[true_labels == label]
        iou = box_iou(boxes[mine][order], targets)
        matched.append(Matched(scores[mine][order], _greedy_hits(iou), len(targets)))
    return matched


def average_precision(matched: Sequence[Matched]) -> np.ndarray | None:
    """AP at each IoU threshold of detections pooled over scenes (a scene may repeat);
    None when the scenes hold no box of the class."""
    n_truth = sum(m.n_truth for m in matched)
    if n_truth == 0:
        return None
    scores = np.concatenate([m.scores for m in matched])
    if scores.size == 0:
        return np.zeros(len(IOU_THRESHOLDS))
    order = np.argsort(-scores, kind="mergesort")
    hits = np.concatenate([m.hits for m in matched], axis=1)[:, order]
    tp, fp = np.cumsum(hits, axis=1), np.cumsum(~hits, axis=1)
    recall = tp / n_truth
    precision = np.flip(np.maximum.accumulate(np.flip(tp / (tp + fp + np.spacing(1)), 1), 1), 1)
    ap = np.empty(len(IOU_THRESHOLDS))
    for t in range(len(IOU_THRESHOLDS)):
        at = np.searchsorted(recall[t], RECALL_POINTS, side="left")
        ap[t] = np.where(at < scores.size, precision[t, np.minimum(at, scores.size - 1)], 0).mean()
    return ap


def mean_ap(per_scene: Sequence[list[Matched]], scenes: Sequence[int]) -> dict[str, float]:
    """``map`` (IoU 0.50:0.95) and ``map_50`` of ``scenes`` (indices, repeats allowed); NaN
    when they hold no box."""
    aps = [
        ap
        for label in range(NUM_CLASSES)
        if (ap := average_precision([per_scene[i][label] for i in scenes])) is not None
    ]
    if not aps:
        return dict.fromkeys(MAP_KEYS, float("nan"))
    table = np.stack(aps)
    return {"map": float(table.mean()), "map_50": float(table[:, 0].mean())}


def map_intervals(
    per_scene: Sequence[list[Matched]],
    scene_subject: np.ndarray,
    label_of: np.ndarray,
    **bootstrap: Any,
) -> dict[str, Interval]:
    """mAP of all scenes with stratified subject-bootstrap intervals: a resample repeats each
    scene as often as its subject (index into ``label_of``) was drawn."""

    def score(counts: np.ndarray) -> dict[str, np.ndarray]:
        rows = [
            mean_ap(per_scene, np.repeat(np.arange(len(per_scene)), row[scene_subject]))
            for row in counts
        ]
        return {key: np.array([r[key] for r in rows]) for key in MAP_KEYS}

    return subject_intervals(score, label_of, **bootstrap)


@dataclass(frozen=True)
class TestScenes:
    """Scenes composed per test subject, with each scene's subject (an index into
    ``subjects``) and each subject's label."""

    samples: list[Sample]
    scene_subject: np.ndarray
    subjects: np.ndarray
    label_of: np.ndarray


def subject_scenes(
    prepared_dir: str | Path, img_size: int, spec: SceneSpec, per_subject: int, seed: int
) -> TestScenes:
    """``per_subject`` scenes from the cells of each test subject, letterboxed to ``img_size``;
    scene ``k`` of subject ``s`` is seeded by ``(seed, s, k)``, so it is the same every run."""
    source = CachedBoxedSplit(Path(prepared_dir), "test", read_identity(prepared_dir).window)
    if len(source) == 0:
        raise InputError(f"the test split of {prepared_dir} is empty")
    transform = detection_transforms(img_size)
    subjects = np.unique(source.subjects)
    samples, owners = [], []
    for number, subject in enumerate(subjects):
        pool = np.flatnonzero(source.subjects == subject)
        for k in range(per_subject):
            rng = np.random.default_rng([seed, number, k])
            chosen = pool[choose_cells(len(pool), rng, spec)]
            cells = [crop_cell(source.image(i), source.labels[i], "test") for i in chosen]
            scene = compose_scene(cells, rng, spec)
            samples.append(make_sample(transform, scene.image, scene.boxes, scene.labels, SCENE))
            owners.append(number)
    label_of = np.array([source.labels[source.subjects == s][0] for s in subjects], np.int64)
    return TestScenes(samples, np.array(owners, np.int64), subjects, label_of)


@torch.no_grad()
def detect(detector: YoloDetector, images: Tensor, batch_size: int) -> list[dict[str, Tensor]]:
    """The detector's boxes for uint8 images ``[N, 3, H, W]``, at its own score and NMS
    thresholds (those of its validation mAP)."""
    detector.eval()
    found: list[dict[str, Tensor]] = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].to(detector.device).float().div(255)
        outputs = [o.float() for o in detector(batch)]
        net, hparams = detector.net, detector.hparams
        found += postprocess(
            outputs, net.anchors, net.strides, hparams.conf_threshold, hparams.iou_threshold
        )
    return found


def detect_scenes(
    detector: YoloDetector, scenes: TestScenes, batch_size: int, bootstrap: dict[str, Any]
) -> dict[str, Interval]:
    """mAP of the detector on ``scenes`` with stratified subject-bootstrap intervals
    (``bootstrap``: the keyword arguments of :func:`subject_intervals`)."""
    images, targets = collate(scenes.samples)
    found = detect(detector, images, batch_size)
    per_scene = [match_scene(f, t) for f, t in zip(found, targets, strict=True)]
    return map_intervals(per_scene, scenes.scene_subject, scenes.label_of, **bootstrap)


def write_overlays(detector: YoloDetector, scenes: TestScenes, path: Path) -> Path:
    """Predicted boxes with class and score (true boxes white) over the first scene of up to
    :data:`OVERLAY_SCENES` test subjects, ALL and HEM subjects taking turns."""
    first = np.flatnonzero(np.r_[True, np.diff(scenes.scene_subject) != 0])
    owner = scenes.scene_subject
    turns = zip_longest(*([i for i in first if scenes.label_of[owner[i]] == c] for c in (1, 0)))
    chosen = [i for pair in turns for i in pair if i is not None][:OVERLAY_SCENES]
    images, targets = collate([scenes.samples[i] for i in chosen])
    titles = [
        f"subject {scenes.subjects[owner[i]]} ({CLASS_NAMES[scenes.label_of[owner[i]]]})"
        for i in chosen
    ]
    return image_grid(detector.draw_predictions(images, targets), titles, path, ncols=3)
