"""End to end: ``dvc repro`` of the default pipeline in a scratch git + DVC repository.

The scratch repository holds the project's ``dvc.yaml``, ``conf/``, ``hydra_plugins/`` and
``src/`` (the stages' dependencies; they run the installed package), a ``params.yaml``
composed from ``conf/`` and the default synthetic data set under DVC. The first ``dvc repro``
runs every stage; the second, with nothing changed, is DVC's own cost: the baseline.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.report import Section, pct
from bench.run import REPO
from bench.workspace import Workspace
from leukemia_mlops.config import build_spec, compose, write_params
from leukemia_mlops.data.synthetic import SyntheticSpec, generate_cnmc

TITLE = "End to end: dvc repro of the default pipeline"
COPIED = ("conf", "hydra_plugins", "src")
#: Quick sizes: the same stages on a few images, one short trial and one epoch each.
QUICK = [
    "data.synthetic.cells_per_subject=4",
    "data.prepare.image_size=32",
    "datamodule.batch_size=16",
    "sweep.n_trials=1",
    "sweep.max_epochs=1",
    "trainer.max_epochs=1",
    "detector.img_size=64",
    "detector.scenes.train_scenes=8",
    "detector.scenes.val_scenes=4",
    "evaluate.n_resamples=50",
    "evaluate.tta=false",
]
STAGE_LINE = re.compile(r"Running stage '([\w-]+)'")


def scratch_project(ws: Workspace) -> Path:
    """A git + DVC repository with the pipeline, its params and the raw data under DVC."""
    root = ws.root / "repro"
    root.mkdir()
    shutil.copy(REPO / "dvc.yaml", root)
    for folder in COPIED:
        shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    cfg = compose(QUICK if ws.sizes.quick else [])
    write_params(cfg, root / "params.yaml")
    generate_cnmc(
        root / "data/raw", build_spec(SyntheticSpec, cfg.data.synthetic, "data.synthetic")
    )
    for command in (
        ["git", "init", "-q"],
        [_dvc(), "init", "-q"],
        [_dvc(), "add", "-q", "data/raw"],
    ):
        subprocess.run(command, cwd=root, env=_env(), check=True, capture_output=True)
    return root


def timed_repro(root: Path) -> tuple[float, dict[str, float]]:
    """Wall time of ``dvc repro`` and of each stage it ran (from one stage's start to the next)."""
    starts: list[tuple[str, float]] = []
    begin = time.perf_counter()
    with subprocess.Popen(
        [_dvc(), "repro"],
        cwd=root,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as process:
        tail = []
        for line in process.stdout:
            tail = [*tail[-40:], line]
            if match := STAGE_LINE.search(line):
                starts.append((match.group(1), time.perf_counter()))
    end = time.perf_counter()
    if process.returncode:
        raise RuntimeError(f"dvc repro failed:\n{''.join(tail)}")
    ends = [at for _, at in starts[1:]] + ([end] if starts else [])
    return end - begin, {name: stop - at for (name, at), stop in zip(starts, ends, strict=True)}


def run(ws: Workspace) -> Section:
    root = scratch_project(ws)
    total, stages = timed_repro(root)
    noop, rerun = timed_repro(root)
    if rerun:
        raise RuntimeError(f"a second dvc repro ran {sorted(rerun)}: the pipeline is not cached")
    rows = [[name, seconds, pct(seconds / total)] for name, seconds in stages.items()]
    rows += [["dvc repro, every stage", total, pct(1.0)], ["dvc repro, nothing changed", noop, ""]]
    sizes = "quick sizes (a few images, one epoch)" if ws.sizes.quick else "the default data"
    return Section(
        TITLE,
        f"`dvc repro` in a scratch git + DVC repository holding the project's `dvc.yaml`, "
        f"`conf/`, `hydra_plugins/` and `src/`, a `params.yaml` composed from `conf/` and "
        f"{sizes} under DVC (data generation excluded). A stage's time runs from DVC's "
        "`Running stage` line to the next one. The second `dvc repro`, with nothing changed, "
        "is DVC's own cost.",
        ["stage", "seconds", "share"],
        rows,
        [
            f"`dvc repro` from scratch: {total / 60:.1f} min; a rerun with nothing changed: "
            f"{noop:.1f} s ({pct(noop / total)} of it), running no stage."
        ],
        {"total_s": total, "noop_s": noop, "stages_s": stages},
    )


def _dvc() -> str:
    return str(Path(sys.executable).with_name("dvc"))


def _env() -> dict[str, str]:
    """The stages' ``python`` is this interpreter; DVC sends nothing home."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    return {**os.environ, "PATH": path, "DVC_NO_ANALYTICS": "1"}
