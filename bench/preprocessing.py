"""The ``prepare`` stage vs a naive single-process PIL loop over the same raw BMP files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from bench.report import Section, verdict
from bench.timing import BatchClock, rate_of
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


def _pass_clock(ws: Workspace) -> BatchClock:
    """One warm-up pass over all the files, then whole passes for a quarter of the budget."""
    return BatchClock(warmup=1, budget_s=ws.sizes.budget_s / 4)


def run(ws: Workspace) -> Section:
    raw = ws.raw(ws.synthetic_spec(ws.sizes.prep_images))
    spec = ws.prepare_spec(ws.image_size)
    paths = [raw / p for p in scan_dataset(raw)[0]["path"]]
    naive = rate_of(
        lambda: len([naive_image(p, spec.window, spec.image_size) for p in paths]), _pass_clock(ws)
    )
    out = ws.root / "prep-bench"
    prepare = rate_of(
        lambda: prepare_dataset(raw, out, spec, ws.split_spec(), False)["images"], _pass_clock(ws)
    )
    workers = spec.workers or os.cpu_count() or 1
    speedup = prepare.per_s / naive.per_s
    rows = [
        ["naive PIL loop", 1, len(paths), naive.batches, naive.per_s, 1.0],
        ["prepare_dataset", workers, len(paths), prepare.batches, prepare.per_s, speedup],
    ]
    return Section(
        TITLE,
        f"{len(paths)} synthetic 450 px BMPs to {spec.image_size} px arrays. *prepare* is the "
        "whole stage (scan, decode with OpenCV in one process per core straight into the "
        "memory-mapped cache, content hash, cell box, area-average downscale, manifest); "
        "*naive* opens each file with PIL, converts to RGB, centre-crops the window, resizes "
        "with PIL's area filter and takes an array, in one process. Each runs once to warm up "
        "(imports, page cache), then whole passes over the files are timed until the clock's "
        "budget is spent.",
        ["method", "processes", "images per pass", "timed passes", "img/s", "vs naive"],
        rows,
        [verdict("prepare vs naive", speedup, SPEEDUP_TARGET)],
        {"naive": naive.as_dict(), "prepare": {**prepare.as_dict(), "workers": workers}},
    )
