"""The ``prepare`` stage vs a naive single-process PIL loop over the same raw BMP files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from bench.report import Section, verdict
from bench.timing import alternating_best
from bench.workspace import Workspace
from leukemia_mlops.data.layout import scan_dataset
from leukemia_mlops.data.prepare import prepare_dataset

TITLE = "Preprocessing: prepare stage vs naive PIL loop"
SPEEDUP_TARGET = 2.0


def naive_image(path: Path, window: int, size: int) -> np.ndarray:
    """What a first script would do: open, RGB, centre crop, resize, to an array."""
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    left, top = (rgb.width - window) // 2, (rgb.height - window) // 2
    square = rgb.crop((left, top, left + window, top + window))
    # BOX is PIL's area filter, as prepare's cv2.INTER_AREA, and its fastest downscale.
    return np.asarray(square.resize((size, size), Image.Resampling.BOX))


def run(ws: Workspace) -> Section:
    raw = ws.raw(ws.synthetic_spec(ws.sizes.prep_images))
    spec = ws.prepare_spec(ws.image_size)
    paths = [raw / p for p in scan_dataset(raw)[0]["path"]]
    out = ws.root / "prep-bench"
    rates, passes = alternating_best(
        {
            "naive": lambda: len([naive_image(p, spec.window, spec.image_size) for p in paths]),
            "prepare": lambda: prepare_dataset(raw, out, spec, ws.split_spec(), False)["images"],
        },
        ws.sizes.budget_s / 2,
    )
    workers = spec.workers or os.cpu_count() or 1
    speedup = rates["prepare"] / rates["naive"]
    rows = [
        ["naive PIL loop", 1, len(paths), passes, rates["naive"], 1.0],
        ["prepare_dataset", workers, len(paths), passes, rates["prepare"], speedup],
    ]
    return Section(
        TITLE,
        f"{len(paths)} synthetic 450 px BMPs to {spec.image_size} px arrays. *prepare* is the "
        "whole stage (scan, decode with OpenCV in one process per core straight into the "
        "memory-mapped cache, content hash, cell box, area-average downscale, manifest); "
        "*naive* opens each file with PIL, converts to RGB, centre-crops the window, resizes "
        "with PIL's area filter and takes an array, in one process. Each runs once to warm up "
        "(imports, page cache); then they take turns, one whole pass over the files each, "
        "until the budget is spent, and each one's fastest pass counts.",
        ["method", "processes", "images", "timed passes", "img/s", "vs naive"],
        rows,
        [verdict("prepare vs naive", speedup, SPEEDUP_TARGET)],
        {"img_per_s": rates, "passes": passes, "workers": workers},
    )
