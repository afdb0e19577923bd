"""Batch prediction of image files: decoded as ``prepare`` does, scored, streamed to CSVs.

A classifier gives one row per file; a detector also one row per detected cell and, on
request, each image with its boxes drawn. Every row names the threshold it was labelled at
and where that came from (:class:`Threshold`). Where the model's temperature is known, P(ALL)
is calibrated (``calibrated``) and each cell gets its conformal set (``conformal_set``; see
:mod:`~.inference.calibrated`).
"""

from __future__ import annotations

import ctypes
import functools
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from leukemia_mlops.data.images import bgr_to_rgb, decode_bgr
from leukemia_mlops.data.layout import IMAGE_SUFFIXES
from leukemia_mlops.data.prepare import PrepareSpec, decode_file
from leukemia_mlops.errors import ConfigError, InputError, MissingInputError
from leukemia_mlops.inference.calibrated import Calibration, calibrated_threshold
from leukemia_mlops.inference.detection import (
    Found,
    Letterbox,
    YoloScorer,
    cell_probabilities,
    draw_boxes,
    select_boxes,
    to_original,
)
from leukemia_mlops.inference.loading import Validated, load_scorer, validated_decision
from leukemia_mlops.inference.ood import assess, assess_scene
from leukemia_mlops.inference.scorers import Scorer
from leukemia_mlops.labels import ALL, CLASS_NAMES, HEM
from leukemia_mlops.models.detector import MIN_BOX_SCORE

#: The decision threshold of a model with no validated one (the sigmoid's midpoint).
FALLBACK_THRESHOLD = 0.5
#: Where a threshold came from: set by the caller (``predict --threshold``), chosen on
#: validation by the evaluate stage (a checkpoint's ``metrics.json``, found or given with
#: ``--metrics``; an ONNX file's metadata; an MLflow model's run), or the fallback 0.5.
GIVEN, VALIDATION, DEFAULT = "given", "validation", "default"
#: ``ood_reason`` of a file that could not be scored (its ``error`` says why).
NOT_SCORED = "not scored"
#: Columns of a detector's boxes CSV: one row per detected cell.
BOX_COLUMNS = ["file", "x1", "y1", "x2", "y2", "class", "score", "in_distribution", "ood_reason"]
#: ``status`` of a detector's file row: a single-cell image whose cell a box found (it alone
#: gets prob_all and a label), a single-cell image where no box did, any other image (boxes
#: only), or a file not scored (as its ``ood_reason``).
CELL_FOUND, NO_CELL_FOUND, NOT_SINGLE_CELL = "cell found", "no cell found", "not a single cell"


class Threshold(NamedTuple):
    """A decision threshold (ALL above it) and its source: :data:`GIVEN`, :data:`VALIDATION`
    or :data:`DEFAULT`; with a ``calibration``, P(ALL) is calibrated first and the threshold
    is on the calibrated scale."""

    value: float
    source: str
    calibration: Calibration | None = None

    @classmethod
    def validated(cls, known: Validated) -> Threshold:
        """The validated threshold, moved onto the calibrated scale where it is calibrated."""
        if known.calibration is None:
            return cls(known.threshold, VALIDATION)
        value = calibrated_threshold(known.threshold, known.calibration.temperature)
        return cls(value, VALIDATION, known.calibration)


