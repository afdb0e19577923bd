"""Scoring cells with a trained classifier, from the prepare cache or from image files.

Every model source (Lightning checkpoint, MLflow model, ONNX file) becomes a *scorer*: uint8
RGB images ``[B, S, S, 3]`` in, probabilities of ALL ``[B]`` out, the layout of the prepare
cache. Evaluation, batch prediction and the ONNX parity check all go through it, so they
cannot disagree on input scaling or on the sigmoid.
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from leukemia_mlops.data.prepare import PrepareSpec, decode_file
from leukemia_mlops.errors import ConfigError, InputError, MissingInputError
from leukemia_mlops.models.classifier import CellClassifier

IMAGE_SUFFIXES = frozenset({".bmp", ".png", ".jpg", ".jpeg", ".tif", ".tiff"})
#: Preprocessing settings a model may declare; they must match what images are prepared with.
PREPROCESSING_KEYS = ("image_size", "window", "fit")
_MLFLOW_URI = re.compile(r"^(runs|models):/")
_ALLOW_PICKLE = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"


class Scorer(Protocol):
    """uint8 ``[B, S, S, 3]`` RGB images -> float64 probabilities of ALL ``[B]``."""

    preprocessing: dict[str, Any]

    def __call__(self, images: np.ndarray) -> np.ndarray: ...


def to_network_input(images: np.ndarray) -> np.ndarray:
    """uint8 ``[B, H, W, 3]`` -> float32 ``[B, 3, H, W]`` in [0, 1], as training feeds the net."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images [B, H, W, 3], got {images.dtype} {images.shape}")
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2)).astype(np.float32) / 255


def dihedral_views(images: torch.Tensor) -> list[torch.Tensor]:
    """The 8 symmetries of the square (4 rotations, with and without a flip), identity first.

    A cell on a slide has no preferred orientation, so each view is an equally valid input.
    """
    flips = (images, images.flip(3))
    return [torch.rot90(view, k, dims=(2, 3)) for view in flips for k in range(4)]


class TorchScorer:
    """A ``CellClassifierNet`` in eval mode; ``tta`` averages the probabilities of 8 views."""

    def __init__(
        self,
        net: nn.Module,
        tta: bool = False,
        device: str | None = None,
        preprocessing: dict[str, Any] | None = None,
    ):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.net = _eval_mode(net).float().to(self.device, memory_format=torch.contiguous_format)
        self.tta = tta
        self.preprocessing = dict(preprocessing or {})

    def tensor(self, images: np.ndarray) -> torch.Tensor:
        """The network input for ``images`` on this scorer's device."""
        return torch.from_numpy(to_network_input(images)).to(self.device)

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        batch = self.tensor(images)
        views = dihedral_views(batch) if self.tta else [batch]
        probs = torch.stack([torch.sigmoid(self.net(view).float()) for view in views]).mean(0)
        return probs.double().cpu().numpy()


def _eval_mode(net: nn.Module) -> nn.Module:
    """``net`` in eval mode, where the mode can be set.

    An exported program (MLflow's ``pt2`` model format) refuses ``eval()``: it keeps the mode
    it was exported in, which ``log_classifier`` sets to eval.
    """
    try:
        return net.eval()
    except NotImplementedError:
        return net


class OnnxScorer:
    """An exported network run by ONNX Runtime on the CPU (the network outputs ALL logits)."""

    def __init__(self, path: str | Path):
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (model_input,) = self.session.get_inputs()
        self.input_name = model_input.name
        size = model_input.shape[-1]
        self.preprocessing = {"image_size": size} if isinstance(size, int) else {}

    def __call__(self, images: np.ndarray) -> np.ndarray:
        (logits,) = self.session.run(None, {self.input_name: to_network_input(images)})
        return torch.sigmoid(torch.from_numpy(logits)).double().numpy()


def load_classifier(checkpoint: str | Path) -> CellClassifier:
    """A trained classifier from a Lightning checkpoint, read safely (``weights_only``)."""
    path = Path(checkpoint)
    if not path.is_file():
        raise MissingInputError(f"no such checkpoint: {path}")
    try:
        return CellClassifier.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and key errors alike mean "not our checkpoint"
        first_line = next(iter(str(err).splitlines()), "")
        raise InputError(
            f"{path} is not a CellClassifier checkpoint ({type(err).__name__}: {first_line})"
        ) from None


def is_mlflow_uri(source: str | Path) -> bool:
    """Whether ``source`` names an MLflow model (``runs:/...`` or ``models:/...``)."""
    return bool(_MLFLOW_URI.match(str(source)))


def load_scorer(source: str | Path, tracking_uri: str | None = None) -> Scorer:
    """A scorer for a ``.ckpt`` or ``.onnx`` file or an MLflow ``runs:/``/``models:/`` URI."""
    text = str(source)
    if is_mlflow_uri(text):
        return _mlflow_scorer(text, tracking_uri)
    path = Path(source)
    if not path.is_file():
        raise MissingInputError(f"no such model file: {path}")
    if path.suffix == ".onnx":
        return OnnxScorer(path)
    if path.suffix == ".ckpt":
        module = load_classifier(path)
        declared = {k: module.hparams[k] for k in PREPROCESSING_KEYS if k in module.hparams}
        return TorchScorer(module.net, preprocessing=declared)
    raise InputError(f"model must be a .ckpt or .onnx file or a runs:/ or models:/ URI: {text}")


