"""Build a YOLOv3 / YOLOv3-tiny detector and its loss from a plain config."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from leukemia_mlops.errors import ConfigError
from leukemia_mlops.models.yolo.backbone import Darknet53, DarknetTiny
from leukemia_mlops.models.yolo.common import scale_channels
from leukemia_mlops.models.yolo.head import YoloHead
from leukemia_mlops.models.yolo.loss import YoloLoss
from leukemia_mlops.models.yolo.model import YoloV3
from leukemia_mlops.models.yolo.neck import YoloFPN

Anchors = tuple[tuple[tuple[float, float], ...], ...]  # per scale, fine to coarse: (w, h) pixels


@dataclass(frozen=True)
class _Variant:
    backbone: type[Darknet53] | type[DarknetTiny]
    neck_widths: tuple[int, ...]  # 1x1 width of each scale's conv set, fine to coarse
    neck_depths: tuple[int, ...]  # convs in each scale's conv set
    anchors: Anchors  # Darknet's COCO anchors for a 416 px input


VARIANTS = {
    "yolov3": _Variant(
        Darknet53,
        (128, 256, 512),
        (5, 5, 5),
        (
            ((10, 13), (16, 30), (33, 23)),
            ((30, 61), (62, 45), (59, 119)),
            ((116, 90), (156, 198), (373, 326)),
        ),
    ),
    "yolov3_tiny": _Variant(
        DarknetTiny,
        (128, 256),
        (0, 1),
        (((10, 14), (23, 27), (37, 58)), ((81, 82), (135, 169), (344, 319))),
    ),
}


@dataclass(frozen=True)
class YoloConfig:
    """Detector and loss settings; invalid values raise ``ValueError`` naming the key.

    ``anchors`` defaults to the variant's COCO anchors, used as-is (Darknet does not rescale
    them with the input size). ``img_size`` is the training/export input size; the network
    itself accepts any multiple of 32. Loss keys are passed to :class:`YoloLoss`.
    """

    variant: str = "yolov3"
    num_classes: int = 2
    img_size: int = 416
    anchors: Sequence[Sequence[Sequence[float]]] | None = None
    width_mult: float = 1.0
    box_loss: str = "giou"
    box_weight: float = 5.0
    obj_weight: float = 1.0
    cls_weight: float = 1.0
    ignore_threshold: float = 0.5
    anchor_threshold: float | None = None

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ConfigError(f"variant must be one of {sorted(VARIANTS)}, got {self.variant!r}")
        if not _is_int(self.num_classes) or self.num_classes < 1:
            raise ConfigError(f"num_classes must be an integer >= 1, got {self.num_classes!r}")
        if not _is_int(self.img_size) or self.img_size <= 0 or self.img_size % 32:
            raise ConfigError(f"img_size must be a positive multiple of 32, got {self.img_size!r}")
        if not self.width_mult > 0:
            raise ConfigError(f"width_mult must be > 0, got {self.width_mult!r}")
        variant = VARIANTS[self.variant]
        anchors = variant.anchors if self.anchors is None else self.anchors
        object.__setattr__(self, "anchors", _check_anchors(anchors, len(variant.neck_widths)))

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> YoloConfig:
        """Config from a dict or OmegaConf ``DictConfig``; unknown keys are an error."""
        known = {field.name for field in dataclasses.fields(cls)}
        for key in cfg:
            if key not in known:
                raise ConfigError(
                    f"unknown YOLO config key {key!r}; expected one of {sorted(known)}"
                )
        return cls(**{key: cfg[key] for key in cfg})


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_anchors(anchors: Sequence[Sequence[Sequence[float]]], num_scales: int) -> Anchors:
    try:
        pairs = tuple(tuple((float(w), float(h)) for w, h in scale) for scale in anchors)
    except (TypeError, ValueError):
        raise ConfigError(
            f"anchors must be lists of (w, h) pairs per scale, got {anchors!r}"
        ) from None
    if len(pairs) != num_scales:
        raise ConfigError(f"anchors needs {num_scales} scales for this variant, got {len(pairs)}")
    if not pairs[0] or any(len(scale) != len(pairs[0]) for scale in pairs):
        raise ConfigError(f"anchors needs the same, non-zero number per scale, got {anchors!r}")
    if any(v <= 0 for scale in pairs for pair in scale for v in pair):
        raise ConfigError(f"anchors must be positive, got {anchors!r}")
    return pairs


def build(cfg: YoloConfig | Mapping[str, Any] | None = None) -> tuple[YoloV3, YoloLoss]:
    """``(model, criterion)`` for ``cfg`` (defaults: YOLOv3, 2 classes, 416 px)."""
    if cfg is None:
        cfg = YoloConfig()
    elif not isinstance(cfg, YoloConfig):
        cfg = YoloConfig.from_mapping(cfg)
    variant = VARIANTS[cfg.variant]
    anchors = torch.tensor(cfg.anchors, dtype=torch.float32)
    criterion = YoloLoss(  # first, so bad loss settings fail before a large model is built
        anchors,
        variant.backbone.strides,
        cfg.num_classes,
        box_loss=cfg.box_loss,
        box_weight=cfg.box_weight,
        obj_weight=cfg.obj_weight,
        cls_weight=cfg.cls_weight,
        ignore_threshold=cfg.ignore_threshold,
        anchor_threshold=cfg.anchor_threshold,
    )
    backbone = variant.backbone(cfg.width_mult)
    widths = [scale_channels(w, cfg.width_mult) for w in variant.neck_widths]
    neck = YoloFPN(backbone.out_channels, widths, variant.neck_depths)
    head = YoloHead(neck.out_channels, anchors.shape[1], cfg.num_classes)
    return YoloV3(backbone, neck, head, anchors.clone(), backbone.strides), criterion
