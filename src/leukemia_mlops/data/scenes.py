"""Multi-cell detection scenes composed from segmented single cells of one split.

C-NMC images hold one segmented cell on black, so a detector trained on them alone never has
to find several cells or tell neighbours apart. A scene pastes cells on a dark canvas, each in
its own slot of a square grid at a random offset, so cells never overlap and every box is the
pasted cell's exact extent. Cells of different splits are never mixed: a scene holding a
validation subject's cell in the training set would leak that subject.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from leukemia_mlops.data.images import CELL_THRESHOLD, cell_box
from leukemia_mlops.errors import ConfigError


@dataclass(frozen=True)
class Cell:
    """A tight crop of one segmented cell: its first and last rows and columns hold cell pixels."""

    pixels: np.ndarray  # [h, w, 3] uint8
    label: int
    split: str


@dataclass(frozen=True)
class SceneSpec:
    """How many cells a scene holds and how they are laid out; bad values raise ValueError."""

    min_cells: int = 4  # 2x2 grid
    max_cells: int = 9  # 3x3 grid
    spacing: float = 0.25  # free room in a slot, as a fraction of the scene's largest cell
    noise: int = 4  # background pixels are uniform in [0, noise]; 0 gives black

    def __post_init__(self) -> None:
        if not 1 <= self.min_cells <= self.max_cells:
            raise ConfigError(
                f"scenes need 1 <= min_cells <= max_cells, got {self.min_cells}, {self.max_cells}"
            )
        if self.spacing < 0:
            raise ConfigError(f"scenes.spacing must be >= 0, got {self.spacing}")
        if not 0 <= self.noise <= CELL_THRESHOLD:
            # Brighter noise would count as cell pixels and blur the boxes' meaning.
            raise ConfigError(f"scenes.noise must be in [0, {CELL_THRESHOLD}], got {self.noise}")


@dataclass(frozen=True)
class Scene:
    """A composed image with one box (xyxy pixels, exclusive ends) and label per cell."""

    image: np.ndarray  # [S, S, 3] uint8
    boxes: np.ndarray  # [N, 4] int64
    labels: np.ndarray  # [N] int64
    split: str


def crop_cell(image: np.ndarray, label: int, split: str) -> Cell:
    """The cell of a single-cell image, cropped to its non-black region."""
    box = cell_box(image)
    if box is None:
        raise ValueError("blank image: no cell pixels to crop")
    x0, y0, x1, y1 = box
    return Cell(np.ascontiguousarray(image[y0:y1, x0:x1]), int(label), split)


def choose_cells(pool_size: int, rng: np.random.Generator, spec: SceneSpec) -> np.ndarray:
    """Indices into a pool of cells for one scene: a random count in [min_cells, max_cells],
    without repeats unless the pool is smaller than that count."""
    if pool_size < 1:
        raise ValueError("cannot compose a scene from an empty pool of cells")
    count = int(rng.integers(spec.min_cells, spec.max_cells + 1))
    return rng.choice(pool_size, size=count, replace=pool_size < count)


def compose_scene(cells: Sequence[Cell], rng: np.random.Generator, spec: SceneSpec) -> Scene:
    """Paste ``cells`` (all of one split) into random slots of the smallest square grid that
    holds them; only cell pixels are pasted, so the background stays around round cells."""
    splits = sorted({cell.split for cell in cells})
    if len(splits) != 1:
        raise ValueError(f"a scene takes cells of exactly one split, got {splits}")
    grid = math.ceil(math.sqrt(len(cells)))
    largest = max(max(cell.pixels.shape[:2]) for cell in cells)
    slot = math.ceil(largest * (1 + spec.spacing))
    side = grid * slot
    canvas = rng.integers(0, spec.noise, size=(side, side, 3), dtype=np.uint8, endpoint=True)
    boxes = []
    for cell, place in zip(cells, rng.permutation(grid * grid), strict=False):
        height, width = cell.pixels.shape[:2]
        row, col = divmod(int(place), grid)
        y = row * slot + int(rng.integers(0, slot - height, endpoint=True))
        x = col * slot + int(rng.integers(0, slot - width, endpoint=True))
        mask = cell.pixels.max(axis=2) > CELL_THRESHOLD
        canvas[y : y + height, x : x + width][mask] = cell.pixels[mask]
        boxes.append((x, y, x + width, y + height))
    labels = np.array([cell.label for cell in cells], dtype=np.int64)
    return Scene(canvas, np.array(boxes, dtype=np.int64).reshape(-1, 4), labels, splits[0])
