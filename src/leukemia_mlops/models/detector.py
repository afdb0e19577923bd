"""LightningModule training YOLOv3 / YOLOv3-tiny to find cells and tell ALL blasts from HEM.

Besides detection metrics (box mAP), every single-cell image gets a probability of ALL from its
detections, scored with the CNNs' :class:`ClassificationMetrics`, so ``val/auroc`` means the same
for both families and drives checkpoints and early stopping alike.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics.detection import MeanAveragePrecision
from torchvision.utils import draw_bounding_boxes

from leukemia_mlops.data.detection import DetectionDataModule, Target
from leukemia_mlops.errors import ConfigError
from leukemia_mlops.labels import ALL, CLASS_NAMES, HEM
from leukemia_mlops.models.backbones import WeightsError, load_backbone_weights
from leukemia_mlops.models.base import DETECTIONS, FineTunedModule, checked_optimizer
from leukemia_mlops.models.metrics import ClassificationMetrics
from leukemia_mlops.models.yolo import (
    YoloConfig,
    YoloV3,
    build,
    decode,
    load_darknet_weights,
    postprocess,
)
from leukemia_mlops.models.yolo.common import conv_layers

TORCH_SUFFIXES = (".pt", ".pth", ".ckpt")
CLASS_COLORS = {ALL: "red", HEM: "lime"}
#: A box scoring above this is a cell found: drawn on overlays and, in ``predict``, written
#: and needed for a single cell's label (``--min-score``).
MIN_BOX_SCORE = 0.25
OVERLAYS = 4  # validation scenes drawn with the predictions of a trained detector
#: The hyperparameters that rebuild the network and decode its output (the served model's).
NETWORK_HPARAMS = (
    "variant",
    "img_size",
    "num_classes",
    "anchors",
    "width_mult",
    "conf_threshold",
    "iou_threshold",
)


def load_weights(net: YoloV3, weights: str) -> None:
    """Initialise the backbone from ``weights``: ``none``; a ``.pt``/``.pth`` state dict or
    ``.ckpt`` checkpoint; otherwise a Darknet file (``.weights``, ``darknet53.conv.74``), of
    which the backbone's convolutions are read (a full ``yolov3.weights`` works too)."""
    if weights == "none":
        return
    path = Path(weights)
    if path.suffix in TORCH_SUFFIXES:
        load_backbone_weights(net.backbone, path)
        return
    if not path.is_file():
        raise WeightsError(f"model.weights: no such file {path}")
    try:
        load_darknet_weights(net, path, cutoff=len(conv_layers(net.backbone)))
    except ValueError as err:
        raise WeightsError(f"model.weights: {err}") from None


def cell_probability(
    outputs: Sequence[Tensor], anchors: Tensor, strides: Sequence[int], conf_threshold: float
) -> Tensor:
    """P(ALL) per image of raw network ``outputs``, for images of one cell (see
    :func:`decoded_cell_probability`)."""
    det = decode([o.detach().float() for o in outputs], anchors, strides)
    return decoded_cell_probability(det, conf_threshold)


def decoded_cell_probability(det: Tensor, conf_threshold: float) -> Tensor:
    """P(ALL) per image of decoded predictions ``[B, N, 5 + C]``: ``s_ALL / (s_ALL + s_HEM)``.

    ``s_c`` is the best score (objectness x probability of class ``c``) that any predicted box
    gives class ``c``, counting only scores above ``conf_threshold`` (the detections'
    threshold); an image where no box passes gets 0.5.
    """
    scores = det[..., 4:5] * det[..., 5:]
    best = scores.masked_fill(scores <= conf_threshold, 0).amax(1)
    total = best[:, ALL] + best[:, HEM]
    return torch.where(total > 0, best[:, ALL] / total.clamp_min(1e-12), 0.5)


class DecodedYolo(nn.Module):
    """The network with box decoding: float images in [0, 1] -> ``[B, N, 5 + C]`` (xyxy pixels,
    objectness, class probabilities), a single tensor, as MLflow model signatures need."""

    def __init__(self, net: YoloV3):
        super().__init__()
        self.net = net

    def forward(self, images: Tensor) -> Tensor:
        return decode(self.net(images), self.net.anchors, self.net.strides)


