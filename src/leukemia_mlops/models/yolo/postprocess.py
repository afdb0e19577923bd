"""Decode raw YOLOv3 maps to boxes and run class-aware NMS.

A cell ``(i, j)`` of a stride-``s`` map with anchor ``(a_w, a_h)`` and logits
``(t_x, t_y, t_w, t_h)`` decodes (as in Darknet) to the centre
``((sigmoid(t_x) + i) * s, (sigmoid(t_y) + j) * s)`` and size ``(a_w * exp(t_w), a_h * exp(t_h))``
in input pixels; objectness and classes are independent sigmoids.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.ops import batched_nms

# Caps exp(t_w), exp(t_h) at 62.5x the anchor (Detectron's choice) so early, wild logits give
# large but finite boxes instead of inf/NaN in IoU losses and NMS.
MAX_LOG_SCALE = math.log(1000.0 / 16)


def decode_boxes(raw: Tensor, anchors: Tensor, stride: int) -> Tensor:
    """Boxes ``[B, A, H, W, 4]`` (xyxy, input pixels) of one raw map ``[B, A, H, W, 5 + C]``."""
    _, _, h, w, _ = raw.shape
    # Cell indices counted on the input itself: torch.arange would need device=, which
    # tracing and torch.export record as a constant, pinning the exported graph to one device.
    ys = raw.new_ones(h).cumsum(0) - 1
    xs = raw.new_ones(w).cumsum(0) - 1
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1)  # [H, W, 2] as (x, y)
    centre = (raw[..., :2].sigmoid() + grid) * stride
    if anchors.dtype != raw.dtype:  # a no-op .to() would still leave a device check in export
        anchors = anchors.to(raw.dtype)
    size = anchors.view(1, -1, 1, 1, 2) * raw[..., 2:4].clamp(max=MAX_LOG_SCALE).exp()
    return torch.cat([centre - size / 2, centre + size / 2], -1)


def decode(outputs: Sequence[Tensor], anchors: Tensor, strides: Sequence[int]) -> Tensor:
    """All predictions as ``[B, N, 5 + C]``: xyxy pixels, objectness prob, class probs."""
    decoded = []
    for raw, scale_anchors, stride in zip(outputs, anchors, strides, strict=True):
        boxes = decode_boxes(raw, scale_anchors, stride)
        scores = raw[..., 4:].sigmoid()
        decoded.append(torch.cat([boxes, scores], -1).flatten(1, 3))
    return torch.cat(decoded, 1)


def select_detections(
    det: Tensor, conf_threshold: float, iou_threshold: float, max_detections: int = 100
) -> dict[str, Tensor]:
    """One image's decoded predictions ``[N, 5 + C]`` as ``{"boxes": [K, 4] xyxy, "scores":
    [K], "labels": [K] int64}``, best first.

    Each box keeps its most likely class; score = objectness * that class's probability; boxes
    scoring ``conf_threshold`` or less are dropped. NMS is per class, so a cell is not
    suppressed by an overlapping cell of the other class.
    """
    class_prob, labels = det[:, 5:].max(1)
    scores = det[:, 4] * class_prob
    keep = scores > conf_threshold
    boxes, scores, labels = det[keep, :4], scores[keep], labels[keep]
    keep = batched_nms(boxes, scores, labels, iou_threshold)[:max_detections]
    return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}


@torch.no_grad()
def postprocess(
    outputs: Sequence[Tensor],
    anchors: Tensor,
    strides: Sequence[int],
    conf_threshold: float = 0.01,
    iou_threshold: float = 0.5,
    max_detections: int = 100,
) -> list[dict[str, Tensor]]:
    """:func:`select_detections` of every image of raw network ``outputs``."""
    return [
        select_detections(det, conf_threshold, iou_threshold, max_detections)
        for det in decode(outputs, anchors, strides)
    ]