class Item(NamedTuple):
    """One file as the loader hands it over (``image`` None where it has none)."""

    image: np.ndarray | None  # the model's input: training image, or letterboxed for a detector
    error: str  # why the file could not be scored, else ""
    in_distribution: bool  # like the model's training images (rule of its family)
    reason: str  # why not, else ""
    single_cell: bool = False  # detector only: the file passes the single-cell rule
    frame: np.ndarray | None = None  # detector only: the original image's xyxy in ``image``
    size: tuple[int, int] = (0, 0)  # detector only: the original width and height


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
    """Each file's model input, decoded and checked as ``prepare`` does, and whether it is like
    the training images. With ``letterbox`` (a detector's), the input is the whole image
    letterboxed and the check is the detector's; the single-cell check is kept beside it."""

    def __init__(self, paths: list[Path], spec: PrepareSpec, letterbox: Letterbox | None = None):
        self.paths, self.spec, self.letterbox = paths, spec, letterbox

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Item:
        path = self.paths[index]
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            return Item(
                None, f"not an image file ({path.suffix or 'no extension'})", False, NOT_SCORED
            )
        decoded = decode_file(path, self.spec)
        if decoded.pixels is None:
            return Item(None, decoded.reason, False, NOT_SCORED)
        cell = assess(decoded.height, decoded.width, decoded.box, decoded.pixels, self.spec.window)
        if self.letterbox is None:
            return Item(decoded.pixels, "", cell.in_distribution, cell.reason)
        image = read_rgb(path)
        scene = assess_scene(image)
        letterboxed, frame = self.letterbox(image)
        size = (decoded.width, decoded.height)
        return Item(
            letterboxed, "", scene.in_distribution, scene.reason, cell.in_distribution, frame, size
        )


def read_rgb(path: Path) -> np.ndarray:
    """A whole image file as uint8 RGB ``[H, W, 3]``."""
    return bgr_to_rgb(decode_bgr(path.read_bytes()))


def _stack_images(items: list[Item]) -> tuple[torch.Tensor, list[Item]]:
    """A batch: the images of the usable files as one tensor (a loader process hands it over
    in shared memory), and every file's item without its image."""
    images = [item.image for item in items if item.image is not None]
    stacked = torch.from_numpy(np.stack(images)) if images else torch.empty(0, dtype=torch.uint8)
    return stacked, [item._replace(image=None) for item in items]


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
    model_source: str | Path | Scorer | YoloScorer,
    threshold: float | Threshold | None = None,
    evaluation: str | Path | Sequence[Path] | None = None,
    tracking_uri: str | None = None,
) -> Threshold:
    """``threshold`` if given (a bare number is :data:`GIVEN`, on the calibrated scale where the
    model's calibration is known), else the model's validated one (see
    :func:`validated_decision`; ``evaluation``: the metrics.json of a checkpoint's evaluation),
    else 0.5 (:data:`DEFAULT`) with a notice."""
    if isinstance(threshold, Threshold):
        return threshold
    is_source = isinstance(model_source, str | Path)
    known = validated_decision(model_source, evaluation, tracking_uri) if is_source else None
    if threshold is not None:
        return Threshold(float(threshold), GIVEN, None if known is None else known.calibration)
    if known is None:
        print(
            f"notice: no validated threshold is known for this model; "
            f"calling ALL above {FALLBACK_THRESHOLD}",
            file=sys.stderr,
        )
        return Threshold(FALLBACK_THRESHOLD, DEFAULT)
    return Threshold.validated(known)


