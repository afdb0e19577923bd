"""Faults survived: a stage killed half-way leaves nothing half-written behind."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import tree_digest

from leukemia_mlops.config import compose, write_params
from leukemia_mlops.data.synthetic import SyntheticSpec, generate_cnmc

pytestmark = pytest.mark.slow


def written_rows(cache: Path) -> int:
    """How many images of a cache being filled hold pixels (0 while the file is not there)."""
    try:
        images = np.load(cache, mmap_mode="r")
    except (FileNotFoundError, ValueError):  # not created yet, or its header not yet complete
        return 0
    return int(images.reshape(len(images), -1).any(axis=1).sum())


def test_prepare_killed_half_way_leaves_no_partial_cache(tmp_path: Path):
    raw = tmp_path / "data/raw"
    generate_cnmc(
        raw,
        SyntheticSpec(n_train_subjects=9, n_prelim_subjects=2, cells_per_subject=200),
        workers=2,
    )
    before = tree_digest(raw)
    params = tmp_path / "params.yaml"
    write_params(compose(["data.prepare.workers=1", "data.prepare.image_size=64"]), params)
    command = [sys.executable, "-m", "leukemia_mlops.cli.prepare", "--params", str(params)]

    process = subprocess.Popen(command, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    partial = tmp_path / "data/prepared.tmp"
    deadline = time.monotonic() + 120
    # Kill on an observed event: the first decoded image reaching the cache, with ~2,200 to go.
    while written_rows(partial / "images.npy") == 0:
        assert process.poll() is None, "prepare finished before it could be killed"
        assert time.monotonic() < deadline, "prepare never wrote an image"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert partial.exists() and not (tmp_path / "data/prepared").exists()
    total = sum(1 for _ in raw.rglob("*.bmp"))
    assert 0 < written_rows(partial / "images.npy") < total  # the kill landed mid-decode

    subprocess.run(command, cwd=tmp_path, check=True, capture_output=True)
    images = np.load(tmp_path / "data/prepared/images.npy", mmap_mode="r")
    manifest = pd.read_parquet(tmp_path / "data/prepared/manifest.parquet")
    assert len(images) == len(manifest) == sum(1 for _ in raw.rglob("*.bmp"))
    assert images[-1].any(), "the last image of the cache was never written"
    assert not partial.exists()
    assert tree_digest(raw) == before
