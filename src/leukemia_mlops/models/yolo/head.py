"""Per-scale 1x1 prediction convolutions of YOLOv3."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn

OBJECTNESS_PRIOR = 0.01  # initial objectness probability, so untrained models start near-empty


class YoloHead(nn.Module):
    """One biased 1x1 conv per scale to ``num_anchors * (5 + num_classes)`` channels.

    Channels are grouped per anchor as ``x, y, w, h, objectness, classes...`` (Darknet's
    ``[yolo]`` layout), reshaped to ``[B, A, H, W, 5 + C]`` without any decoding.
    """

    def __init__(self, in_channels: Sequence[int], num_anchors: int, num_classes: int):
        super().__init__()
        self.num_anchors = num_anchors
        self.num_classes = num_classes
        outputs = num_anchors * (5 + num_classes)
        self.preds = nn.ModuleList(nn.Conv2d(c, outputs, 1) for c in in_channels)
        for pred in self.preds:
            nn.init.normal_(pred.weight, std=0.01)
            bias = pred.bias.detach().view(num_anchors, 5 + num_classes)
            bias.zero_()
            # Without this prior the ~10k background cells swamp the first updates.
            bias[:, 4] = -math.log((1 - OBJECTNESS_PRIOR) / OBJECTNESS_PRIOR)

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        outputs = []
        for pred, x in zip(self.preds, features, strict=True):
            y = pred(x)
            b, _, h, w = y.shape
            y = y.view(b, self.num_anchors, 5 + self.num_classes, h, w)
            outputs.append(y.permute(0, 1, 3, 4, 2).contiguous())
        return outputs
