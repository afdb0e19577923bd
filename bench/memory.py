"""Peak memory of prepare and a training epoch at two data-set sizes, and of predict at three.

All three stream: prepare writes decoded images into a memory-mapped cache, a training epoch
reads them from it, and predict holds one batch of images at a time. So their peak RSS should
grow only by the cache pages they touch (file-backed and reclaimable), not with the data set
otherwise; predict's growth is fitted as a slope in KiB per file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from bench.report import Section, fmt, pct
from bench.run import REPO
from bench.workspace import Workspace
from leukemia_mlops.data.prepare import IMAGES_FILE

TITLE = "Memory: peak RSS of prepare and a training epoch at two sizes, predict at three"
FLAT = 0.1  # growth beyond the cache below this share of the smaller peak counts as flat
DISTINCT_FILES = 1000  # real images behind predict's trees; the rest are links to them


def child_peak(*args: str) -> dict[str, float]:
    """Run ``bench.peak_rss`` in a fresh process; its last output line is the peaks."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.peak_rss", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        raise RuntimeError(f"bench.peak_rss {args[0]} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(ws: Workspace, n_images: int) -> dict[str, float]:
    size = ws.image_size
    out = ws.root / f"memory-{n_images}"
    raw = ws.raw(ws.synthetic_spec(n_images))
    prepare = child_peak(
        "prepare",
        str(raw),
        str(out),
        json.dumps(asdict(ws.prepare_spec(size))),
        json.dumps(asdict(ws.split_spec())),
    )
    config = ws.root / f"memory-{n_images}.yaml"
    OmegaConf.save(ws.config(out, size), config)
    train = child_peak("train", str(config))
    return {
        "images": len(np.load(out / IMAGES_FILE, mmap_mode="r")),
        "cache_mib": (out / IMAGES_FILE).stat().st_size / 2**20,
        **{f"prepare_{k}": v for k, v in prepare.items()},
        **{f"train_{k}": v for k, v in train.items()},
    }


def linked_tree(ws: Workspace, n_files: int) -> Path:
    """A folder of ``n_files`` BMP files: symbolic links, in turn, to the images of one
    synthetic tree of at most :data:`DISTINCT_FILES` (30k real files would take 18 GB)."""
    raw = ws.raw(ws.synthetic_spec(min(n_files, DISTINCT_FILES)))
    images = sorted(raw.rglob("*.bmp"))
    tree = ws.scratch(f"predict-{n_files}-files")
    tree.mkdir()
    for i in range(n_files):
        os.symlink(images[i % len(images)], tree / f"cell_{i:06d}.bmp")
    return tree


def measure_predict(ws: Workspace, n_files: int) -> dict[str, float]:
    csv = ws.root / f"predict-{n_files}.csv"
    peaks = child_peak("predict", str(linked_tree(ws, n_files)), str(csv), str(ws.image_size))
    files = len(csv.read_text().splitlines()) - 1
    return {"images": files, "cache_mib": 0.0, **{f"predict_{k}": v for k, v in peaks.items()}}


def slope_kib_per_file(points: list[dict[str, float]], key: str) -> float:
    """Least-squares slope of peak RSS against files scored, in KiB per file."""
    files = np.array([p["images"] for p in points], float)
    peaks = np.array([p[key] for p in points], float) * 1024
    return float(np.polyfit(files, peaks, 1)[0])


def predict_rows(scored: list[dict[str, float]]) -> tuple[list[list], list[str]]:
    """One row per predict size and process, and the fitted slope of each process."""
    rows, readings = [], []
    for process in ("main", "worker"):
        key = f"predict_{process}"
        if not scored[0][key]:
            continue
        rows += [["predict", process, p["images"], p[key]] for p in scored]
        sizes = " / ".join(f"{fmt(p['images'])}" for p in scored)
        readings.append(
            f"predict, {process}: peak {' / '.join(fmt(p[key]) for p in scored)} MiB at "
            f"{sizes} files; slope **{fmt(slope_kib_per_file(scored, key))} KiB per file** "
            "(least squares over the three sizes)"
        )
    return rows, readings


def run(ws: Workspace) -> Section:
    small, large = (measure(ws, n) for n in ws.sizes.memory_images)
    scored = [measure_predict(ws, n) for n in ws.sizes.predict_images]
    rows, readings = [], []
    for stage in ("prepare", "train"):
        for process in ("main", "worker"):
            key = f"{stage}_{process}"
            if not small[key]:  # the stage ran without worker processes
                continue
            beyond = (large[key] - small[key]) - (large["cache_mib"] - small["cache_mib"])
            flat = beyond < FLAT * small[key]
            growth = large["images"] / small["images"]
            rows += [
                [stage, process, small["images"], small[key], ""],
                [stage, process, large["images"], large[key], beyond],
            ]
            readings.append(
                f"{stage}, {process}: peak x{fmt(large[key] / small[key])} for x{fmt(growth)} "
                f"images; growth beyond the cache {fmt(beyond)} MiB: "
                f"**{'flat' if flat else 'grows with the data set'}**"
            )
    predicted, predict_readings = predict_rows(scored)
    rows += [[*row, ""] for row in predicted]
    readings += predict_readings
    return Section(
        TITLE,
        "Peak RSS (a fresh process per run: its `VmHWM`, its workers' `ru_maxrss`) of the "
        "prepare stage, of one training epoch (the project's Lightning path, configured "
        f"model and loader, no validation) on {small['images']} and {large['images']} "
        f"synthetic images at {ws.image_size} px, whose caches are {fmt(small['cache_mib'])} and "
        f"{fmt(large['cache_mib'])} MiB, and of `predict` (an untrained resnet18, batches of "
        "64 decoded by one loader process, CSV rows appended as it goes) over folders of "
        f"{' / '.join(fmt(p['images']) for p in scored)} BMP files (links, in turn, to "
        f"{DISTINCT_FILES} distinct synthetic images at most). "
        "*main* is the stage's process, *worker* the largest of its pool or loader workers "
        "(forked: its RSS includes pages shared with main). RSS counts the cache pages a "
        "process touched, so growth up to the cache's growth is expected; *beyond cache* is "
        f"what remains, and counts as flat below {pct(FLAT)} of the smaller peak. predict "
        "has no cache: its peaks are fitted against the number of files.",
        ["stage", "process", "images", "peak MiB", "growth beyond cache MiB"],
        rows,
        readings,
        {"small": small, "large": large, "predict": scored},
    )
