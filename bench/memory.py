"""Peak memory of prepare, a training epoch and predict at two data-set sizes each.

All three stream: prepare writes decoded images into a memory-mapped cache, a training epoch
reads them from it, and predict holds one batch of images at a time. So their peak RSS should
grow only by the cache pages they touch (file-backed and reclaimable), not with the data set
otherwise.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict

import numpy as np
from omegaconf import OmegaConf

from bench.report import Section, fmt, pct
from bench.run import REPO
from bench.workspace import Workspace
from leukemia_mlops.data.prepare import IMAGES_FILE

TITLE = "Memory: peak RSS of prepare, a training epoch and predict at two sizes"
FLAT = 0.1  # growth beyond the cache below this share of the smaller peak counts as flat


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


def measure_predict(ws: Workspace, n_images: int) -> dict[str, float]:
    raw = ws.raw(ws.synthetic_spec(n_images))
    csv = ws.root / f"predict-{n_images}.csv"
    peaks = child_peak("predict", str(raw), str(csv), str(ws.image_size))
    files = len(csv.read_text().splitlines()) - 1  # the images and the few other files
    return {"images": files, "cache_mib": 0.0, **{f"predict_{k}": v for k, v in peaks.items()}}


def run(ws: Workspace) -> Section:
    small, large = (measure(ws, n) for n in ws.sizes.memory_images)
    scored = [measure_predict(ws, n) for n in ws.sizes.predict_images]
    pairs = {"prepare": (small, large), "train": (small, large), "predict": tuple(scored)}
    rows, readings = [], []
    for stage, (few, many) in pairs.items():
        for process in ("main", "worker"):
            key = f"{stage}_{process}"
            if not few[key]:  # the stage ran without worker processes
                continue
            beyond = (many[key] - few[key]) - (many["cache_mib"] - few["cache_mib"])
            flat = beyond < FLAT * few[key]
            growth = many["images"] / few["images"]
            rows.append(
                [stage, process, few["images"], many["images"], few[key], many[key], beyond]
            )
            readings.append(
                f"{stage}, {process}: peak x{fmt(many[key] / few[key])} for x{fmt(growth)} "
                f"images; growth beyond the cache {fmt(beyond)} MiB: "
                f"**{'flat' if flat else 'grows with the data set'}**"
            )
    return Section(
        TITLE,
        "Peak RSS (a fresh process per run: its `VmHWM`, its workers' `ru_maxrss`) of the "
        "prepare stage, of one training epoch (the project's Lightning path, configured "
        f"model and loader, no validation) on {small['images']} and {large['images']} "
        f"synthetic images at {ws.image_size} px, whose caches are {fmt(small['cache_mib'])} and "
        f"{fmt(large['cache_mib'])} MiB, and of `predict` (an untrained resnet18, batches of "
        "64 decoded by one loader process, CSV rows appended as it goes) over every file of "
        "two raw synthetic trees. "
        "*main* is the stage's process, *worker* the largest of its pool or loader workers "
        "(forked: its RSS includes pages shared with main). RSS counts the cache pages a "
        "process touched, so growth up to the cache's growth is expected; *beyond cache* is "
        f"what remains (predict has no cache), and counts as flat below {pct(FLAT)} of the "
        "smaller peak.",
        [
            "stage",
            "process",
            "images (small)",
            "images (large)",
            "small peak MiB",
            "large peak MiB",
            "growth beyond cache MiB",
        ],
        rows,
        readings,
        {"small": small, "large": large, "predict": scored},
    )
