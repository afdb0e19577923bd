"""Darknet-53 and the YOLOv3-tiny backbone.

Both return feature maps ordered fine to coarse and register their layers in the order of
Darknet's ``yolov3.cfg`` / ``yolov3-tiny.cfg``, so ``darknet53.conv.74`` loads into
:class:`Darknet53` as-is.
"""

from __future__ import annotations

from torch import Tensor, nn

from leukemia_mlops.models.yolo.common import ConvBNAct, scale_channels

DARKNET53_STAGES = (1, 2, 8, 8, 4)  # residual blocks per stride-2 stage


class Residual(nn.Module):
    """Darknet-53 residual block: 1x1 squeeze to half the channels, 3x3 back, add the input."""

    def __init__(self, channels: int):
        super().__init__()
        hidden = max(1, channels // 2)
        self.squeeze = ConvBNAct(channels, hidden, 1)
        self.expand = ConvBNAct(hidden, channels, 3)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.expand(self.squeeze(x))


class Darknet53(nn.Module):
    """Darknet-53 without its classifier: 52 convolutions, returns C3, C4, C5 (strides 8/16/32)."""

    strides = (8, 16, 32)

    def __init__(self, width_mult: float = 1.0):
        super().__init__()
        channels = scale_channels(32, width_mult)
        self.stem = ConvBNAct(3, channels, 3)
        stages = []
        for depth in DARKNET53_STAGES:
            out = channels * 2
            stages.append(
                nn.Sequential(
                    ConvBNAct(channels, out, 3, 2), *(Residual(out) for _ in range(depth))
                )
            )
            channels = out
        self.stages = nn.ModuleList(stages)
        self.out_channels = [channels // 4, channels // 2, channels]

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.stem(x)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features[2:]


class DarknetTiny(nn.Module):
    """YOLOv3-tiny backbone: 7 conv/max-pool layers, returns features at strides 16 and 32."""

    strides = (16, 32)

    def __init__(self, width_mult: float = 1.0):
        super().__init__()
        widths = [scale_channels(c, width_mult) for c in (16, 32, 64, 128, 256, 512, 1024)]
        layers: list[nn.Module] = []
        in_channels = 3
        for out in widths[:5]:
            layers += [ConvBNAct(in_channels, out, 3), nn.MaxPool2d(2, 2)]
            in_channels = out
        # Drop the last pool: its output (stride 16, before pooling) is the C4 route.
        self.stride16 = nn.Sequential(*layers[:-1])
        self.stride32 = nn.Sequential(
            nn.MaxPool2d(2, 2),
            ConvBNAct(widths[4], widths[5], 3),
            # Darknet's size-2 stride-1 max-pool pads right/bottom; replicating the edge gives
            # the same maxima as its -inf padding and keeps the map size.
            nn.ReplicationPad2d((0, 1, 0, 1)),
            nn.MaxPool2d(2, 1),
            ConvBNAct(widths[5], widths[6], 3),
        )
        self.out_channels = [widths[4], widths[6]]

    def forward(self, x: Tensor) -> list[Tensor]:
        c4 = self.stride16(x)
        return [c4, self.stride32(c4)]
