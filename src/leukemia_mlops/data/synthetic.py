"""Deterministic synthetic C-NMC 2019 data in the exact Kaggle folder layout.

The real data cannot be downloaded everywhere the pipeline must run, so this writes look-alike
single-cell images where every later stage expects the real ones. Blasts (ALL) and normal cells
(HEM) differ the way the real ones do (size, nucleus-to-cytoplasm ratio, chromatin, nucleoli,
nuclear outline), but every trait is drawn from overlapping class distributions and every
subject has its own stain, brightness and size, so the task stays hard and subject-dependent.

Every file's bytes depend only on the :class:`SyntheticSpec`: each subject and each image draws
from its own seed sequence, so the number of worker processes changes nothing, and the pixels
come from integer or exactly rounded arithmetic only (see "One cell image"), so neither does the
CPU (AVX2 or AVX-512, x86-64 or ARM) nor the numpy/OpenCV build: ``data.dvc`` can version the
default data set, and every machine regenerates the same bytes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import multiprocessing
import os
import shutil
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from leukemia_mlops.data.layout import COLUMN_TYPES
from leukemia_mlops.data.naming import ALL, HEM, LABEL_NAMES, format_cell_name

DATASET_DIR = "C-NMC_Leukemia"
TRAINING_DIR = "training_data"
PRELIM_DIR = "validation_data/C-NMC_test_prelim_phase_data"
FINAL_DIR = "testing_data/C-NMC_test_final_phase_data"
N_FOLDS = 3

_SPLIT_CODES = {"train": 0, "prelim": 1, "final": 2}
# Tags in the first free slot of every seed sequence keep the random streams apart.
_PLAN, _SUBJECT, _IMAGE = 0, 1, 2
_TWO_PI = 2.0 * math.pi


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
    """What to generate; invalid values fail at construction with the field named.

    The defaults are those of ``conf/data/synthetic.yaml`` (a test holds them equal).
    """

    n_train_subjects: int = 48  # spread over the 3 folds, subject-disjoint
    n_prelim_subjects: int = 28  # unseen subjects of the labelled prelim set
    cells_per_subject: int = 15  # mean; each subject gets between 0.5x and 1.5x
    all_fraction: float = 0.6  # share of subjects that are ALL (blast) subjects
    n_final_images: int = 12  # unlabelled final-phase test images
    image_size: int = 450
    seed: int = 0

    def __post_init__(self) -> None:
        n_train_all = _n_all(self.n_train_subjects, self.all_fraction)
        n_prelim_all = _n_all(self.n_prelim_subjects, self.all_fraction)
        rules = (
            ("n_train_subjects", self.n_train_subjects >= N_FOLDS, "must be >= 3 (one per fold)"),
            (
                "n_prelim_subjects",
                self.n_prelim_subjects == 0 or self.n_prelim_subjects >= 2,
                "must be 0 or >= 2 (one ALL and one HEM subject)",
            ),
            ("cells_per_subject", self.cells_per_subject >= 1, "must be >= 1"),
            ("all_fraction", 0.0 < self.all_fraction < 1.0, "must lie strictly between 0 and 1"),
            (
                "all_fraction",
                0 < n_train_all < self.n_train_subjects,
                f"gives {n_train_all} ALL of {self.n_train_subjects} training subjects"
                "; each class needs one",
            ),
            (
                "all_fraction",
                self.n_prelim_subjects == 0 or 0 < n_prelim_all < self.n_prelim_subjects,
                f"gives {n_prelim_all} ALL of {self.n_prelim_subjects} prelim subjects"
                "; each class needs one",
            ),
            ("n_final_images", self.n_final_images >= 0, "must be >= 0"),
            ("image_size", self.image_size >= 64, "must be >= 64"),
            ("seed", self.seed >= 0, "must be >= 0"),
        )
        for field, ok, rule in rules:
            if not ok:
                raise ValueError(f"SyntheticSpec.{field}={getattr(self, field)!r} {rule}")


def _n_all(n_subjects: int, all_fraction: float) -> int:
    return math.floor(n_subjects * all_fraction + 0.5)


# ---------------------------------------------------------------------------------------------
# One cell image
#
# The bytes must not depend on the CPU or on the numpy/OpenCV build, so no pixel goes through
# code whose rounding differs between SIMD levels or libraries: no numpy transcendental on
# arrays (np.exp, np.cos, np.arctan2 have CPU-specific kernels), no float reduction whose order
# could change, no OpenCV float filter. Pixels use elementwise IEEE + - * / sqrt (correctly
# rounded everywhere), integers, and tables of integers computed with Python's scalar ``math``.
# Every scalar that comes out of libm, or out of a sampler that calls libm (the tails of
# numpy's normal, the gamma), is first snapped to a fixed grid: a last-bit difference between
# two libm builds then almost surely lands on the same grid point and never reaches a pixel.

_GRID = 2.0**16  # grid of the snapped scalars: 1/65536
_ANGLES = 512  # angular samples of an outline
_ONE = 1 << 14  # fixed-point unit of the cosine table and of the resampling weights
_ATAN_STEPS = 1024  # tangent samples of the first octant
_SUBSTEPS = 64  # angle table resolution: 1/64 of an outline step
_NOISE_ONE = 1 << 10  # fixed-point unit of the white noise
_DENSITY_STEPS = 256  # optical-density samples per unit of the exp(-density) table
_DENSITY_RANGE = (-1, 5)  # densities outside are clipped (exp(-5): black)


def _snap(x: float) -> float:
    """``x`` on the 1/65536 grid, the form in which libm results enter the images."""
    return round(x * _GRID) / _GRID


def _int_table(fn: Callable[[float], float], xs: Iterable[float]) -> np.ndarray:
    """``round(fn(x))`` for every ``x``, with Python's scalar maths: the same on every CPU."""
    return np.array([round(fn(x)) for x in xs], np.int64)