def predict_paths(
    model_source: str | Path | Scorer | YoloScorer,
    inputs: Iterable[str | Path],
    out_csv: str | Path,
    *,
    image_size: int,
    window: int = PrepareSpec.window,
    fit: str = PrepareSpec.fit,
    batch_size: int = 64,
    threshold: float | Threshold | None = None,
    evaluation: str | Path | Sequence[Path] | None = None,
    tracking_uri: str | None = None,
    workers: int = 1,
    boxes_csv: str | Path | None = None,
    overlays: str | Path | None = None,
    min_score: float = MIN_BOX_SCORE,
) -> pd.DataFrame:
    """Score image files in batches, appending each batch's rows to ``out_csv`` as it goes.

    ``model_source`` is anything :func:`load_scorer` takes, or a scorer already loaded.
    Images are prepared as ``prepare`` does with ``image_size``, ``window`` and ``fit``, by
    ``workers`` loader processes (0: in this one) while the model scores the previous batch;
    only a few batches are held in memory. Decoding apart from the model also keeps this
    process's heap from fragmenting: its peak memory stays flat over any number of files.
    ``threshold`` defaults as :func:`decision_threshold` says. Columns: file, prob_all,
    label (ALL when prob_all > threshold, else HEM), threshold and threshold_source (the
    :class:`Threshold` every row was labelled at), calibrated (whether prob_all is calibrated
    with the model's validated temperature), conformal_set (``ALL``, ``HEM``, ``ALL+HEM``: abstain,
    ``none``: the empty set; blank without conformal quantiles or a probability), in_distribution
    and ood_reason (whether the
    image is like the training images, and why not; see :mod:`~.inference.ood`), error (why a
    file could not be scored, else empty).

    A detector also writes ``boxes_csv`` (default: ``<out_csv stem>_boxes.csv``), one row per
    detected cell scoring above ``min_score`` (:data:`BOX_COLUMNS`, xyxy in the file's
    pixels), and with ``overlays`` a PNG per image with its boxes drawn. Its ``out_csv`` rows
    add the ``cells`` count and a ``status``. One rule says whether a cell was found: a box
    scores above ``min_score``, i.e. the file has a boxes row. Only a single-cell image whose
    cell was found gets prob_all and a label (``cell found``); that prob_all is the one the
    detector is validated and evaluated with (:func:`~.detection.cell_probabilities`), so the
    validated threshold applies to it (with ``min_score`` at or above the detector's
    ``conf_threshold``, as by default, it rests on the box found). A single-cell image no box
    finds gets neither (``no cell found``): never a label from boxes below the floor.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if workers < 0:
        raise ConfigError(f"workers must be >= 0, got {workers}")
    given = threshold.value if isinstance(threshold, Threshold) else threshold
    for name, value in (("threshold", given), ("min_score", min_score)):
        if value is not None and not 0 <= value <= 1:
            raise ConfigError(f"{name} must be in [0, 1], got {value}")
    spec = PrepareSpec(image_size=image_size, window=window, fit=fit, workers=1)
    is_source = isinstance(model_source, str | Path)
    scorer = load_scorer(model_source, tracking_uri) if is_source else model_source
    threshold = decision_threshold(model_source, threshold, evaluation, tracking_uri)
    _check_preprocessing(scorer, spec)
    files = list_inputs(inputs)
    out_csv = Path(out_csv)
    if isinstance(scorer, YoloScorer):
        boxes_csv = Path(boxes_csv or out_csv.with_name(f"{out_csv.stem}_boxes.csv"))
        drawings = overlay_paths(files, overlays) if overlays is not None else {}
        score = functools.partial(
            _detect_batch, scorer, threshold, min_score, out_csv, boxes_csv, drawings
        )
        letterbox = scorer.letterbox
    else:
        score = functools.partial(_score_batch, scorer, threshold, out_csv)
        letterbox = None
    loader = DataLoader(
        FileImages(files, spec, letterbox),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_stack_images,
    )
    tables = []
    with tqdm(total=len(files), desc="predict", unit="img") as bar:
        for start, (images, items) in zip(range(0, len(files), batch_size), loader, strict=True):
            chunk = files[start : start + batch_size]
            frames = score(chunk, images, items)
            for path, frame in frames.items():
                path.parent.mkdir(parents=True, exist_ok=True)
                frame.to_csv(path, mode="a" if start else "w", header=not start, index=False)
            tables.append(frames[out_csv])
            bar.update(len(chunk))
            _release_freed_memory()
    return pd.concat(tables, ignore_index=True)


def overlay_paths(files: list[Path], folder: str | Path) -> dict[Path, Path]:
    """Where each image's overlay goes: ``<folder>/<stem>.png``, numbered where two images
    share a stem, and never the path of an input (inputs are never overwritten)."""
    folder = Path(folder)
    taken = {path.resolve() for path in files}
    targets = {}
    for path in files:
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        target, number = folder / f"{path.stem}.png", 1
        while target.resolve() in taken:
            target, number = folder / f"{path.stem}_{number}.png", number + 1
        taken.add(target.resolve())
        targets[path] = target
    return targets


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
    threshold: Threshold,
    out_csv: Path,
    paths: list[Path],
    images: torch.Tensor,
    items: list[Item],
) -> dict[Path, pd.DataFrame]:
    """A classifier's rows for one batch: each file's probability and label beside its flag."""
    ok = [i for i, item in enumerate(items) if not item.error]
    probs = np.full(len(paths), np.nan)
    if ok:
        probs[ok] = scorer(images.numpy())
    return {out_csv: _image_rows(paths, items, probs, threshold)}


def _image_rows(
    paths: list[Path], items: list[Item], probs: np.ndarray, threshold: Threshold
) -> pd.DataFrame:
    """One row per file; ``probs`` raw P(ALL), calibrated here where the threshold says how."""
    calibration = threshold.calibration
    if calibration is not None:
        probs = calibration.probs(probs)
    labels = np.where(probs > threshold.value, CLASS_NAMES[ALL], CLASS_NAMES[HEM])
    return pd.DataFrame(
        {
            "file": [str(p) for p in paths],
            "prob_all": probs,
            "label": np.where(np.isnan(probs), "", labels),
            "threshold": threshold.value,
            "threshold_source": threshold.source,
            "calibrated": calibration is not None,
            "conformal_set": [""] * len(paths) if calibration is None else calibration.sets(probs),
            "in_distribution": np.array([item.in_distribution for item in items], dtype=bool),
            "ood_reason": [item.reason for item in items],
            "error": [item.error for item in items],
        }
    )


def _detect_batch(
    scorer: YoloScorer,
    threshold: Threshold,
    min_score: float,
    out_csv: Path,
    boxes_csv: Path,
    drawings: dict[Path, Path],
    paths: list[Path],
    images: torch.Tensor,
    items: list[Item],
) -> dict[Path, pd.DataFrame]:
    """A detector's rows for one batch: per file (the cell count, its status and, for a single
    cell found, P(ALL)), per box, and the overlays."""
    ok = [i for i, item in enumerate(items) if not item.error]
    probs = np.full(len(paths), np.nan)
    counts = np.zeros(len(paths), np.int64)
    status = [NOT_SCORED if item.error else NOT_SINGLE_CELL for item in items]
    boxes = []
    if ok:
        decoded = scorer.decoded(images.numpy())  # one row per file in ``ok``
        cell_probs = cell_probabilities(decoded, scorer.conf_threshold)
        for i, det, prob in zip(ok, decoded, cell_probs, strict=True):
            found = select_boxes(det, min_score, scorer.iou_threshold)
            boxes_there = to_original(found.boxes, items[i].frame, *items[i].size)
            found = Found(boxes_there, found.scores, found.labels)
            counts[i] = len(found.scores)
            if items[i].single_cell:
                status[i] = CELL_FOUND if counts[i] else NO_CELL_FOUND
            if status[i] == CELL_FOUND:  # the one rule: found, so P(ALL) and a label
                probs[i] = prob
            boxes.append(_box_rows(paths[i], items[i], found))
            if paths[i] in drawings:
                _write_overlay(paths[i], found, drawings[paths[i]])
    rows = _image_rows(paths, items, probs, threshold)
    rows.insert(5, "cells", counts)
    rows.insert(6, "status", status)
    box_rows = pd.concat(boxes, ignore_index=True) if boxes else pd.DataFrame(columns=BOX_COLUMNS)
    return {out_csv: rows, boxes_csv: box_rows}


def _box_rows(path: Path, item: Item, found: Found) -> pd.DataFrame:
    x1, y1, x2, y2 = found.boxes.T
    return pd.DataFrame(
        {
            "file": str(path),
            "x1": x1,
            "y1": y1,
            "x2": x2,
            "y2": y2,
            "class": [CLASS_NAMES[label] for label in found.labels.tolist()],
            "score": found.scores,
            "in_distribution": item.in_distribution,
            "ood_reason": item.reason,
        },
        columns=BOX_COLUMNS,
    )


def _write_overlay(path: Path, found: Found, target: Path) -> None:
    """The image of ``path`` with its boxes drawn, as a PNG at ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    drawn = draw_boxes(read_rgb(path), found)
    if not cv2.imwrite(str(target), np.ascontiguousarray(drawn[..., ::-1])):
        raise ConfigError(f"could not write the overlay {target}: check --overlays")