def _mlflow_scorer(uri: str, tracking_uri: str | None) -> TorchScorer:
    """An MLflow PyTorch model; its input signature tells the image size it was logged with."""
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    # MLflow unpickles a model saved in its pickle format unless this is false (its default is
    # true): refuse such files, as torch.load(weights_only=True) does, unless the user opts in.
    # Models logged by this project are pt2 archives, which load without pickle.
    opted_in = _ALLOW_PICKLE in os.environ
    os.environ.setdefault(_ALLOW_PICKLE, "false")
    try:
        net = mlflow.pytorch.load_model(uri, map_location="cpu")
    finally:
        if not opted_in:
            del os.environ[_ALLOW_PICKLE]
    signature = mlflow.models.get_model_info(uri).signature
    shape = signature.inputs.inputs[0].shape if signature is not None else None
    return TorchScorer(net, preprocessing={"image_size": shape[-1]} if shape else {})


def list_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Files as given; folders searched recursively (hidden entries skipped), sorted.

    Every file in a folder is listed, not only images, so that a stray file shows up in the
    output with its reason instead of vanishing silently.
    """
    inputs = [Path(item) for item in inputs]
    files: list[Path] = []
    for item in inputs:
        if item.is_dir():
            found = (p for p in item.rglob("*") if p.is_file())
            files += sorted(p for p in found if not _hidden(p.relative_to(item)))
        elif item.is_file():
            files.append(item)
        else:
            raise MissingInputError(f"no such file or folder: {item}")
    if not files:
        raise InputError(f"no files found in {', '.join(map(str, inputs))}")
    return files


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


class FileImages(Dataset):
    """Each file's training image (None if it has none) and the reason it has none ("" if ok),
    decoded and checked as ``prepare`` does."""

    def __init__(self, paths: list[Path], spec: PrepareSpec):
        self.paths, self.spec = paths, spec

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[np.ndarray | None, str]:
        path = self.paths[index]
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            return None, f"not an image file ({path.suffix or 'no extension'})"
        decoded = decode_file(path, self.spec)
        return decoded.pixels, decoded.reason


def _stack_images(items: list[tuple[np.ndarray | None, str]]) -> tuple[torch.Tensor, list[str]]:
    """A batch: the images of the usable files as one tensor (a loader process hands it over
    in shared memory), and every file's error ("" for the usable ones)."""
    images = [image for image, _ in items if image is not None]
    stacked = torch.from_numpy(np.stack(images)) if images else torch.empty(0, dtype=torch.uint8)
    return stacked, [error for _, error in items]


def _check_preprocessing(scorer: Scorer, spec: PrepareSpec) -> None:
    """Refuse settings that differ from those the model declares (a silent scale change)."""
    conflicts = [
        f"{key}={getattr(spec, key)} (model: {value})"
        for key, value in scorer.preprocessing.items()
        if getattr(spec, key) != value
    ]
    if conflicts:
        raise ConfigError(f"preprocessing differs from the model's: {', '.join(conflicts)}")


def predict_paths(
    model_source: str | Path | Scorer,
    inputs: Iterable[str | Path],
    out_csv: str | Path,
    *,
    image_size: int,
    window: int = PrepareSpec.window,
    fit: str = PrepareSpec.fit,
    batch_size: int = 64,
    threshold: float = 0.5,
    tracking_uri: str | None = None,
    workers: int = 1,
) -> pd.DataFrame:
    """Score image files in batches, appending each batch's rows to ``out_csv`` as it goes.

    ``model_source`` is anything :func:`load_scorer` takes, or a scorer already loaded.
    Images are prepared as ``prepare`` does with ``image_size``, ``window`` and ``fit``, by
    ``workers`` loader processes (0: in this one) while the model scores the previous batch;
    only a few batches are held in memory. Decoding apart from the model also keeps this
    process's heap from fragmenting: its peak memory stays flat over any number of files.
    Columns: file, prob_all, label (ALL when prob_all > threshold, else HEM), error (why a
    file could not be scored, else empty).
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if workers < 0:
        raise ConfigError(f"workers must be >= 0, got {workers}")
    if not 0 <= threshold <= 1:
        raise ConfigError(f"threshold must be in [0, 1], got {threshold}")
    spec = PrepareSpec(image_size=image_size, window=window, fit=fit, workers=1)
    is_source = isinstance(model_source, str | Path)
    scorer = load_scorer(model_source, tracking_uri) if is_source else model_source
    _check_preprocessing(scorer, spec)
    files = list_inputs(inputs)
    out_csv = Path(out_csv)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    loader = DataLoader(
        FileImages(files, spec),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_stack_images,
    )
    frames = []
    with tqdm(total=len(files), desc="predict", unit="img") as bar:
        for start, (images, errors) in zip(range(0, len(files), batch_size), loader, strict=True):
            chunk = files[start : start + batch_size]
            frame = _score_batch(scorer, chunk, images, errors, threshold)
            frame.to_csv(out_csv, mode="a" if start else "w", header=not start, index=False)
            frames.append(frame)
            bar.update(len(chunk))
            _release_freed_memory()
    return pd.concat(frames, ignore_index=True)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def _release_freed_memory() -> None:
    """Give the heap's free pages back to the system (glibc's ``malloc_trim``; elsewhere a
    no-op). glibc keeps what the model frees between batches, and the mix of sizes made the
    heap grow with every batch: 1.2 to 2.1 GiB over 1,000 to 10,000 files before this."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _score_batch(
    scorer: Scorer,
    paths: list[Path],
    images: torch.Tensor,
    errors: list[str],
    threshold: float,
) -> pd.DataFrame:
    ok = [i for i, error in enumerate(errors) if not error]
    probs = np.full(len(paths), np.nan)
    if ok:
        probs[ok] = scorer(images.numpy())
    labels = np.where(probs > threshold, "ALL", "HEM")
    return pd.DataFrame(
        {
            "file": [str(p) for p in paths],
            "prob_all": probs,
            "label": np.where(np.isnan(probs), "", labels),
            "error": errors,
        }
    )
