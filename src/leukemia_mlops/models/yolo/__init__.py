"""YOLOv3 and YOLOv3-tiny in plain PyTorch: model, loss, decoding/NMS and Darknet weights I/O."""

from leukemia_mlops.models.yolo.backbone import Darknet53, DarknetTiny
from leukemia_mlops.models.yolo.build import VARIANTS, YoloConfig, build
from leukemia_mlops.models.yolo.darknet_weights import (
    DarknetHeader,
    load_darknet_weights,
    save_darknet_weights,
)
from leukemia_mlops.models.yolo.loss import YoloLoss
from leukemia_mlops.models.yolo.model import YoloV3
from leukemia_mlops.models.yolo.postprocess import decode, postprocess
from leukemia_mlops.models.yolo.profile import count_flops, count_params

__all__ = [
    "VARIANTS",
    "Darknet53",
    "DarknetHeader",
    "DarknetTiny",
    "YoloConfig",
    "YoloLoss",
    "YoloV3",
    "build",
    "count_flops",
    "count_params",
    "decode",
    "load_darknet_weights",
    "postprocess",
    "save_darknet_weights",
]
