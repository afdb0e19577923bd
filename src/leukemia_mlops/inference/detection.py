"""A YOLO detector as a scorer: boxes per image, and P(ALL) for images of one cell.

Every detector source (a ``YoloDetector`` checkpoint, its ONNX export, its MLflow model) is a
network from float images ``[B, 3, S, S]`` in [0, 1] to decoded predictions ``[B, N, 5 + C]``
(xyxy pixels, objectness, class probabilities; see ``models.detector.DecodedYolo``). Non-maximum
suppression runs here, outside the network, so all runtimes share it. Inputs of any size are
letterboxed to ``S`` as the detector's training and evaluation letterbox them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torchvision.utils import draw_bounding_boxes

from leukemia_mlops.data.detection import detection_transforms
from leukemia_mlops.inference.scorers import to_network_input
from leukemia_mlops.labels import CLASS_NAMES
from leukemia_mlops.models.detector import CLASS_COLORS, decoded_cell_probability
from leukemia_mlops.models.yolo.postprocess import select_detections

#: The most boxes kept per image (as in training's postprocess).
MAX_DETECTIONS = 100
#: A detector's decoding thresholds: hyperparameters, ONNX metadata, ``model.`` run params.
THRESHOLD_KEYS = ("conf_threshold", "iou_threshold")
#: All its settings (the input side is the ONNX graph's and the MLflow signature's).
DETECTOR_KEYS = ("img_size", *THRESHOLD_KEYS)


@dataclass(frozen=True)
class Found:
    """One image's detections: boxes ``[K, 4]`` xyxy, scores ``[K]``, class labels ``[K]``."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray


def select_boxes(decoded: Tensor, min_score: float, iou_threshold: float) -> Found:
    """The detections of one image's decoded predictions ``[N, 5 + C]``, best first, as
    training's postprocess selects them (boxes scoring ``min_score`` or less dropped)."""
    found = select_detections(decoded, min_score, iou_threshold, MAX_DETECTIONS)
    return Found(*(found[key].numpy() for key in ("boxes", "scores", "labels")))


def cell_probabilities(decoded: Tensor, conf_threshold: float) -> np.ndarray:
    """P(ALL) per image, as the detector is validated and evaluated (in float64): every image
    gets one, ``s_ALL / (s_ALL + s_HEM)`` over boxes scoring above ``conf_threshold``, 0.5
    where none does (see ``models.detector.decoded_cell_probability``).

    Weak boxes count: one class's best box just above ``conf_threshold`` and none of the other
    gives 1.0 (or 0.0). ``predict`` therefore gives it only to a cell a box found (scoring
    above its ``min_score``); evaluation, which ranks every cell, takes it as it is.
    """
    return decoded_cell_probability(decoded.double(), conf_threshold).numpy()


class Letterbox:
    """Images of any size to ``img_size`` square inputs, as the detector's evaluation sees them."""

    def __init__(self, img_size: int):
        self.img_size = img_size
        self.transform = detection_transforms(img_size)

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``image`` (uint8 ``[H, W, 3]``) letterboxed, and where the original frame lies in it
        (xyxy), to map boxes back."""
        height, width = image.shape[:2]
        out = self.transform(
            image=image,
            bboxes=np.array([[0, 0, width, height]], np.float32),
            labels=np.zeros(1, np.int64),
        )
        return out["image"], np.asarray(out["bboxes"], np.float32).reshape(4)


class YoloScorer:
    """``network`` (float ``[B, 3, S, S]`` -> decoded ``[B, N, 5 + C]`` array) with its
    input side ``img_size`` and the thresholds it was trained with.

    As a :class:`~.scorers.Scorer` it gives P(ALL) of single-cell images of any square size,
    for every image, found or not (:func:`cell_probabilities`).
    """

    def __init__(
        self,
        network: Callable[[np.ndarray], np.ndarray],
        img_size: int,
        conf_threshold: float,
        iou_threshold: float,
    ):
        self.network = network
        self.letterbox = Letterbox(img_size)
        self.conf_threshold = conf_threshold
        self.iou_threshold = iou_threshold
        self.preprocessing: dict[str, int] = {}  # any prepare size: images are letterboxed

    def decoded(self, images: np.ndarray) -> Tensor:
        """Decoded predictions of letterboxed uint8 images ``[B, S, S, 3]``."""
        return torch.from_numpy(self.network(to_network_input(images))).float()

    def __call__(self, images: np.ndarray) -> np.ndarray:
        batch = np.stack([self.letterbox(image)[0] for image in images])
        return cell_probabilities(self.decoded(batch), self.conf_threshold)


def to_original(boxes: np.ndarray, frame: np.ndarray, width: int, height: int) -> np.ndarray:
    """Boxes in letterboxed pixels as pixels of the original ``width`` x ``height`` image."""
    scale = np.array([width, height]) / (frame[2:] - frame[:2])
    corners = (boxes.reshape(-1, 2, 2) - frame[:2]) * scale
    return np.clip(corners, 0, [width, height]).reshape(-1, 4)


def draw_boxes(image: np.ndarray, found: Found) -> np.ndarray:
    """``image`` (uint8 RGB ``[H, W, 3]``) with ``found``'s boxes, classes and scores drawn
    (ALL red, HEM green), as the training run's validation overlays draw them."""
    labels = found.labels.tolist()
    if not labels:
        return image
    names = [
        f"{CLASS_NAMES[label]} {score:.2f}"
        for label, score in zip(labels, found.scores.tolist(), strict=True)
    ]
    drawn = draw_bounding_boxes(
        torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
        torch.from_numpy(found.boxes),
        names,
        [CLASS_COLORS[label] for label in labels],
        width=max(2, max(image.shape[:2]) // 200),
    )
    return drawn.permute(1, 2, 0).numpy()
