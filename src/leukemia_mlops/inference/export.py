"""Shipping a trained classifier: ONNX export with a parity check against PyTorch.

The export uses torch's TorchScript-based exporter (``dynamo=False``): the torch.export-based
one needs ``onnxscript``, which is not a dependency, and the TorchScript exporter covers these
CNNs completely, offline. The ONNX graph is ``CellClassifierNet``: float ``images [N,3,S,S]``
in [0, 1] -> ``logit_all [N]``, normalisation included. The decision threshold chosen on
validation, when known, travels in the model's metadata (``validated_threshold``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from leukemia_mlops.data.prepare import IMAGES_FILE
from leukemia_mlops.errors import ConfigError, InputError, MissingInputError
from leukemia_mlops.inference.loading import ONNX_THRESHOLD_KEY, load_classifier
from leukemia_mlops.inference.scorers import OnnxScorer, TorchScorer

OPSET = 17
PARITY_TOLERANCE = 1e-4
INPUT_NAME, OUTPUT_NAME = "images", "logit_all"


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


def export_onnx(
    checkpoint: str | Path,
    out_path: str | Path,
    image_size: int,
    prepared_dir: str | Path | None = None,
    n_images: int = 32,
    tolerance: float = PARITY_TOLERANCE,
    threshold: float | None = None,
) -> dict[str, Any]:
    """Export the checkpoint's network to ONNX (any batch size) and check it against PyTorch.

    The check scores ``n_images`` cells (in one batch of another size than the export's
    example, so the dynamic batch axis is exercised too) with both runtimes; a probability
    differing by more than ``tolerance`` removes the file and raises :class:`ParityError`.
    ``threshold`` (the checkpoint's validated one) is stored in the model's metadata.
    """
    import onnx

    if image_size < 1:
        raise ConfigError(f"image size must be positive, got {image_size}")
    if threshold is not None and not 0 <= threshold <= 1:
        raise ConfigError(f"threshold must be in [0, 1], got {threshold}")
    if prepared_dir is not None and not Path(prepared_dir).is_dir():
        raise MissingInputError(f"no prepare cache at {prepared_dir} for the parity check")
    scorer = TorchScorer(load_classifier(checkpoint).net, device="cpu")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(2, 3, image_size, image_size)
    torch.onnx.export(
        scorer.net,
        (example,),
        str(out_path),
        dynamo=False,
        opset_version=OPSET,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
    )
    if threshold is not None:
        model = onnx.load(str(out_path))
        onnx.helper.set_model_props(model, {ONNX_THRESHOLD_KEY: repr(threshold)})
        onnx.save(model, str(out_path))
    onnx.checker.check_model(str(out_path))
    images = parity_images(prepared_dir, image_size, n_images)
    max_abs_diff = float(np.abs(scorer(images) - OnnxScorer(out_path)(images)).max())
    if not max_abs_diff <= tolerance:
        out_path.unlink()
        raise ParityError(
            f"ONNX probabilities differ from PyTorch by {max_abs_diff:.2e} (> {tolerance:.0e}) "
            f"on {len(images)} images; the export was removed"
        )
    return {
        "path": str(out_path),
        "image_size": image_size,
        "opset": OPSET,
        "parity_images": len(images),
        "parity_source": "random" if prepared_dir is None else "prepare cache",
        "max_abs_diff": max_abs_diff,
        ONNX_THRESHOLD_KEY: threshold,
    }
