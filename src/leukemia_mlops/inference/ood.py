"""Is an input like the training images? A rule on what C-NMC cell images look like.

A C-NMC image is one segmented white cell, centred on a black background, in a square frame
of the prepare window (450 px). ``predict`` applies this rule to every file a classifier
scores and writes the answer beside the label, so a blood-smear photograph or a picture of
several cells is never labelled without a flag. A detector learnt composed scenes of several
cells too, so its rule (:func:`assess_scene`) asks only for the black background.

The thresholds are module constants, measured on the first default synthetic training data
(1,098 images at 450x450; ``tests/test_ood.py`` checks that the rule raises no flag on the
tiny fixture nor on today's default ``data/raw``, 1,086 images): frame 450x450 throughout,
cell box between 9.7% and 63.8% of the frame, border median 0 and exactly one bright
component in every image. Each limit leaves a wide margin around that range, so the rule
catches what is clearly unlike, not what is unusual.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from leukemia_mlops.data.images import CELL_THRESHOLD

#: An image side more than this factor away from the prepare window (either way) is foreign.
MAX_SIDE_FACTOR = 1.5
#: Longer side / shorter side above this is not a square C-NMC frame (measured: 1.0).
MAX_ASPECT = 1.2
#: Median brightest channel of the frame's outermost pixels above this: not a black
#: background (measured: 0; a light smear background is near 200).
MAX_BORDER_MEDIAN = 40
#: Cell box area / frame area outside these bounds (measured: 0.097 to 0.638).
MIN_BOX_FILL, MAX_BOX_FILL = 0.03, 0.85
#: A bright component at least this fraction of the largest one's area counts as a cell
#: (measured: a single component in every image).
BLOB_MIN_SHARE = 0.1


@dataclass(frozen=True)
class Verdict:
    """Whether an input looks like a training image, and why not (``""`` when it does)."""

    in_distribution: bool
    reason: str


def assess(
    height: int,
    width: int,
    box: tuple[int, int, int, int],
    image: np.ndarray,
    window: int,
) -> Verdict:
    """Check a decoded file against the training images; every failing rule is named.

    ``height``, ``width`` and ``box`` (the cell box, xyxy) describe the original image;
    ``image`` is its training image ``[S, S, 3]`` as ``prepare`` makes it with ``window``.
    """
    reasons = []
    low, high = window / MAX_SIDE_FACTOR, window * MAX_SIDE_FACTOR
    if not (low <= height <= high and low <= width <= high):
        reasons.append(f"size {width}x{height} far from the {window}x{window} training frame")
    elif max(height, width) / min(height, width) > MAX_ASPECT:
        reasons.append(f"aspect {width}x{height} is not square")
    brightness = image.max(axis=2)
    reasons += background_reasons(brightness)
    x0, y0, x1, y1 = box
    fill = (x1 - x0) * (y1 - y0) / (height * width)
    if not MIN_BOX_FILL <= fill <= MAX_BOX_FILL:
        reasons.append(f"cell box fills {fill:.0%} of the frame")
    cells = count_blobs(brightness)
    if cells > 1:
        reasons.append(f"{cells} separate cells")
    return Verdict(not reasons, "; ".join(reasons))


def assess_scene(image: np.ndarray) -> Verdict:
    """The detector's rule for a whole image (``[H, W, 3]``): it learnt single cells and
    scenes of several cells, of any size, all on black, so only the background must match."""
    reasons = background_reasons(image.max(axis=2))
    return Verdict(not reasons, "; ".join(reasons))


def background_reasons(brightness: np.ndarray) -> list[str]:
    """Why the frame's outermost pixels (brightest channel) are not a black background."""
    border = np.concatenate([brightness[0], brightness[-1], brightness[:, 0], brightness[:, -1]])
    median = np.median(border)
    return (
        [f"background not dark (border median {median:.0f})"] if median > MAX_BORDER_MEDIAN else []
    )


def count_blobs(brightness: np.ndarray) -> int:
    """Bright connected components of a brightest-channel image, the specks left out."""
    mask = (brightness > CELL_THRESHOLD).astype(np.uint8)
    _, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    areas = stats[1:, cv2.CC_STAT_AREA]
    return int((areas >= BLOB_MIN_SHARE * areas.max()).sum()) if areas.size else 0
