"""How often ``predict``'s in-distribution rule flags held-out test cells: false alarms, since
every test cell is a C-NMC cell like the training images.

The rule is :func:`~leukemia_mlops.inference.ood.assess` (a classifier's files, and a detector's
single-cell check), fed what ``predict`` feeds it: the original frame's size and cell box (from
the prepare manifest) and the training image (the prepare cache).
"""

from __future__ import annotations

from typing import Any

from leukemia_mlops.data.datamodule import CellDataset
from leukemia_mlops.inference.ood import assess

RULE = "inference.ood.assess: C-NMC frame size and aspect, dark background, cell box fill, one cell"


def false_alarm_report(test: CellDataset, window: int) -> dict[str, Any]:
    """The ``ood`` section: test cells, how many the rule flags, and their share."""
    frames = test.manifest[["height", "width", "box_x0", "box_y0", "box_x1", "box_y1"]]
    flagged = sum(
        not assess(
            int(h), int(w), (int(x0), int(y0), int(x1), int(y1)), test.image(i), window
        ).in_distribution
        for i, (h, w, x0, y0, x1, y1) in enumerate(frames.itertuples(index=False))
    )
    return {
        "rule": RULE,
        "test_cells": len(test),
        "flagged": flagged,
        "false_alarm_rate": flagged / len(test),
    }
