"""Read and write Darknet ``.weights`` files.

File layout: an int32 header ``major, minor, revision``, then ``seen`` (images trained on) as
int64 when ``major * 10 + minor >= 2``, else int32; then little-endian float32 values, layer by
layer. A conv with batch norm stores BN bias, BN weight, running mean, running var, then the conv
weight; a conv without BN stores its bias, then its weight.

Layer order: ``module.darknet_layers()`` when the module has it (:class:`YoloV3` follows the
order of Darknet's ``yolov3.cfg`` / ``yolov3-tiny.cfg``: backbone, then from the coarsest scale
down: conv set, 3x3 output conv, 1x1 prediction conv, 1x1 lateral conv), otherwise every conv of
the module in registration order (the backbones are registered in Darknet order, so
``darknet53.conv.74`` loads into ``Darknet53`` directly, or into ``YoloV3`` with ``cutoff=52``).
``cutoff`` counts convolutions, not Darknet layer indices.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from leukemia_mlops.errors import InputError, MissingInputError
from leukemia_mlops.models.yolo.common import ConvLayer, conv_layers

SAVE_VERSION = (0, 2, 0)  # what Darknet itself writes today: int64 "seen"


@dataclass(frozen=True)
class DarknetHeader:
    """The version and training-progress header of a ``.weights`` file."""

    major: int
    minor: int
    revision: int
    seen: int


def darknet_layers(module: nn.Module, cutoff: int | None = None) -> list[ConvLayer]:
    """The first ``cutoff`` (default: all) convolutions of ``module`` in Darknet order."""
    order = getattr(module, "darknet_layers", None)
    layers = order() if callable(order) else conv_layers(module)
    if cutoff is not None and not 0 <= cutoff <= len(layers):
        raise ValueError(f"cutoff must lie in [0, {len(layers)}], got {cutoff}")
    return layers[:cutoff]


def _layer_tensors(layers: list[ConvLayer]) -> list[Tensor]:
    tensors = []
    for conv, bn in layers:
        if bn is None:
            tensors += [conv.bias, conv.weight]
        else:
            tensors += [bn.bias, bn.weight, bn.running_mean, bn.running_var, conv.weight]
    return tensors


def _parse(path: Path) -> tuple[DarknetHeader, np.ndarray]:
    """Header and float32 body of a ``.weights`` file."""
    data = bytearray(path.read_bytes())  # writable, so torch.from_numpy accepts views of it
    # A file shorter than the version fields is padded here and rejected by the size check.
    major, minor, revision = (int(v) for v in np.frombuffer(data[:12].ljust(12, b"\0"), "<i4"))
    start = 12 + (8 if major * 10 + minor >= 2 else 4)
    if len(data) < start or (len(data) - start) % 4:
        raise InputError(f"{path} is not a Darknet weights file ({len(data)} bytes)")
    seen = int.from_bytes(data[12:start], "little")
    return DarknetHeader(major, minor, revision, seen), np.frombuffer(data, "<f4", offset=start)


def load_darknet_weights(
    module: nn.Module, path: str | Path, cutoff: int | None = None
) -> DarknetHeader:
    """Load a ``.weights`` file into ``module`` in place and return its header.

    Without ``cutoff`` the file must hold exactly the module's values; with it, at least those
    of the first ``cutoff`` convs (a longer file, e.g. full ``yolov3.weights``, gives the
    backbone). Nothing is written to the module if the sizes do not fit.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"Darknet weights file not found: {path}")
    tensors = _layer_tensors(darknet_layers(module, cutoff))
    header, values = _parse(path)
    expected = sum(t.numel() for t in tensors)
    if len(values) < expected or (cutoff is None and len(values) != expected):
        convs = "all convs" if cutoff is None else f"the first {cutoff} convs"
        raise InputError(
            f"{path} holds {len(values)} float32 values after its header; "
            f"{convs} of the model need {expected}"
        )
    offset = 0
    with torch.no_grad():
        for t in tensors:
            t.copy_(torch.from_numpy(values[offset : offset + t.numel()]).view_as(t))
            offset += t.numel()
    return header


def save_darknet_weights(module: nn.Module, path: str | Path, cutoff: int | None = None) -> None:
    """Write the first ``cutoff`` (default: all) convs of ``module`` as a Darknet file."""
    tensors = _layer_tensors(darknet_layers(module, cutoff))
    with Path(path).open("wb") as f:
        np.array(SAVE_VERSION, dtype="<i4").tofile(f)
        np.array([0], dtype="<i8").tofile(f)
        for t in tensors:
            t.detach().to("cpu", torch.float32).numpy().astype("<f4", copy=False).tofile(f)
