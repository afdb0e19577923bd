"""Top-down feature pyramid of YOLOv3 (three scales) and YOLOv3-tiny (two scales)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from leukemia_mlops.models.yolo.common import ConvBNAct


def conv_set(in_channels: int, width: int, depth: int) -> nn.Sequential:
    """``depth`` convs alternating 1x1 (``width``) and 3x3 (``2 * width``), starting with 1x1.

    YOLOv3 uses five per scale; the tiny model one at the coarse scale and none at the fine one.
    """
    layers = []
    for i in range(depth):
        out = width if i % 2 == 0 else 2 * width
        layers.append(ConvBNAct(in_channels, out, 1 if i % 2 == 0 else 3))
        in_channels = out
    return nn.Sequential(*layers)


class YoloFPN(nn.Module):
    """YOLOv3 neck: from the coarsest map down, conv set -> 3x3 output conv, and a 1x1 lateral
    conv + 2x upsample concatenated with the next finer backbone map.

    All lists are indexed fine to coarse, like the backbone features; ``laterals[i]`` carries
    level ``i + 1`` down to level ``i``. Output ``i`` has ``2 * widths[i]`` channels.
    """

    def __init__(self, in_channels: Sequence[int], widths: Sequence[int], depths: Sequence[int]):
        super().__init__()
        if not len(in_channels) == len(widths) == len(depths):
            raise ValueError("in_channels, widths and depths need one entry per scale")
        blocks, outs, laterals = [], [], []
        for level, (channels, width, depth) in enumerate(
            zip(in_channels, widths, depths, strict=True)
        ):
            if level + 1 < len(widths):
                channels += widths[level]  # the lateral from the coarser level is concatenated
            blocks.append(conv_set(channels, width, depth))
            block_out = width if depth else channels
            outs.append(ConvBNAct(block_out, 2 * width, 3))
            if level:
                laterals.append(
                    nn.Sequential(
                        ConvBNAct(block_out, widths[level - 1], 1), nn.Upsample(scale_factor=2)
                    )
                )
        self.blocks = nn.ModuleList(blocks)
        self.outs = nn.ModuleList(outs)
        self.laterals = nn.ModuleList(laterals)
        self.out_channels = [2 * w for w in widths]

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        outputs: list[Tensor] = []
        x = None
        for level in reversed(range(len(features))):
            x = features[level] if x is None else torch.cat([x, features[level]], 1)
            x = self.blocks[level](x)
            outputs.insert(0, self.outs[level](x))
            if level:
                x = self.laterals[level - 1](x)
        return outputs
