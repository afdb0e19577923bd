"""Peak memory of prepare and of a training epoch at two data-set sizes.

Both stages stream: prepare writes decoded images into a memory-mapped cache and a training
epoch reads them from it, so their peak RSS should grow only by the cache pages they touch
(file-backed and reclaimable), not with the data set otherwise.
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

TITLE = "Memory: peak RSS of prepare and a training epoch at two sizes"
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


def run(ws: Workspace) -> Section:
    small, large = (measure(ws, n) for n in ws.sizes.memory_images)
    rows, readings = [], []
    for stage in ("prepare", "train"):
        for process in ("main", "worker"):
            key = f"{stage}_{process}"
            if not small[key]:  # the stage ran without worker processes
                continue
            beyond = (large[key] - small[key]) - (large["cache_mib"] - small["cache_mib"])
            flat = beyond < FLAT * small[key]
            rows.append([stage, process, small[key], large[key], large[key] / small[key], beyond])
            readings.append(
                f"{stage}, {process}: peak x{fmt(large[key] / small[key])} for "
                f"x{fmt(large['images'] / small['images'])} images; growth beyond the cache "
                f"{fmt(beyond)} MiB: **{'flat' if flat else 'grows with the data set'}**"
            )
    return Section(
        TITLE,
        "Peak RSS (a fresh process per run: its `VmHWM`, its workers' `ru_maxrss`) of the "
        "prepare stage and of one training epoch (the project's Lightning path, configured "
        f"model and loader, no validation) on {small['images']} and {large['images']} "
        f"synthetic images at {ws.image_size} px, whose caches are {fmt(small['cache_mib'])} and "
        f"{fmt(large['cache_mib'])} MiB. *main* is the stage's process, *worker* the largest "
        "of its pool or loader workers (forked: its RSS includes pages shared with main). "
        "RSS counts the cache pages a process touched, so growth up to the cache's growth is "
        "expected; *beyond cache* is what remains, and counts as flat below "
        f"{pct(FLAT)} of the smaller peak.",
        [
            "stage",
            "process",
            f"{small['images']} images MiB",
            f"{large['images']} images MiB",
            "ratio",
            "growth beyond cache MiB",
        ],
        rows,
        readings,
        {"small": small, "large": large},
    )
