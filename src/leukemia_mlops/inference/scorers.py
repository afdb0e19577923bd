"""Scorers: uint8 RGB images ``[B, S, S, 3]`` in, probabilities of ALL ``[B]`` out.

Every model source (Lightning checkpoint, MLflow model, ONNX file) becomes a scorer, with the
layout of the prepare cache as its input. Evaluation, batch prediction and the ONNX parity
check all go through one, so they cannot disagree on input scaling or on the sigmoid.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from leukemia_mlops.errors import InputError

CHANNELS_LAST = torch.channels_last


class Scorer(Protocol):
    """uint8 ``[B, S, S, 3]`` RGB images -> float64 probabilities of ALL ``[B]``."""

    preprocessing: dict[str, Any]

    def __call__(self, images: np.ndarray) -> np.ndarray: ...


def to_network_input(images: np.ndarray) -> np.ndarray:
    """uint8 ``[B, H, W, 3]`` -> float32 ``[B, 3, H, W]`` in [0, 1], as training feeds the net."""
    _check_images(images)
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2)).astype(np.float32) / 255


def _check_images(images: np.ndarray) -> None:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images [B, H, W, 3], got {images.dtype} {images.shape}")


def dihedral_views(images: torch.Tensor) -> list[torch.Tensor]:
    """The 8 symmetries of the square (4 rotations, with and without a flip), identity first.

    A cell on a slide has no preferred orientation, so each view is an equally valid input.
    """
    flips = (images, images.flip(3))
    return [torch.rot90(view, k, dims=(2, 3)) for view in flips for k in range(4)]


class TorchScorer:
    """A ``CellClassifierNet`` in eval mode; ``tta`` averages the probabilities of 8 views.

    ``mixed_precision`` scores under a GPU's autocast (bf16 where native, else fp16), as
    training runs; off, or on a CPU, it scores in fp32 (:attr:`precision` says which).
    """

    def __init__(
        self,
        net: nn.Module,
        tta: bool = False,
        device: str | None = None,
        preprocessing: dict[str, Any] | None = None,
        mixed_precision: bool = True,
    ):
        self.device, self.net = on_device(net, device)
        self.tta = tta
        self.preprocessing = dict(preprocessing or {})
        on_gpu = mixed_precision and self.device.type == "cuda"
        self.autocast = _gpu_autocast_dtype() if on_gpu else None

    @property
    def precision(self) -> str:
        """The precision scores are computed in, in Lightning's names."""
        names = {None: "32-true", torch.bfloat16: "bf16-mixed", torch.float16: "16-mixed"}
        return names[self.autocast]

    def tensor(self, images: np.ndarray) -> torch.Tensor:
        """The network input for ``images`` on this scorer's device: the uint8 batch is copied
        there (a quarter of the float bytes) and scaled there, exactly as
        :func:`to_network_input` scales it, in the channels-last layout the network runs."""
        _check_images(images)
        batch = torch.from_numpy(np.ascontiguousarray(images)).to(self.device, non_blocking=True)
        return batch.permute(0, 3, 1, 2).float().div_(255).contiguous(memory_format=CHANNELS_LAST)

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        batch = self.tensor(images)
        views = dihedral_views(batch) if self.tta else [batch]
        # Mixed precision on a GPU (bf16 where native, else fp16), as training runs it.
        with torch.autocast("cuda", dtype=self.autocast, enabled=self.autocast is not None):
            logits = [self.net(view).float() for view in views]
        probs = torch.stack([torch.sigmoid(logit) for logit in logits]).mean(0)
        return probs.double().cpu().numpy()


def _gpu_autocast_dtype() -> torch.dtype:
    """bf16 on GPUs that run it natively, else fp16 (the training precision of ``auto``)."""
    from leukemia_mlops.training.mixed_precision import choose_precision, local_gpu_capability

    native = choose_precision(local_gpu_capability(), cpu_bf16=False) == "bf16-mixed"
    return torch.bfloat16 if native else torch.float16


def on_device(net: nn.Module, device: str | None = None) -> tuple[torch.device, nn.Module]:
    """The device (default: a GPU if there is one) and ``net`` there, in float32 eval mode and
    channels-last (convolutions run about 1.35x faster so on an AVX2 CPU, as in training)."""
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return target, _eval_mode(net).float().to(target, memory_format=CHANNELS_LAST)


def _eval_mode(net: nn.Module) -> nn.Module:
    """``net`` in eval mode, where the mode can be set.

    An exported program (MLflow's ``pt2`` model format) refuses ``eval()``: it keeps the mode
    it was exported in, which ``log_classifier`` sets to eval.
    """
    try:
        return net.eval()
    except NotImplementedError:
        return net


class TorchNetwork:
    """A network in float32 eval mode on numpy input: float ``[B, 3, S, S]`` -> its output."""

    def __init__(self, net: nn.Module, device: str | None = None):
        self.device, self.net = on_device(net, device)

    @torch.no_grad()
    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.net(torch.from_numpy(batch).to(self.device)).float().cpu().numpy()


class OnnxNetwork:
    """An exported network run by ONNX Runtime on the CPU: float input -> its one output."""

    def __init__(self, path: str | Path):
        import onnxruntime as ort

        try:
            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own types for unreadable graphs
            first_line = next(iter(str(err).splitlines()), "")
            raise InputError(f"{path} is not an ONNX model ({first_line})") from None
        (model_input,) = self.session.get_inputs()
        self.input_name = model_input.name
        size = model_input.shape[-1]
        self.input_size = size if isinstance(size, int) else None
        self.output_rank = len(self.session.get_outputs()[0].shape)
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        (output, *_) = self.session.run(None, {self.input_name: batch})
        return output


class OnnxScorer:
    """An exported classifier run by ONNX Runtime on the CPU (the network outputs ALL logits)."""

    def __init__(self, path: str | Path):
        self.network = OnnxNetwork(path)
        size = self.network.input_size
        self.preprocessing = {} if size is None else {"image_size": size}

    def __call__(self, images: np.ndarray) -> np.ndarray:
        logits = self.network(to_network_input(images))
        return torch.sigmoid(torch.from_numpy(logits)).double().numpy()
