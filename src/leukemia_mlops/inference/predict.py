"""Batch prediction of image files: decoded as ``prepare`` does, scored, streamed to a CSV."""

from __future__ import annotations

import ctypes
import functools
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from leukemia_mlops.data.prepare import PrepareSpec, decode_file
from leukemia_mlops.errors import ConfigError, InputError, MissingInputError
from leukemia_mlops.inference.loading import load_scorer, validated_threshold
from leukemia_mlops.inference.ood import assess
from leukemia_mlops.inference.scorers import Scorer

IMAGE_SUFFIXES = frozenset({".bmp", ".png", ".jpg", ".jpeg", ".tif", ".tiff"})
#: The decision threshold of a model with no validated one (the sigmoid's midpoint).
FALLBACK_THRESHOLD = 0.5
#: ``ood_reason`` of a file that could not be scored (its ``error`` says why).
NOT_SCORED = "not scored"

#: One file as the loader hands it over: training image, error, in distribution, why not.
Item = tuple[np.ndarray | None, str, bool, str]


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
    """Each file's training image (None if it has none), the reason it has none ("" if ok),
    decoded and checked as ``prepare`` does, and whether it is like the training images."""

    def __init__(self, paths: list[Path], spec: PrepareSpec):
        self.paths, self.spec = paths, spec

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Item:
        path = self.paths[index]
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            return None, f"not an image file ({path.suffix or 'no extension'})", False, NOT_SCORED
        decoded = decode_file(path, self.spec)
        if decoded.pixels is None:
            return None, decoded.reason, False, NOT_SCORED
        verdict = assess(
            decoded.height, decoded.width, decoded.box, decoded.pixels, self.spec.window
        )
        return decoded.pixels, "", verdict.in_distribution, verdict.reason


def _stack_images(items: list[Item]) -> tuple[torch.Tensor, list[Item]]:
    """A batch: the images of the usable files as one tensor (a loader process hands it over
    in shared memory), and every file's item without its image."""
    images = [item[0] for item in items if item[0] is not None]
    stacked = torch.from_numpy(np.stack(images)) if images else torch.empty(0, dtype=torch.uint8)
    return stacked, [(None, *item[1:]) for item in items]


def _check_preprocessing(scorer: Scorer, spec: PrepareSpec) -> None:
    """Refuse settings that differ from those the model declares (a silent scale change)."""
    conflicts = [
        f"{key}={getattr(spec, key)} (model: {value})"
        for key, value in scorer.preprocessing.items()
        if getattr(spec, key) != value
    ]
    if conflicts:
        raise ConfigError(f"preprocessing differs from the model's: {', '.join(conflicts)}")


def decision_threshold(
    model_source: str | Path | Scorer,
    threshold: float | None = None,
    evaluation: str | Path | None = None,
    tracking_uri: str | None = None,
) -> float:
    """``threshold`` if given, else the model's validated one (see :func:`validated_threshold`;
    ``evaluation``: the metrics.json of a checkpoint's evaluation), else 0.5 with a notice."""
    if threshold is not None:
        return threshold
    is_source = isinstance(model_source, str | Path)
    known = validated_threshold(model_source, evaluation, tracking_uri) if is_source else None
    if known is None:
        print(
            f"notice: no validated threshold is known for this model; "
            f"calling ALL above {FALLBACK_THRESHOLD}",
            file=sys.stderr,
        )
        return FALLBACK_THRESHOLD
    return known


def predict_paths(
    model_source: str | Path | Scorer,
    inputs: Iterable[str | Path],
    out_csv: str | Path,
    *,
    image_size: int,
    window: int = PrepareSpec.window,
    fit: str = PrepareSpec.fit,
    batch_size: int = 64,
    threshold: float | None = None,
    evaluation: str | Path | None = None,
    tracking_uri: str | None = None,
    workers: int = 1,
) -> pd.DataFrame:
    """Score image files in batches, appending each batch's rows to ``out_csv`` as it goes.

    ``model_source`` is anything :func:`load_scorer` takes, or a scorer already loaded.
    Images are prepared as ``prepare`` does with ``image_size``, ``window`` and ``fit``, by
    ``workers`` loader processes (0: in this one) while the model scores the previous batch;
    only a few batches are held in memory. Decoding apart from the model also keeps this
    process's heap from fragmenting: its peak memory stays flat over any number of files.
    ``threshold`` defaults as :func:`decision_threshold` says. Columns: file, prob_all,
    label (ALL when prob_all > threshold, else HEM), in_distribution and ood_reason (whether
    the image is like the training images, and why not; see :mod:`~.inference.ood`), error
    (why a file could not be scored, else empty).
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if workers < 0:
        raise ConfigError(f"workers must be >= 0, got {workers}")
    if threshold is not None and not 0 <= threshold <= 1:
        raise ConfigError(f"threshold must be in [0, 1], got {threshold}")
    spec = PrepareSpec(image_size=image_size, window=window, fit=fit, workers=1)
    is_source = isinstance(model_source, str | Path)
    scorer = load_scorer(model_source, tracking_uri) if is_source else model_source
    threshold = decision_threshold(model_source, threshold, evaluation, tracking_uri)
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
        for start, (images, items) in zip(range(0, len(files), batch_size), loader, strict=True):
            chunk = files[start : start + batch_size]
            frame = _score_batch(scorer, chunk, images, items, threshold)
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
    items: list[Item],
    threshold: float,
) -> pd.DataFrame:
    _, errors, in_distribution, reasons = zip(*items, strict=True)
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
            "in_distribution": np.array(in_distribution, dtype=bool),
            "ood_reason": list(reasons),
            "error": list(errors),
        }
    )