class CellLogit(nn.Module):
    """A detector as an image-level classifier: float images ``[B, 3, S, S]`` in [0, 1] to the
    logit of :func:`cell_probability`, so a scorer (its sigmoid, its TTA mean of
    probabilities) scores it exactly as it scores a CNN. Images of another side than the
    detector's are resized to it (the cache side equals it in the pipeline)."""

    def __init__(self, detector: YoloDetector):
        super().__init__()
        self.net = detector.net
        self.img_size = int(detector.hparams.img_size)
        self.conf_threshold = float(detector.hparams.conf_threshold)

    def forward(self, images: Tensor) -> Tensor:
        if images.shape[-2:] != (self.img_size, self.img_size):
            size = (self.img_size, self.img_size)
            images = F.interpolate(images, size, mode="bilinear", antialias=True)
        outputs = self.net(images)
        probs = cell_probability(outputs, self.net.anchors, self.net.strides, self.conf_threshold)
        return torch.logit(probs.double()).float()


class YoloDetector(FineTunedModule):
    """YOLOv3 cell detector over uint8 batches ``(images, targets)`` (see ``data.detection``).

    ``anchors`` are (w, h) fractions of ``img_size`` per scale, fine to coarse, so they follow
    the input size (null: the variant's COCO anchors, in pixels). ``loss`` holds
    :class:`YoloConfig`'s loss keys. Hyperparameters are plain values (the optimizer is a
    ``_target_`` mapping) so that checkpoints load with ``torch.load(weights_only=True)``.
    """

    served_output = DETECTIONS

    def __init__(
        self,
        variant: str = "yolov3_tiny",
        img_size: int = 128,
        num_classes: int = 2,
        anchors: list[list[list[float]]] | None = None,
        width_mult: float = 1.0,
        loss: dict[str, Any] | None = None,
        weights: str = "none",
        optimizer: dict[str, Any] | None = None,
        backbone_lr_ratio: float = 1.0,
        scheduler: str = "cosine",
        warmup_epochs: int = 0,
        conf_threshold: float = 0.01,
        iou_threshold: float = 0.5,
        channels_last: bool = True,
        compile: bool | str = False,
        compile_mode: str = "default",
        compile_backend: str = "inductor",
    ):
        super().__init__()
        if num_classes != 2:
            raise ConfigError(f"model.num_classes must be 2 (HEM=0, ALL=1), got {num_classes}")
        optimizer = checked_optimizer(optimizer, backbone_lr_ratio, scheduler)
        self.save_hyperparameters()
        self.hparams.optimizer = optimizer
        if anchors is not None:
            anchors = [[[w * img_size, h * img_size] for w, h in scale] for scale in anchors]
        config = {
            "variant": variant,
            "num_classes": num_classes,
            "img_size": img_size,
            "anchors": anchors,
            "width_mult": width_mult,
            **(loss or {}),
        }
        self.net, self.criterion = build(YoloConfig.from_mapping(config))
        load_weights(self.net, weights)
        if channels_last:  # every layer, the head's reshape included, takes NHWC tensors
            self.net = self.net.to(memory_format=torch.channels_last)
        self.init_metrics(("loss", "box_loss", "obj_loss", "cls_loss"))
        self.val_map = MeanAveragePrecision(iou_type="bbox")

    @classmethod
    def datamodule_from_config(cls, config: Mapping[str, Any]) -> pl.LightningDataModule:
        return DetectionDataModule.from_config(config)

    @classmethod
    def load_trained(cls, checkpoint: str) -> YoloDetector:
        # The initial weights are in the checkpoint already; their file may be gone by now.
        return cls.load_from_checkpoint(
            checkpoint, map_location="cpu", weights_only=True, weights="none"
        )

    @property
    def architecture(self) -> str:
        return self.hparams.variant

    def input_size(self, prepared_size: int) -> int:
        return self.hparams.img_size

    def serving_network(self) -> DecodedYolo:
        return self.predictor()

    def cell_logit_network(self) -> CellLogit:
        return CellLogit(self)

    def network_settings(self) -> dict[str, Any]:
        return {key: self.hparams[key] for key in NETWORK_HPARAMS}

    @classmethod
    def from_network_settings(cls, settings: Mapping[str, Any]) -> YoloDetector:
        return cls(**settings, channels_last=False)

    def validation_overlays(self, datamodule: pl.LightningDataModule) -> list[np.ndarray]:
        return self.draw_predictions(*datamodule.overlay_batch(OVERLAYS))

    def forward(self, images: Tensor) -> list[Tensor]:
        return self.net(images)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        images, targets = batch
        memory_format = torch.channels_last if self.hparams.channels_last else torch.preserve_format
        return images.to(torch.float32, memory_format=memory_format).div_(255), targets

    def training_step(self, batch: tuple[Tensor, list[Target]], batch_idx: int) -> Tensor:
        images, targets = batch
        outputs = self(images)
        loss, parts = self.criterion(outputs, targets)
        self.train_losses["loss"].update(loss.detach(), len(targets))
        for name, value in parts.items():
            self.train_losses[f"{name}_loss"].update(value, len(targets))
        self._update_cells(outputs, targets, self.train_metrics)
        return loss

    def validation_step(self, batch: tuple[Tensor, list[Target]], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def _evaluate(self, batch: tuple[Tensor, list[Target]], stage: str) -> None:
        images, targets = batch
        outputs = self(images)
        loss, _ = self.criterion(outputs, targets)
        self.eval_losses[stage].update(loss, len(targets))
        self.log(f"{stage}/loss", self.eval_losses[stage], on_epoch=True)
        outputs = [o.float() for o in outputs]
        detections = postprocess(
            outputs,
            self.net.anchors,
            self.net.strides,
            self.hparams.conf_threshold,
            self.hparams.iou_threshold,
        )
        truth = [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]
        getattr(self, f"{stage}_map").update(detections, truth)
        metrics = getattr(self, f"{stage}_metrics")
        self._update_cells(outputs, targets, metrics)
        for collection in metrics.collections():
            self.log_dict(collection, on_epoch=True)

    def _update_cells(
        self, outputs: list[Tensor], targets: list[Target], metrics: ClassificationMetrics
    ) -> None:
        """Score the single-cell images of a batch (scenes have ``image_label`` -1)."""
        labels = torch.stack([t["image_label"] for t in targets])
        count = int((labels >= 0).sum())  # the one host-device sync: a mask would cost two
        if count:
            cells = torch.nonzero_static(labels >= 0, size=count).squeeze(1)
            probs = cell_probability(
                outputs, self.net.anchors, self.net.strides, self.hparams.conf_threshold
            )
            metrics.update(probs[cells], labels[cells])

    def _log_map(self, stage: str) -> None:
        metric = getattr(self, f"{stage}_map")
        result = metric.compute()
        metric.reset()
        self.log_dict({f"{stage}/map": result["map"], f"{stage}/map_50": result["map_50"]})

    def on_validation_epoch_end(self) -> None:
        self._log_map("val")
        super().on_validation_epoch_end()

    def predictor(self) -> DecodedYolo:
        """The network with decoding, for serving (see :func:`log_classifier`)."""
        return DecodedYolo(self.net)

    @torch.no_grad()
    def draw_predictions(
        self, images: Tensor, targets: list[Target], min_score: float = MIN_BOX_SCORE
    ) -> list[np.ndarray]:
        """uint8 images ``[B, 3, H, W]`` as HWC arrays with the true boxes (white) and the
        detections scoring at least ``min_score`` (ALL red, HEM green, with their scores)."""
        self.eval()
        outputs = self(images.to(self.device).float().div(255))
        detections = postprocess(
            outputs, self.net.anchors, self.net.strides, min_score, self.hparams.iou_threshold
        )
        drawn = []
        for image, target, found in zip(images.cpu(), targets, detections, strict=True):
            if len(target["boxes"]):
                image = draw_bounding_boxes(image, target["boxes"].cpu(), colors="white")
            labels = found["labels"].tolist()
            if labels:
                names = [
                    f"{CLASS_NAMES[label]} {score:.2f}"
                    for label, score in zip(labels, found["scores"].tolist(), strict=True)
                ]
                colors = [CLASS_COLORS[label] for label in labels]
                image = draw_bounding_boxes(image, found["boxes"].cpu(), names, colors, width=2)
            drawn.append(image.permute(1, 2, 0).numpy())
        return drawn
