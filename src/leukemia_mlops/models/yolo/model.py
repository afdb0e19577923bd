"""The YOLOv3 detector: backbone -> feature pyramid -> per-scale prediction convs."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from leukemia_mlops.models.yolo.common import ConvLayer, conv_layers
from leukemia_mlops.models.yolo.head import YoloHead
from leukemia_mlops.models.yolo.neck import YoloFPN


class YoloV3(nn.Module):
    """Returns raw per-scale maps ``[B, A, H/s, W/s, 5 + C]``, fine to coarse.

    Decoding stays out of ``forward`` so the ONNX graph is plain convolutions; use
    :func:`~leukemia_mlops.models.yolo.postprocess.postprocess` with ``anchors`` and ``strides``.
    Input height and width must be multiples of the largest stride.
    """

    def __init__(
        self,
        backbone: nn.Module,
        neck: YoloFPN,
        head: YoloHead,
        anchors: Tensor,
        strides: Sequence[int],
    ):
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.head = head
        self.register_buffer("anchors", anchors)  # [scales, anchors per scale, 2] (w, h) pixels
        self.strides = tuple(strides)
        self.num_classes = head.num_classes

    def forward(self, images: Tensor) -> list[Tensor]:
        return self.head(self.neck(self.backbone(images)))

    def darknet_layers(self) -> list[ConvLayer]:
        """Convolutions in Darknet cfg order: backbone, then per scale from the coarsest: conv
        set, 3x3 output conv, prediction conv, lateral 1x1 conv to the next finer scale."""
        layers = conv_layers(self.backbone)
        for level in reversed(range(len(self.strides))):
            layers += conv_layers(self.neck.blocks[level]) + conv_layers(self.neck.outs[level])
            layers += conv_layers(self.head.preds[level])
            if level:
                layers += conv_layers(self.neck.laterals[level - 1])
        return layers
