"""The ``prepare`` stage vs naive PIL loops over the same raw BMP files: one loop given as many
processes as prepare uses, and one in a single process."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from bench.report import Section, fmt, spread, verdict
from bench.timing import Spread, alternating_rounds
from bench.workspace import Workspace
from leukemia_mlops.data.images import center_window, to_training_image
from leukemia_mlops.data.layout import scan_dataset
from leukemia_mlops.data.prepare import PrepareSpec, prepare_dataset

TITLE = "Preprocessing: prepare stage vs naive PIL loops"
SPEEDUP_TARGET = 2.0
ROUNDS = 5
COMPARED_IMAGES = 100  # images whose downscales are compared pixel by pixel


def naive_image(path: Path, window: int, size: int) -> np.ndarray:
    """What a first script would do: open, RGB, centre crop, resize, to an array."""
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    left, top = (rgb.width - window) // 2, (rgb.height - window) // 2
    square = rgb.crop((left, top, left + window, top + window))
    # BOX is PIL's area filter; its difference from cv2.INTER_AREA is measured below.
    return np.asarray(square.resize((size, size), Image.Resampling.BOX))


def _naive_task(job: tuple[Path, int, int]) -> int:
    return naive_image(*job).shape[0]


def downscale_differences(paths: list[Path], spec: PrepareSpec) -> dict[str, dict[str, float]]:
    """Mean and largest absolute grey-level difference from ``cv2.INTER_AREA`` of the same
    centred window, for prepare's downscale and for the naive loops' PIL BOX filter."""
    diffs: dict[str, list[np.ndarray]] = {"prepare": [], "naive": []}
    for path in paths:
        rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        window = center_window(rgb, spec.window)
        size = (spec.image_size, spec.image_size)
        exact = cv2.resize(window, size, interpolation=cv2.INTER_AREA).astype(int)
        ours = to_training_image(rgb, spec.image_size, spec.window, "window")
        diffs["prepare"].append(np.abs(ours.astype(int) - exact))
        diffs["naive"].append(np.abs(naive_image(path, spec.window, spec.image_size) - exact))
    return {name: {"mean": float(np.mean(d)), "max": float(np.max(d))} for name, d in diffs.items()}


def run(ws: Workspace) -> Section:
    raw = ws.raw(ws.synthetic_spec(ws.sizes.prep_images))
    spec = ws.prepare_spec(ws.image_size)
    paths = [raw / p for p in scan_dataset(raw)[0]["path"]]
    out = ws.root / "prep-bench"
    workers = spec.workers or multiprocessing.cpu_count()
    jobs = [(p, spec.window, spec.image_size) for p in paths]
    with multiprocessing.Pool(workers) as pool:
        rates = alternating_rounds(
            {
                "naive": lambda: len([naive_image(*job) for job in jobs]),
                "naive_pool": lambda: len(pool.map(_naive_task, jobs, chunksize=32)),
                "prepare": lambda: prepare_dataset(raw, out, spec, ws.split_spec(), False)[
                    "images"
                ],
            },
            ROUNDS,
            ws.sizes.budget_s / (3 * ROUNDS),
        )
    differences = downscale_differences(paths[:COMPARED_IMAGES], spec)
    same_processes = ratio(rates["prepare"], rates["naive_pool"])
    rows = [
        row("naive PIL loop", 1, len(paths), rates["naive"], rates, differences["naive"]),
        row(
            "naive PIL loop, multiprocessing.Pool",
            workers,
            len(paths),
            rates["naive_pool"],
            rates,
            differences["naive"],
        ),
        row(
            "prepare_dataset", workers, len(paths), rates["prepare"], rates, differences["prepare"]
        ),
    ]
    return Section(
        TITLE,
        f"{len(paths)} synthetic 450 px BMPs to {spec.image_size} px arrays. *prepare* is the "
        f"whole stage in {workers} processes (scan, decode with OpenCV straight into the "
        "memory-mapped cache, content hash, cell box, pyramid area downscale, manifest); the "
        "*naive* loops open each file with PIL, convert to RGB, centre-crop the window, resize "
        "with PIL's BOX (area) filter and take an array: one in a single process, one over a "
        f"`multiprocessing.Pool` of {workers} processes (chunks of 32 files). Each runs once to "
        f"warm up (imports, page cache); then they take turns in {ROUNDS} rounds, each running "
        "whole passes over the files for its share of the budget; img/s are the median of "
        "the rounds (lowest-highest). The two downscales are not the same filter: the last "
        f"columns give each one's absolute difference from `cv2.INTER_AREA` of the same window "
        f"in grey levels (0-255), over {min(len(paths), COMPARED_IMAGES)} images.",
        [
            "method",
            "processes",
            "images",
            "img/s median (min-max)",
            "vs naive, 1 process",
            "vs naive, same processes",
            "mean abs diff vs INTER_AREA",
            "max abs diff vs INTER_AREA",
        ],
        rows,
        [
            verdict(
                f"prepare ({workers} processes) vs naive loop (1 process)",
                ratio(rates["prepare"], rates["naive"]),
                SPEEDUP_TARGET,
            ),
            f"prepare vs naive Pool, both {workers} processes: {fmt(same_processes)}x "
            "(no target: the speedup per process).",
        ],
        {
            "img_per_s": {name: rate.as_dict() for name, rate in rates.items()},
            "workers": workers,
            "rounds": ROUNDS,
            "downscale_vs_inter_area": differences,
        },
    )


def ratio(ours: Spread, baseline: Spread) -> float:
    return ours.median / baseline.median


def row(
    name: str,
    processes: int,
    images: int,
    rate: Spread,
    rates: dict[str, Spread],
    difference: dict[str, float],
) -> list:
    """One table row: the rate and its ratios to both naive loops."""
    return [
        name,
        processes,
        images,
        spread(rate.median, rate.low, rate.high),
        ratio(rate, rates["naive"]),
        ratio(rate, rates["naive_pool"]) if processes > 1 else "",
        difference["mean"],
        difference["max"],
    ]
