"""Shipping a trained model: ONNX export with a parity check against PyTorch.

The export uses torch's TorchScript-based exporter (``dynamo=False``): the torch.export-based
one needs ``onnxscript``, which is not a dependency, and the TorchScript exporter covers these
CNNs and YOLOv3 completely, offline. A classifier's graph is ``CellClassifierNet``: float
``images [N,3,S,S]`` in [0, 1] -> ``logit_all [N]``, normalisation included. A detector's is
``DecodedYolo``: ``images`` -> ``detections [N,B,5+C]`` (xyxy pixels, objectness, class
probabilities) for one input side; its ``conf_threshold`` and ``iou_threshold`` travel in the
metadata, and NMS runs outside the graph. The decision threshold chosen on validation, when
known, travels in the metadata too (``validated_threshold``), with the temperature and the
conformal quantiles fitted there (``temperature``, ``conformal_quantile_<class>``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from leukemia_mlops.data.images import CELL_THRESHOLD
from leukemia_mlops.data.prepare import IMAGES_FILE
from leukemia_mlops.data.scenes import SceneSpec, choose_cells, compose_scene, crop_cell
from leukemia_mlops.errors import ConfigError, InputError, MissingInputError
from leukemia_mlops.inference.calibrated import Calibration
from leukemia_mlops.inference.detection import THRESHOLD_KEYS, Letterbox
from leukemia_mlops.inference.loading import ONNX_THRESHOLD_KEY, Validated, load_module
from leukemia_mlops.inference.scorers import (
    OnnxNetwork,
    OnnxScorer,
    TorchNetwork,
    TorchScorer,
    to_network_input,
)
from leukemia_mlops.models.base import CELL_LOGIT, DETECTIONS, FineTunedModule, class_path

OPSET = 17
PARITY_TOLERANCE = 1e-4
INPUT_NAME, OUTPUT_NAME, DETECTIONS_NAME = "images", "logit_all", "detections"


class ParityError(ValueError):
    """The exported model's probabilities differ from PyTorch's beyond the tolerance."""


def parity_images(prepared_dir: str | Path | None, image_size: int, count: int) -> np.ndarray:
    """Real cells spread over the prepare cache, else seeded random pixels, uint8 ``[N,S,S,3]``.

    Real cells exercise the value ranges the model meets in use, which random noise does not.
    """
    if prepared_dir is None:
        rng = np.random.default_rng(0)
        return rng.integers(0, 256, (count, image_size, image_size, 3), dtype=np.uint8)
    cache = np.load(Path(prepared_dir) / IMAGES_FILE, mmap_mode="r")
    if cache.shape[1] != image_size:
        raise InputError(f"the prepare cache holds {cache.shape[1]} px images, not {image_size}")
    rows = np.unique(np.linspace(0, len(cache) - 1, count).astype(np.int64))
    return np.asarray(cache[rows])


def detector_parity_images(
    prepared_dir: str | Path | None, img_size: int, count: int
) -> np.ndarray:
    """Inputs of a detector's parity check, uint8 ``[N, S, S, 3]`` letterboxed to ``img_size``:
    cells of the prepare cache and scenes composed from them (a quarter), else random pixels."""
    if prepared_dir is None:
        return parity_images(None, img_size, count)
    cache = np.load(Path(prepared_dir) / IMAGES_FILE, mmap_mode="r")
    cells = parity_images(prepared_dir, cache.shape[1], count - count // 4)
    rng = np.random.default_rng(0)
    pool = [crop_cell(cell, 0, "parity") for cell in cells if cell.max() > CELL_THRESHOLD]
    scenes = [
        compose_scene(
            [pool[i] for i in choose_cells(len(pool), rng, SceneSpec())], rng, SceneSpec()
        )
        for _ in range(count // 4)
    ]
    letterbox = Letterbox(img_size)
    return np.stack([letterbox(image)[0] for image in [*cells, *(s.image for s in scenes)]])


def export_onnx(
    checkpoint: str | Path,
    out_path: str | Path,
    image_size: int | None,
    prepared_dir: str | Path | None = None,
    n_images: int = 32,
    tolerance: float = PARITY_TOLERANCE,
    threshold: float | None = None,
    default_size: int | None = None,
    calibration: Calibration | None = None,
) -> dict[str, Any]:
    """Export the checkpoint's network to ONNX (any batch size) and check it against PyTorch.

    The checkpoint names its module class, whose ``served_output`` picks what is exported
    (:data:`EXPORT_TARGETS`). A classifier's graph maps ``images`` to ``logit_all``; a
    detector's maps them to decoded ``detections`` ``[N, boxes, 5 + C]``, with its thresholds
    in the metadata (NMS runs outside, see ``inference.detection``). ``image_size`` is the
    classifier's input side (None: ``default_size``); a detector declares its own (None, or
    the same). The check runs ``n_images`` real images through both runtimes (in one batch of
    another size than the export's example, so the dynamic batch axis is exercised too): a
    value differing by more than ``tolerance`` (probabilities, and for a detector box
    coordinates as fractions of the input side) removes the file and raises
    :class:`ParityError`. ``threshold`` (the checkpoint's validated one) goes in the metadata,
    with its ``calibration`` where known.
    """
    if threshold is not None and not 0 <= threshold <= 1:
        raise ConfigError(f"threshold must be in [0, 1], got {threshold}")
    if prepared_dir is not None and not Path(prepared_dir).is_dir():
        raise MissingInputError(f"no prepare cache at {prepared_dir} for the parity check")
    module = load_module(checkpoint)
    make_target = EXPORT_TARGETS[module.served_output]
    target = make_target(module, image_size, default_size, prepared_dir, n_images)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    known = {} if threshold is None else Validated(threshold, calibration).onnx_metadata()
    metadata = {**target.metadata, ONNX_THRESHOLD_KEY: threshold, **known}
    _write_onnx(target.net, target.size, target.output, out_path, metadata)
    max_abs_diff = float(np.abs(target.reference - target.compare(out_path)).max())
    if not max_abs_diff <= tolerance:
        out_path.unlink()
        raise ParityError(
            f"ONNX outputs differ from PyTorch by {max_abs_diff:.2e} (> {tolerance:.0e}) "
            f"on {len(target.images)} images; the export was removed"
        )
    return {
        "path": str(out_path),
        "module": class_path(type(module)),
        "image_size": target.size,
        "opset": OPSET,
        "parity_images": len(target.images),
        "parity_source": "random" if prepared_dir is None else "prepare cache",
        "max_abs_diff": max_abs_diff,
        "tolerance": tolerance,
        **metadata,
    }


@dataclass(frozen=True)
class _Target:
    """What to export and how to check it: the network, its input side and output name, the
    parity images, PyTorch's values on them, and how to compute those from the ONNX file."""

    net: nn.Module
    size: int
    output: str
    images: np.ndarray
    reference: np.ndarray
    compare: Callable[[Path], np.ndarray]
    metadata: dict[str, Any]


def _classifier_target(
    module: FineTunedModule,
    image_size: int | None,
    default_size: int | None,
    prepared_dir: str | Path | None,
    count: int,
) -> _Target:
    image_size = default_size if image_size is None else image_size
    if image_size is None or image_size < 1:
        raise ConfigError(f"image size must be positive, got {image_size}")
    scorer = TorchScorer(module.serving_network(), device="cpu")
    images = parity_images(prepared_dir, image_size, count)
    return _Target(
        scorer.net,
        image_size,
        OUTPUT_NAME,
        images,
        scorer(images),
        lambda path: OnnxScorer(path)(images),
        {},
    )


def _detector_target(
    detector: FineTunedModule,
    image_size: int | None,
    default_size: int | None,
    prepared_dir: str | Path | None,
    count: int,
) -> _Target:
    """A detector's graph at its own input side (``default_size`` does not apply)."""
    size = int(detector.hparams.img_size)
    if image_size not in (None, size):
        raise ConfigError(f"the model is a detector of {size} px inputs, not {image_size}")
    network = TorchNetwork(detector.serving_network(), device="cpu")
    images = detector_parity_images(prepared_dir, size, count)
    batch = to_network_input(images)

    def comparable(decoded: np.ndarray) -> np.ndarray:
        """Boxes as fractions of the input side, beside the probabilities."""
        return np.concatenate([decoded[..., :4] / size, decoded[..., 4:]], -1)

    settings = {key: detector.hparams[key] for key in THRESHOLD_KEYS}
    return _Target(
        network.net,
        size,
        DETECTIONS_NAME,
        images,
        comparable(network(batch)),
        lambda path: comparable(OnnxNetwork(path)(batch)),
        settings,
    )


#: What is exported and checked, by the module class's ``served_output``.
EXPORT_TARGETS: dict[str, Callable[..., _Target]] = {
    CELL_LOGIT: _classifier_target,
    DETECTIONS: _detector_target,
}


def _write_onnx(
    net: nn.Module, size: int, output: str, path: Path, metadata: dict[str, Any]
) -> None:
    """Export ``net`` (float ``[batch, 3, size, size]`` input) with its metadata (None values
    left out) and check the file."""
    import onnx

    torch.onnx.export(
        net,
        (torch.zeros(2, 3, size, size),),
        str(path),
        dynamo=False,
        opset_version=OPSET,
        input_names=[INPUT_NAME],
        output_names=[output],
        dynamic_axes={INPUT_NAME: {0: "batch"}, output: {0: "batch"}},
    )
    props = {key: repr(value) for key, value in metadata.items() if value is not None}
    if props:
        model = onnx.load(str(path))
        onnx.helper.set_model_props(model, props)
        onnx.save(model, str(path))
    onnx.checker.check_model(str(path))