_COS = _int_table(lambda i: _ONE * math.cos(_TWO_PI * i / _ANGLES), range(_ANGLES))
_ATAN = _int_table(
    lambda j: math.atan(j / _ATAN_STEPS) * _ANGLES * _SUBSTEPS / _TWO_PI, range(_ATAN_STEPS + 1)
)
_DECAY = (
    _int_table(
        lambda k: _GRID * math.exp(-k / _DENSITY_STEPS),
        range(_DENSITY_RANGE[0] * _DENSITY_STEPS, _DENSITY_RANGE[1] * _DENSITY_STEPS + 1),
    )
    / _GRID
).astype(np.float32)


def _normal(rng: np.random.Generator, mean: float, sd: float) -> float:
    """A draw of N(mean, sd) whose standard-normal part is snapped to the grid."""
    return mean + sd * _snap(rng.standard_normal())


def _lognormal(rng: np.random.Generator, sd: float) -> float:
    """A multiplicative spread: ``exp(N(0, sd))``."""
    return _snap(math.exp(_normal(rng, 0.0, sd)))


def _clip(x: float, low: float, high: float) -> float:
    """``x`` limited to [low, high] (a Python float, unlike ``np.clip``)."""
    return min(max(x, low), high)


def _direction(rng: np.random.Generator) -> tuple[float, float]:
    """(sin, cos) of a random angle, from the cosine table."""
    step = int(rng.integers(_ANGLES))
    return int(_COS[(step - _ANGLES // 4) % _ANGLES]) / _ONE, int(_COS[step]) / _ONE


@dataclasses.dataclass(frozen=True)
class SubjectStyle:
    """Shifts shared by all cells of one subject: stain, exposure and cell size."""

    nucleus_rgb: tuple[float, float, float] = (0.45, 0.25, 0.62)  # purple / dark violet
    cytoplasm_rgb: tuple[float, float, float] = (0.76, 0.72, 0.93)  # light blue-lilac
    brightness: float = 1.0
    size_scale: float = 1.0


def draw_subject_style(rng: np.random.Generator) -> SubjectStyle:
    """A random subject: stain-normalised images still keep some colour and size spread."""
    base = SubjectStyle()
    nucleus = [_clip(c * _lognormal(rng, 0.08), 0.05, 0.9) for c in base.nucleus_rgb]
    cytoplasm = [_clip(c * _lognormal(rng, 0.05), 0.3, 1.0) for c in base.cytoplasm_rgb]
    return SubjectStyle(
        nucleus_rgb=(nucleus[0], nucleus[1], nucleus[2]),
        cytoplasm_rgb=(cytoplasm[0], cytoplasm[1], cytoplasm[2]),
        brightness=_lognormal(rng, 0.08),
        size_scale=_lognormal(rng, 0.06),
    )


@dataclasses.dataclass(frozen=True)
class _Prior:
    """Class-conditional means of the cell traits; the spreads below are shared."""

    radius: float  # median cell radius as a fraction of the image size
    nucleus_fraction: float  # nucleus radius / cell radius
    coarseness: float  # 0 fine, even chromatin .. 1 coarse clumps
    darkness: float  # extra optical density of the nucleus (condensed chromatin)
    wobble: float  # nuclear outline irregularity
    notch_prob: float  # chance of an indented (cleaved) nucleus
    nucleoli_p: tuple[float, float, float, float]  # P(0, 1, 2, 3 visible nucleoli)


_HEM_RADIUS = 0.215
_PRIORS = {
    HEM: _Prior(_HEM_RADIUS, 0.77, 0.62, 0.14, 0.025, 0.2, (0.6, 0.3, 0.1, 0.0)),
    # Blasts cover about 30 % more area: sqrt(1.3) in radius.
    ALL: _Prior(
        _HEM_RADIUS * math.sqrt(1.3), 0.83, 0.36, 0.0, 0.055, 0.5, (0.25, 0.35, 0.28, 0.12)
    ),
}
_SD_LOG_RADIUS = 0.12
_SD_FRACTION = 0.055
_SD_COARSENESS = 0.22
_SD_DARKNESS = 0.12
_CELL_WOBBLE = 0.035
_MARGIN = 0.04  # of the image size, kept black around the cell


@dataclasses.dataclass(frozen=True)
class _Traits:
    """The morphology of one cell, in pixels where it has a size."""

    radius: float
    nucleus_fraction: float
    coarseness: float
    darkness: float
    wobble: float
    notch_depth: float
    n_nucleoli: int


def _draw_traits(
    rng: np.random.Generator, prior: _Prior, style: SubjectStyle, size: int
) -> _Traits:
    """Every trait from its class distribution, wide enough that the classes overlap."""
    radius = size * style.size_scale * prior.radius * _lognormal(rng, _SD_LOG_RADIUS)
    notched = rng.random() < prior.notch_prob
    return _Traits(
        radius=radius,
        nucleus_fraction=_clip(_normal(rng, prior.nucleus_fraction, _SD_FRACTION), 0.55, 0.92),
        coarseness=_clip(_normal(rng, prior.coarseness, _SD_COARSENESS), 0.0, 1.0),
        darkness=_normal(rng, prior.darkness, _SD_DARKNESS),
        wobble=prior.wobble * _snap(rng.gamma(4.0, 0.25)),
        notch_depth=rng.uniform(0.08, 0.3) if notched else 0.0,
        n_nucleoli=int(rng.choice(4, p=prior.nucleoli_p)),
    )


def _outline(rng: np.random.Generator, wobble: float, notch_depth: float) -> np.ndarray:
    """Relative radius at ``_ANGLES`` angles: low harmonics make an oval, lumpy shape; a notch
    makes the indented outline of a cleaved blast nucleus.

    Computed in integers (unit ``_ONE**2``), so the float result is exact: any sum of it is
    exact too, whatever the order.
    """
    steps = np.arange(_ANGLES)
    radius = np.full(_ANGLES, _ONE * _ONE, np.int64)
    for order in range(2, 6):
        amplitude = round(_ONE * wobble * _snap(rng.standard_normal()) * 2.0 / order)
        phase = int(rng.integers(_ANGLES))
        radius += amplitude * _COS[(order * steps + phase) % _ANGLES]
    if notch_depth > 0.0:
        centre = int(rng.integers(_ANGLES))
        width = rng.uniform(0.2, 0.45) * _ANGLES / _TWO_PI  # in outline steps
        gaps = ((steps - centre + _ANGLES // 2) % _ANGLES - _ANGLES // 2).tolist()
        dip = _int_table(lambda g: _ONE * notch_depth * math.exp(-0.5 * (g / width) ** 2), gaps)
        radius = radius * (_ONE - dip) // _ONE
    return radius / float(_ONE * _ONE)


def _offsets(ys: np.ndarray, xs: np.ndarray, cy: float, cx: float) -> tuple[np.ndarray, np.ndarray]:
    """Row and column offsets of every pixel from (cy, cx), as a column and a row to broadcast."""
    return (ys - np.float32(cy))[:, None], (xs - np.float32(cx))[None, :]


def _distance(dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
    """Euclidean distance from the offsets (not np.hypot: its kernels differ by CPU)."""
    return np.sqrt(dy * dy + dx * dx)


def _angle_index(dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
    """The outline-table index of every pixel's angle: atan2 by octant from an integer table."""
    ay, ax = np.abs(dy), np.abs(dx)
    low, high = np.minimum(ay, ax), np.maximum(ay, ax)
    tangent = low / np.maximum(high, np.float32(1e-6))
    angle = _ATAN[np.rint(tangent * _ATAN_STEPS).astype(np.int64)]  # first octant
    quarter = _ANGLES // 4 * _SUBSTEPS
    angle = np.where(ay > ax, quarter - angle, angle)
    angle = np.where(dx < 0, 2 * quarter - angle, angle)
    angle = np.where(dy < 0, -angle, angle)
    return (angle + _SUBSTEPS // 2) // _SUBSTEPS % _ANGLES


def _coverage(edge: np.ndarray | float, rho: np.ndarray, soft: float) -> np.ndarray:
    """Anti-aliased inside-ness (0..1) of pixels at ``rho`` for a boundary at ``edge``."""
    return np.clip((edge - rho) / soft + 0.5, 0.0, 1.0)


def _keys_near(d: np.ndarray) -> np.ndarray:
    """Keys' cubic kernel (a = -0.75, as OpenCV's INTER_CUBIC) for distances 0..1."""
    return (1.25 * d - 2.25) * d * d + 1.0


def _keys_far(d: np.ndarray) -> np.ndarray:
    """Keys' cubic kernel for distances 1..2."""
    return -0.75 * (((d - 5.0) * d + 8.0) * d - 4.0)


def _cubic_taps(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and integer weights (4 x ``n_out``, each column summing to ``_ONE``) of
    bicubic resampling from ``n_in`` to ``n_out`` samples, border samples repeated."""
    source = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    base = np.floor(source)
    frac = source - base
    weights = np.rint(
        np.stack([_keys_far(1.0 + frac), _keys_near(frac), _keys_near(1.0 - frac)]) * _ONE
    ).astype(np.int32)
    weights = np.vstack([weights, _ONE - weights.sum(axis=0)])
    index = np.clip(base.astype(np.int64) + np.arange(-1, 3)[:, None], 0, n_in - 1)
    return index, weights


def _noise(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Smooth noise of about unit spread, with blobs about ``scale`` pixels across: white noise
    on a coarse grid, upsampled bicubically in integers."""
    h, w = shape
    white = rng.standard_normal((math.ceil(h / scale) + 2, math.ceil(w / scale) + 2))
    coarse = np.rint(white * _NOISE_ONE).astype(np.int32)
    rows, row_weights = _cubic_taps(h, coarse.shape[0])
    cols, col_weights = _cubic_taps(w, coarse.shape[1])
    tall = sum(row_weights[t][:, None] * coarse[rows[t]] for t in range(4))
    tall = (tall + _ONE // 2) // _ONE
    full = sum(col_weights[t] * tall[:, cols[t]] for t in range(4))
    return full.astype(np.float32) / np.float32(_ONE * _NOISE_ONE)


def _decay(density: np.ndarray) -> np.ndarray:
    """``exp(-density)`` from the table, density in steps of 1/256."""
    low, high = (bound * _DENSITY_STEPS for bound in _DENSITY_RANGE)
    steps = np.clip(np.rint(density * _DENSITY_STEPS), low, high).astype(np.int64)
    return _DECAY[steps - low]


def _place(rng: np.random.Generator, extent: float, size: int) -> tuple[float, float, float]:
    """A centre near the middle and a shrink factor (<= 1) that keeps a black margin."""
    cy, cx = (size / 2.0 + _normal(rng, 0.0, 0.02 * size) for _ in range(2))
    room = min(cy, cx, size - cy, size - cx) - _MARGIN * size
    return cy, cx, min(1.0, room / extent)


def _nucleoli(
    rng: np.random.Generator,
    shape: tuple[int, int],
    centre: tuple[float, float],
    radius: float,
    count: int,
) -> np.ndarray:
    """Lighter round spots (0..1) with soft edges inside the nucleus, as blasts show and normal
    cells rarely do."""
    ys, xs = np.arange(shape[0], dtype=np.float32), np.arange(shape[1], dtype=np.float32)
    layer = np.zeros(shape, np.float32)
    soft = max(2.0, 0.15 * radius)
    for _ in range(count):
        (sin, cos), reach = _direction(rng), radius * rng.uniform(0.0, 0.55)
        spot = max(1.0, radius * rng.uniform(0.08, 0.15))
        rho = _distance(*_offsets(ys, xs, centre[0] + reach * sin, centre[1] + reach * cos))
        layer = np.maximum(layer, rng.uniform(0.35, 0.6) * _coverage(spot, rho, soft))
    return layer


@dataclasses.dataclass(frozen=True)
class _Geometry:
    """Where the cell and its nucleus lie, over the crop ``box`` that holds the cell."""

    box: tuple[int, int, int, int]  # y0, y1, x0, x1 in the image
    cell: np.ndarray  # coverage 0..1
    nucleus: np.ndarray  # coverage 0..1
    depth: np.ndarray  # distance from the centre over the membrane's: 0 centre, 1 membrane
    nucleus_centre: tuple[float, float]  # in crop coordinates
    nucleus_radius: float


def _geometry(rng: np.random.Generator, traits: _Traits, size: int) -> _Geometry:
    """Outline the cell and its (off-centre) nucleus and rasterise both, anti-aliased."""
    cell_shape = _outline(rng, _CELL_WOBBLE, 0.0)
    nucleus_shape = _outline(rng, traits.wobble, traits.notch_depth)
    cy, cx, shrink = _place(rng, traits.radius * float(cell_shape.max()), size)
    radius = traits.radius * shrink
    cell_edge = radius * cell_shape
    nucleus_radius = traits.nucleus_fraction * radius
    nucleus_edge = nucleus_radius * nucleus_shape
    shift = (1.0 - traits.nucleus_fraction) * radius * rng.uniform(0.1, 0.7)
    sin, cos = _direction(rng)
    ny, nx = cy + shift * sin, cx + shift * cos

    reach = float(cell_edge.max()) + 3.0
    y0, x0 = max(0, math.floor(cy - reach)), max(0, math.floor(cx - reach))
    y1, x1 = min(size, math.ceil(cy + reach)), min(size, math.ceil(cx + reach))
    ys, xs = np.arange(y0, y1, dtype=np.float32), np.arange(x0, x1, dtype=np.float32)
    dy, dx = _offsets(ys, xs, cy, cx)
    rho = _distance(dy, dx)
    local_edge = cell_edge.astype(np.float32)[_angle_index(dy, dx)]
    ndy, ndx = _offsets(ys, xs, ny, nx)
    rim = 0.025 * traits.radius  # a sliver of cytoplasm stays around the nucleus
    nucleus = np.minimum(
        _coverage(
            nucleus_edge.astype(np.float32)[_angle_index(ndy, ndx)], _distance(ndy, ndx), 1.5
        ),
        _coverage(local_edge - rim, rho, 1.5),
    )
    return _Geometry(
        box=(y0, y1, x0, x1),
        cell=_coverage(local_edge, rho, 1.2),
        nucleus=nucleus,
        depth=np.minimum(rho / local_edge, 1.0),
        nucleus_centre=(ny - y0, nx - x0),
        nucleus_radius=nucleus_radius * float(nucleus_shape.mean()),  # an exact mean
    )


def _paint(
    rng: np.random.Generator, traits: _Traits, style: SubjectStyle, geometry: _Geometry
) -> np.ndarray:
    """Stain the crop: lilac cytoplasm, violet nucleus whose chromatin is fine and even or
    coarse and clumped, lighter nucleoli, a darker membrane, sensor noise, black outside."""
    shape = geometry.cell.shape
    fine = _noise(rng, shape, max(2.0, traits.radius / 28.0))
    coarse = _noise(rng, shape, max(3.0, traits.radius / 7.0))
    density = traits.darkness + 0.55 * traits.coarseness * np.maximum(coarse, -0.4) + 0.06 * fine
    spots = geometry.nucleus * _nucleoli(
        rng, shape, geometry.nucleus_centre, geometry.nucleus_radius, traits.n_nucleoli
    )
    # Channels first: numpy is slow on a trailing axis of length 3.
    light = np.asarray(style.cytoplasm_rgb, np.float32)[:, None, None]
    cytoplasm = light * (1.0 + 0.03 * fine)
    chromatin = np.asarray(style.nucleus_rgb, np.float32)[:, None, None] * _decay(density)
    colour = cytoplasm + geometry.nucleus * (chromatin - cytoplasm)
    colour += spots * (light - colour)
    depth2 = geometry.depth * geometry.depth
    colour *= style.brightness * (1.0 - 0.12 * (depth2 * depth2))
    colour += 0.04 * (rng.random((3, *shape), np.float32) - 0.5)
    colour *= geometry.cell
    return np.clip(colour * 255.0 + 0.5, 0.0, 255.0).astype(np.uint8).transpose(1, 2, 0)


def render_cell(rng: np.random.Generator, label: int, style: SubjectStyle, size: int) -> np.ndarray:
    """One segmented, stain-normalised cell on pure black: ``size`` x ``size`` x 3 uint8 RGB."""
    traits = _draw_traits(rng, _PRIORS[label], style, size)
    geometry = _geometry(rng, traits, size)
    y0, y1, x0, x1 = geometry.box
    image = np.zeros((size, size, 3), np.uint8)
    image[y0:y1, x0:x1] = _paint(rng, traits, style, geometry)
    return image


# ---------------------------------------------------------------------------------------------
# The data set plan: subjects, folds, names


@dataclasses.dataclass(frozen=True)
class _Subject:
    name: str
    label: int
    style: SubjectStyle
    split: str
    index: int  # position within its split: seeds its cells
    fold: int | None


@dataclasses.dataclass(frozen=True)
class _Cell:
    rel_path: str  # inside DATASET_DIR
    original_name: str  # the C-NMC name (the file name itself in training)
    subject: _Subject
    image_id: int
    cell_id: int
    seed: tuple[int, ...]


def _split_labels(n_subjects: int, all_fraction: float) -> list[int]:
    n_all = _n_all(n_subjects, all_fraction)
    return [ALL] * n_all + [HEM] * (n_subjects - n_all)


def _subject_names(rng: np.random.Generator, labels: list[int]) -> list[str]:
    """Distinct C-NMC subject ids: plain numbers for ALL subjects, ``H<n>`` for healthy ones."""
    numbers = {
        label: iter(rng.choice(np.arange(1, 2 * n + 20), n, replace=False))
        for label, n in ((ALL, labels.count(ALL)), (HEM, labels.count(HEM)))
    }
    return [("" if label == ALL else "H") + str(next(numbers[label])) for label in labels]


def _assign_folds(rng: np.random.Generator, labels: list[int]) -> list[int]:
    """Deal subjects to folds round-robin, each class shuffled, so folds stay class-balanced."""
    order = [
        i
        for label in (ALL, HEM)
        for i in rng.permutation([j for j, lab in enumerate(labels) if lab == label])
    ]
    folds = [0] * len(labels)
    for position, subject in enumerate(order):
        folds[subject] = position % N_FOLDS
    return folds


def _subject_rng(spec: SyntheticSpec, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([spec.seed, _SUBJECT, _SPLIT_CODES[split], index])


def _cell_ids(rng: np.random.Generator, n_cells: int) -> list[tuple[int, int]]:
    """(image id, cell id) pairs: a few cells are segmented from each microscope image."""
    images = rng.choice(np.arange(1, 4 * n_cells + 10), n_cells, replace=False)
    ids: list[tuple[int, int]] = []
    for image_id in images:
        per_image = min(int(rng.integers(1, 4)), n_cells - len(ids))
        ids.extend((int(image_id), cell_id) for cell_id in range(1, per_image + 1))
        if len(ids) == n_cells:
            break
    return ids


def _subject_cells(
    spec: SyntheticSpec, subject: _Subject, rng: np.random.Generator, n_cells: int
) -> list[_Cell]:
    """The cells of one subject, stored in training layout (other splits rename them later)."""
    cells = []
    for k, (image_id, cell_id) in enumerate(_cell_ids(rng, n_cells)):
        name = format_cell_name(subject.name, image_id, cell_id, subject.label)
        folder = f"{TRAINING_DIR}/fold_{subject.fold}/{LABEL_NAMES[subject.label]}"
        seed = (spec.seed, _IMAGE, _SPLIT_CODES[subject.split], subject.index, k)
        cells.append(_Cell(f"{folder}/{name}", name, subject, image_id, cell_id, seed))
    return cells


def _make_subjects(
    spec: SyntheticSpec, split: str, names: list[str], labels: list[int], folds: list[int | None]
) -> list[tuple[_Subject, np.random.Generator]]:
    """Subjects of one split, each with the generator its style and cells are drawn from."""
    made = []
    for index, (name, label, fold) in enumerate(zip(names, labels, folds, strict=True)):
        rng = _subject_rng(spec, split, index)
        made.append((_Subject(name, label, draw_subject_style(rng), split, index, fold), rng))
    return made


def _cell_counts(
    spec: SyntheticSpec, subjects: list[tuple[_Subject, np.random.Generator]]
) -> list[int]:
    """Each subject's number of cells, between 0.5x and 1.5x the mean."""
    low, high = max(1, round(0.5 * spec.cells_per_subject)), round(1.5 * spec.cells_per_subject)
    return [int(rng.integers(low, max(low, high) + 1)) for _, rng in subjects]


def _renamed(rng: np.random.Generator, cells: list[_Cell], folder: str) -> list[_Cell]:
    """Shuffle cells and name them ``1.bmp..N.bmp``, as the C-NMC test phases do."""
    order = rng.permutation(len(cells))
    return [
        dataclasses.replace(cells[i], rel_path=f"{folder}/{n}.bmp")
        for n, i in enumerate(order, start=1)
    ]


def _final_subject_count(spec: SyntheticSpec) -> int:
    if spec.n_final_images == 0:
        return 0
    return max(1, round(spec.n_final_images / spec.cells_per_subject))


def _split_subjects(
    spec: SyntheticSpec, rng: np.random.Generator
) -> dict[str, list[tuple[_Subject, np.random.Generator]]]:
    """The subjects of every split, with distinct ids and training folds."""
    labels = {
        "train": _split_labels(spec.n_train_subjects, spec.all_fraction),
        "prelim": _split_labels(spec.n_prelim_subjects, spec.all_fraction),
        "final": _split_labels(_final_subject_count(spec), spec.all_fraction),
    }
    names = iter(_subject_names(rng, [label for split in labels.values() for label in split]))
    folds = {"train": _assign_folds(rng, labels["train"])}
    return {
        split: _make_subjects(
            spec, split, [next(names) for _ in labs], labs, folds.get(split, [None] * len(labs))
        )
        for split, labs in labels.items()
    }


def _cells(
    spec: SyntheticSpec, subjects: list[tuple[_Subject, np.random.Generator]], counts: list[int]
) -> list[_Cell]:
    return [
        cell
        for (subject, rng), count in zip(subjects, counts, strict=True)
        for cell in _subject_cells(spec, subject, rng, count)
    ]


def _plan(spec: SyntheticSpec) -> list[_Cell]:
    """Every image to write, in file order: training, then prelim, then final."""
    rng = np.random.default_rng([spec.seed, _PLAN])
    subjects = _split_subjects(spec, rng)
    train = _cells(spec, subjects["train"], _cell_counts(spec, subjects["train"]))
    prelim = _cells(spec, subjects["prelim"], _cell_counts(spec, subjects["prelim"]))
    # Final-phase images come from a few hidden subjects, picked at random per image.
    n_final = len(subjects["final"])
    picks = rng.integers(0, max(1, n_final), spec.n_final_images)
    final = _cells(spec, subjects["final"], np.bincount(picks, minlength=n_final).tolist())
    return train + _renamed(rng, prelim, PRELIM_DIR) + _renamed(rng, final, FINAL_DIR)


# ---------------------------------------------------------------------------------------------
# Writing


def _write_cell(cell: _Cell, dataset_dir: Path, size: int) -> None:
    rng = np.random.default_rng(list(cell.seed))
    image = render_cell(rng, cell.subject.label, cell.subject.style, size)
    path = dataset_dir / cell.rel_path
    if not cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {path}")


def _single_threaded_opencv() -> None:
    """Worker processes already share the cores; OpenCV threads would oversubscribe them.

    Only safe in a fresh process: after a fork from a parent that ran OpenCV it deadlocks.
    """
    cv2.setNumThreads(1)


def _write_images(
    dataset_dir: Path, cells: list[_Cell], size: int, workers: int, progress: bool
) -> None:
    write = functools.partial(_write_cell, dataset_dir=dataset_dir, size=size)
    bar = tqdm(total=len(cells), desc="synthetic C-NMC", unit="img", disable=not progress)
    with bar:
        if workers == 1:
            for cell in cells:
                write(cell)
                bar.update()
            return
        chunk = max(1, min(32, len(cells) // (4 * workers)))
        spawn = multiprocessing.get_context("spawn")  # forking a process that ran OpenCV can hang
        with ProcessPoolExecutor(
            workers, mp_context=spawn, initializer=_single_threaded_opencv
        ) as pool:
            for _ in pool.map(write, cells, chunksize=chunk):
                bar.update()


def _write_prelim_labels(dataset_dir: Path, cells: list[_Cell]) -> None:
    """The prelim labels file maps each ``<n>.bmp`` to its original C-NMC name and label."""
    rows = [
        (c.original_name, c.rel_path.rsplit("/", 1)[1], c.subject.label)
        for c in cells
        if c.subject.split == "prelim"
    ]
    table = pd.DataFrame(rows, columns=["Patient_ID", "new_names", "labels"])
    table.to_csv(dataset_dir / f"{PRELIM_DIR}_labels.csv", index=False)


def _make_folders(dataset_dir: Path, cells: list[_Cell]) -> None:
    """Every fold gets both class folders, as in the real release, plus each used test folder."""
    folders = {
        f"{TRAINING_DIR}/fold_{k}/{name}" for k in range(N_FOLDS) for name in LABEL_NAMES.values()
    }
    folders.update(c.rel_path.rsplit("/", 1)[0] for c in cells)
    for folder in sorted(folders):
        (dataset_dir / folder).mkdir(parents=True, exist_ok=True)


def _table(cells: list[_Cell]) -> pd.DataFrame:
    """What was written, with the same columns as :func:`layout.scan_dataset`."""
    rows = [
        {
            "path": f"{DATASET_DIR}/{c.rel_path}",
            "label": c.subject.label,
            "subject": c.subject.name,
            "image_id": c.image_id,
            "cell_id": c.cell_id,
            "fold": c.subject.fold,
            "source_split": c.subject.split,
        }
        for c in cells
    ]
    return pd.DataFrame(rows, columns=list(COLUMN_TYPES)).astype(COLUMN_TYPES)


def plan_cnmc(spec: SyntheticSpec) -> pd.DataFrame:
    """The table :func:`generate_cnmc` returns for ``spec``, without rendering anything."""
    return _table(_plan(spec))


def generate_cnmc(
    root: str | Path, spec: SyntheticSpec, workers: int = 1, progress: bool = False
) -> pd.DataFrame:
    """Write a synthetic C-NMC tree to ``root/C-NMC_Leukemia`` and return what was written.

    ``workers`` processes render the images (0: one per CPU core); the files are the same for
    any number. The tree is built in a hidden sibling folder and moved into place only when
    complete, and an existing tree is never overwritten. The returned table has the columns of
    :func:`layout.scan_dataset`; for final-phase images it holds the truth kept off the disk
    (label, hidden subject), with ``fold`` NA outside training.
    """
    if workers < 0:
        raise ValueError(f"workers must be >= 0 (0: one per CPU core), got {workers}")
    target = Path(root) / DATASET_DIR
    if target.exists():
        raise FileExistsError(f"{target} already exists: refusing to overwrite a data set")
    cells = _plan(spec)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{DATASET_DIR}.partial-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        _make_folders(staging, cells)
        if spec.n_prelim_subjects:
            _write_prelim_labels(staging, cells)
        _write_images(staging, cells, spec.image_size, workers or os.cpu_count() or 1, progress)
        if target.exists():
            raise FileExistsError(f"{target} appeared while generating: left as it is")
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return _table(cells)
